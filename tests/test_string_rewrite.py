"""String-rewrite generator: every example re-checked with `re` (not apply_rule), the sampling laws
(no-op fraction, occurrence counts, power-law counts), held-out disjointness, determinism, speed."""

import itertools
import pickle
import re
import time

import numpy as np
import pytest

from jaxlm.data.sources import load_tasks
from jaxlm.data.string_rewrite import (
    RewriteConfig,
    apply_rule,
    generate_rewrites,
    rewrite_model_input,
    rule_counts,
)
from jaxlm.errors import ConfigError

SMALL = RewriteConfig(num_rules=300, examples_per_rule=30, num_heldout_rules=50, noop_fraction=0.2,
                      max_occurrences=3, seed=7)
SKEWED = RewriteConfig(alphabet="abcd", x_len=(1, 2), y_len=(0, 2), z_len=(4, 12), num_rules=60,
                       examples_per_rule=40, num_heldout_rules=10, frequency="power_law", exponent=1.2,
                       noop_fraction=0.3, max_occurrences=3, seed=3)
TINY_ALPHABET = RewriteConfig(alphabet="ab", x_len=(1, 3), y_len=(1, 2), z_len=(6, 10), num_rules=8,
                              examples_per_rule=50, num_heldout_rules=3, noop_fraction=0.5, max_occurrences=2)


def _occurrences(x, z):
    return len(re.findall(f"(?={re.escape(x)})", z))  # overlapping, independent of the generator's counter


def _check_every_example(config, data):
    noops = total = 0
    for task in data.train + data.heldout:
        x, y = task.metadata["x"], task.metadata["y"]
        assert x != y and task.definition == f'Replace the leftmost "{x}" with "{y}".'
        for inst in task.instances:
            z = inst.input
            assert config.z_len[0] <= len(z) <= config.z_len[1] and set(z) <= set(config.alphabet)
            m = re.search(re.escape(x), z)
            assert inst.outputs == ((z[:m.start()] + y + z[m.end():]) if m else z,), (x, y, z)
            n = _occurrences(x, z)
            assert n <= config.max_occurrences
            noops += n == 0
            total += 1
    return noops, total


@pytest.mark.parametrize("config", [SMALL, SKEWED, TINY_ALPHABET], ids=["small", "power_law", "tiny_alphabet"])
def test_every_example_is_the_leftmost_rewrite(config):
    data = generate_rewrites(config)
    noops, total = _check_every_example(config, data)
    expected_total = config.num_rules * config.examples_per_rule + config.num_heldout_rules * config.heldout_examples
    assert total == expected_total
    assert abs(noops / total - config.noop_fraction) < 0.01
    assert len(data.train) == config.num_rules and len(data.heldout) == config.num_heldout_rules


def test_occurrence_counts_cover_the_range_and_positions_vary():
    data = generate_rewrites(SMALL)
    counts, first_pos = np.zeros(SMALL.max_occurrences + 1, int), []
    for task in data.train:
        x = task.metadata["x"]
        for inst in task.instances:
            n = _occurrences(x, inst.input)
            counts[n] += 1
            if n:
                first_pos.append(inst.input.find(x))
    assert all(counts[1:] > 0.2 * counts[1:].sum() / SMALL.max_occurrences)  # every count 1..3 well represented
    assert len(set(first_pos)) > 10 and 0 < np.mean(first_pos) < SMALL.z_len[1]  # x is not always up front


def test_power_law_counts():
    counts = rule_counts(SKEWED)
    assert sum(counts) == SKEWED.num_rules * SKEWED.examples_per_rule and min(counts) >= 1
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert counts[0] / counts[9] == pytest.approx(10 ** SKEWED.exponent, rel=0.05)
    tasks = generate_rewrites(SKEWED).train
    assert [len(t.instances) for t in tasks] == counts
    assert rule_counts(RewriteConfig(num_rules=5, examples_per_rule=7)) == [7] * 5


def test_heldout_rules_are_unseen():
    data = generate_rewrites(SMALL)
    train = {(t.metadata["x"], t.metadata["y"]) for t in data.train}
    heldout = {(t.metadata["x"], t.metadata["y"]) for t in data.heldout}
    assert len(train) == SMALL.num_rules and len(heldout) == SMALL.num_heldout_rules and not train & heldout
    assert [t.name for t in data.heldout][:2] == ["rule00300", "rule00301"] and data.train[42].name == "rule00042"
    assert all(t.metadata["heldout"] for t in data.heldout) and not any(t.metadata["heldout"] for t in data.train)
    tasks = load_tasks("rewrite", None, part="test", rewrite_config=SMALL)
    assert list(tasks) == sorted(t.name for t in data.heldout)
    assert len(load_tasks("rewrite", None, rewrite_config=SMALL)) == SMALL.num_rules + SMALL.num_heldout_rules


