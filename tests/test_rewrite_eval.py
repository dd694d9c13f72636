"""The rewrite-study evaluator (jaxlm/eval/rewrite.py) and the cross-row context of packed training
rows it relies on for ICIL-style prompts (LanguageModel.context_across_rows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data.string_rewrite import RewriteConfig, rewrite_tasks
from jaxlm.errors import UsageError
from jaxlm.eval import rewrite
from jaxlm.models.llama import LlamaConfig

CONFIG = RewriteConfig(alphabet="abcd", num_rules=12, examples_per_rule=4, num_heldout_rules=3,
                       heldout_examples_per_rule=2)


def _bytes(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def test_prompt_ids_per_method():
    task = rewrite_tasks(CONFIG, part="test")[0]
    x, y = task.metadata["x"], task.metadata["y"]
    demos = rewrite.icil_demos(rewrite_tasks(CONFIG, part="train"), k=2, seed=3)
    assert len({tuple(d[0].split("|")[:2]) for d in demos}) == 2  # two distinct rules
    assert demos == rewrite.icil_demos(rewrite_tasks(CONFIG, part="train"), k=2, seed=3)  # fixed by seed
    z = "abca"
    assert rewrite.prompt_ids("no_instruction", task, z) == _bytes("abca=")
    assert rewrite.prompt_ids("hypernet", task, z) == _bytes("abca=")
    assert rewrite.prompt_ids("in_context", task, z) == _bytes(f"{x}|{y}|abca=")
    expected = []
    for inputs, target in demos:
        expected += _bytes(inputs + target) + [1]  # solved rows joined by EOS, as packed training rows
    assert rewrite.prompt_ids("icil", task, z, demos) == expected + _bytes(f"{x}|{y}|abca=")
    with pytest.raises(UsageError, match="k=20"):
        rewrite.icil_demos(rewrite_tasks(CONFIG, part="train"), k=20)


class _Oracle:
    """An engine stub answering every prompt with the rule applied (exposes what evaluate_method scores)."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, max_new_tokens, lora=None, adapter_index=None):
        from jaxlm.eval.engine import GenerateResult

        return [GenerateResult(_bytes(self.answer(p))) for p in prompts]

    def score(self, examples, lora=None, adapter_index=None):
        from jaxlm.eval.engine import ScoreResult

        return [ScoreResult(-2.0 * len(t), len(t), [-2.0] * len(t)) for _, t in examples]


def test_evaluate_method_counts_exact_matches():
    from jaxlm.data.string_rewrite import apply_rule

    tasks = rewrite_tasks(CONFIG, part="test")
    gold = {inst.input: apply_rule(t.metadata["x"], t.metadata["y"], inst.input) for t in tasks for inst in t.instances}
    decode = lambda ids: bytes(i - 3 for i in ids).decode()
    first = tasks[0].instances[0].input
    # Right on every instance except the first: 5 of 6.
    engine = _Oracle(lambda p: gold[decode(p).split("|")[-1][:-1]] if decode(p).split("|")[-1][:-1] != first else "x")
    scores = rewrite.evaluate_method(engine, tasks, "in_context")
    assert scores.exact_match == pytest.approx(100 * 5 / 6)
    assert scores.target_nll == pytest.approx(2.0)
    assert [p["correct"] for p in scores.predictions] == [False] + [True] * 5
    with pytest.raises(UsageError, match="needs adapters"):
        rewrite.evaluate_method(engine, tasks, "hypernet")


def test_context_across_rows_attends_over_packed_rows():
    from jaxlm.train.objectives import CausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64)
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 0]])
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
    positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0]])
    batch = {"decoder_input_tokens": tokens, "decoder_segment_ids": segments, "decoder_positions": positions}
    block = CausalLM(model_config=config)
    across = CausalLM(model_config=config, context_across_rows=True)
    params, _ = block.init(jax.random.PRNGKey(0))
    plain = block.model.apply({"params": params}, tokens[:, :7])  # one causal row, positions 0..6
    got = across.logits(params, batch, None)
    np.testing.assert_allclose(got[:, :7], plain, atol=1e-5)
    blocked = block.logits(params, batch, None)
    np.testing.assert_allclose(blocked[:, :3], plain[:, :3], atol=1e-5)  # first row: same either way
    assert float(jnp.abs(blocked[:, 3:7] - plain[:, 3:7]).max()) > 1e-3  # second row sees only itself