def test_deterministic_per_seed():
    first = pickle.dumps(generate_rewrites(SKEWED))
    generate_rewrites.cache_clear()
    assert pickle.dumps(generate_rewrites(SKEWED)) == first  # regenerated, byte for byte
    other = generate_rewrites(RewriteConfig(**{**SKEWED.__dict__, "seed": SKEWED.seed + 1}))
    assert pickle.dumps(other) != first
    assert [i.input for i in other.train[0].instances] != [i.input for i in generate_rewrites(SKEWED).train[0].instances]


def test_model_input_format_and_rule():
    assert rewrite_model_input("ab", "c", "xabyab") == "ab|c|xabyab="
    assert apply_rule("ab", "c", "xabyab") == "xcyab" and apply_rule("q", "c", "xaby") == "xaby"


def test_invalid_configs_name_the_field():
    with pytest.raises(ConfigError, match="alphabet may not contain"):
        RewriteConfig(alphabet="ab|")
    with pytest.raises(ConfigError, match=r"asks for 11 distinct rules .* allow only 10"):  # 2 x * 6 y - 2 with x == y
        RewriteConfig(alphabet="ab", x_len=(1, 1), y_len=(1, 2), num_rules=9, num_heldout_rules=2)
    with pytest.raises(ConfigError, match="frequency"):
        RewriteConfig(frequency="zipf")
    with pytest.raises(ConfigError, match="z_len"):
        RewriteConfig(x_len=(1, 5), z_len=(3, 9))


def test_thousands_of_rules_are_fast():
    config = RewriteConfig(num_rules=2000, examples_per_rule=100, num_heldout_rules=100, seed=11)
    start = time.process_time()
    data = generate_rewrites(config)
    cpu = time.process_time() - start
    assert sum(len(t.instances) for t in data.train) == 200_000
    assert cpu < 6.0, f"{cpu:.2f} s CPU for 210k examples"  # ~1 s CPU on an unloaded core
    noops, total = _check_every_example(config, data)
    assert total == 210_000 and noops == round(0.1 * 200_000) + round(0.1 * 10_000)


def test_fresh_training_rule_tasks_are_seen_rules_with_new_inputs():
    from jaxlm.data.string_rewrite import (
        RewriteConfig,
        apply_rule,
        fresh_training_rule_tasks,
        rewrite_tasks,
    )

    config = RewriteConfig(alphabet="abcdefghij", z_len=(6, 10), num_rules=20, examples_per_rule=5, num_heldout_rules=2)
    train = rewrite_tasks(config, part="train")
    fresh = fresh_training_rule_tasks(config, [0, 7, 19], examples=6)
    assert [t.name for t in fresh] == [train[r].name for r in (0, 7, 19)]
    for t, r in zip(fresh, (0, 7, 19)):
        assert (t.metadata["x"], t.metadata["y"], t.metadata["rule_index"]) == (train[r].metadata["x"], train[r].metadata["y"], r)
        assert len(t.instances) == 6
        assert all(i.outputs == (apply_rule(t.metadata["x"], t.metadata["y"], i.input),) for i in t.instances)
    seen_inputs = {i.input for t in train for i in t.instances}
    assert sum(i.input not in seen_inputs for t in fresh for i in t.instances) >= 15  # mostly new strings
    assert fresh == fresh_training_rule_tasks(config, [0, 7, 19], examples=6)  # deterministic


def test_heldout_fresh_inputs_are_the_same_rules_on_other_inputs():
    """part="test_fresh": what a per-rule oracle teacher trains on so it is scored on unseen inputs."""
    from jaxlm.data.string_rewrite import apply_rule, rewrite_tasks

    test, fresh = rewrite_tasks(SMALL, part="test"), rewrite_tasks(SMALL, part="test_fresh")
    assert [t.name for t in fresh] == [t.name for t in test]
    for a, b in zip(test, fresh):
        assert (a.metadata["x"], a.metadata["y"]) == (b.metadata["x"], b.metadata["y"])
        assert not {i.input for i in a.instances} & {i.input for i in b.instances}
        assert SMALL.examples_per_rule - 3 <= len(b.instances) <= SMALL.examples_per_rule
        assert all(i.outputs[0] == apply_rule(b.metadata["x"], b.metadata["y"], i.input) for i in b.instances)
    assert rewrite_tasks(SMALL, part="test_fresh")[0].instances == fresh[0].instances  # deterministic
