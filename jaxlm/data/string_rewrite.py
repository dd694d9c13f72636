"""Synthetic string-rewrite tasks for instruction-diversity studies.

A rule (x, y) means "replace the leftmost occurrence of x in z by y; copy z when x does not occur"
(`apply_rule`). The study trains a small model from scratch on N rules with a few examples each and
tests it on rules it never saw, so the generator controls exactly what the study varies:
  num_rules, examples_per_rule   how many distinct instructions, and the total example budget
                                 (num_rules * examples_per_rule, fixed whatever the frequency law);
  frequency, exponent            "uniform": every rule gets examples_per_rule examples; "power_law": the
                                 rule of rank r (0-based) gets a share proportional to (r + 1) ** -exponent
                                 of the same total, at least 1 each (largest-remainder rounding, so the
                                 counts never increase with rank and sum exactly to the total);
  noop_fraction                  the fraction of examples whose z does not contain x (exactly
                                 round(noop_fraction * total) of them, spread at random over rules);
  max_occurrences                the number of (overlapping-counted) occurrences of x in every other z,
                                 uniform in [1, max_occurrences] and capped by len(z) // len(x);
  num_heldout_rules              rules for testing: distinct from every training rule (no (x, y) pair in
                                 both), heldout_examples_per_rule examples each (default examples_per_rule).
x, y, z lengths are uniform in their inclusive ranges and characters uniform over `alphabet`; each z is
conditioned on its exact occurrence count by rejection (k copies of x planted at random positions in
uniform filler, re-drawn while x also occurs elsewhere), so nothing in the filler tells where x is.
Examples a small alphabet keeps rejecting (after 4 rounds) get filler that never completes x (the
exact conditional distribution when len(x) == 1, close to it otherwise). A rule never has x == y.

Determinism: one config gives byte-identical output: numpy PCG64 streams keyed by (seed, purpose)
(rules; training/held-out no-op choice; training/held-out strings), all examples drawn in one
vectorized pass per round, so a few thousand rules x a hundred examples take about a second.

Model input (the from-scratch model reads the rule, not English): `rewrite_model_input(x, y, z)` is
"x|y|z=" and the target is the rewritten z, e.g. "ab|c|xaby=" -> "xcy". The alphabet may therefore not
contain "|" or "=". As TaskData (what the seqio tasks and prompt formats consume) a rule is a task named
`rule00042` (training rules 0..num_rules-1, held-out rules numbered after them) whose definition is
`Replace the leftmost "ab" with "c".` and whose instances have input z and outputs (rewritten z,);
`metadata` holds x, y, heldout and rule_index.
"""

from __future__ import annotations

import functools
import gc
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxlm.data.schema import Instance, TaskData
from jaxlm.errors import ConfigError, UsageError

SEPARATOR = "|"
QUERY_END = "="
FREQUENCIES = ("uniform", "power_law")
_MAX_ROUNDS = 200  # rejection rounds before a config is declared infeasible
_UNIFORM_ROUNDS = 4  # rounds of uniform filler before switching to x-avoiding filler


def apply_rule(x: str, y: str, z: str) -> str:
    """Replace the leftmost occurrence of x in z by y; z unchanged when x does not occur."""
    if not x:
        raise ValueError("rewrite rule needs a non-empty x")
    return z.replace(x, y, 1)


def rewrite_model_input(x: str, y: str, z: str) -> str:
    """The raw model input "x|y|z=" (rule, then string, then the query mark the target follows)."""
    return f"{x}{SEPARATOR}{y}{SEPARATOR}{z}{QUERY_END}"


def rule_text(x: str, y: str) -> str:
    """The rule as a from-scratch model reads it: "x|y" (the prefix of every model input)."""
    return f"{x}{SEPARATOR}{y}"


def rule_definition(x: str, y: str) -> str:
    return f'Replace the leftmost "{x}" with "{y}".'


def count_occurrences(x: str, z: str) -> int:
    """Occurrences of x in z, overlapping ones included ("aa" occurs twice in "aaa")."""
    n, start = 0, z.find(x)
    while start != -1:
        n += 1
        start = z.find(x, start + 1)
    return n


@dataclass(frozen=True)
class RewriteConfig:
    """What a diversity study varies (see the module docstring); ranges are inclusive (lo, hi)."""

    alphabet: str = "abcdefghijklmnopqrstuvwxyz"
    x_len: tuple[int, int] = (1, 3)
    y_len: tuple[int, int] = (1, 3)
    z_len: tuple[int, int] = (8, 20)
    num_rules: int = 1000
    examples_per_rule: int = 20
    num_heldout_rules: int = 100
    heldout_examples_per_rule: int | None = None
    frequency: str = "uniform"
    exponent: float = 1.0
    noop_fraction: float = 0.1
    max_occurrences: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("x_len", "y_len", "z_len"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        a = self.alphabet
        if len(a) < 2 or len(set(a)) != len(a):
            raise ConfigError(f"RewriteConfig.alphabet must have at least 2 distinct characters, got {a!r}")
        if SEPARATOR in a or QUERY_END in a:
            raise ConfigError(f"RewriteConfig.alphabet may not contain {SEPARATOR!r} or {QUERY_END!r} (model input separators)")
        for name, low in (("x_len", 1), ("y_len", 0), ("z_len", 1)):
            rng = getattr(self, name)
            if len(rng) != 2 or rng[0] < low or rng[0] > rng[1]:
                raise ConfigError(f"RewriteConfig.{name} must be (lo, hi) with {low} <= lo <= hi, got {rng}")
        if self.z_len[0] < self.x_len[1]:
            raise ConfigError(f"RewriteConfig.z_len {self.z_len} must start at >= x_len's max {self.x_len[1]} "
                              "so every z can hold an x")
        if self.num_rules < 1 or self.num_heldout_rules < 0:
            raise ConfigError(f"RewriteConfig.num_rules must be >= 1 and num_heldout_rules >= 0, got "
                              f"{self.num_rules}, {self.num_heldout_rules}")
        if self.examples_per_rule < 1 or (self.heldout_examples_per_rule is not None and self.heldout_examples_per_rule < 1):
            raise ConfigError("RewriteConfig.examples_per_rule and heldout_examples_per_rule must be >= 1")
        if self.frequency not in FREQUENCIES:
            raise ConfigError(f"RewriteConfig.frequency must be one of {FREQUENCIES}, got {self.frequency!r}")
        if self.frequency == "power_law" and not self.exponent >= 0:
            raise ConfigError(f"RewriteConfig.exponent must be >= 0, got {self.exponent}")
        if not 0.0 <= self.noop_fraction <= 1.0:
            raise ConfigError(f"RewriteConfig.noop_fraction must be in [0, 1], got {self.noop_fraction}")
        if self.max_occurrences < 1:
            raise ConfigError(f"RewriteConfig.max_occurrences must be >= 1, got {self.max_occurrences}")
        wanted, space = self.num_rules + self.num_heldout_rules, self.rule_space()
        if wanted > space:
            raise ConfigError(f"RewriteConfig asks for {wanted} distinct rules (num_rules + num_heldout_rules) but "
                              f"alphabet/x_len/y_len allow only {space}")

    def rule_space(self) -> int:
        """How many distinct rules (x, y), x != y, the alphabet and lengths allow."""
        a = len(self.alphabet)
        xs = [a ** n for n in range(self.x_len[0], self.x_len[1] + 1)]
        ys = [a ** n for n in range(self.y_len[0], self.y_len[1] + 1)]
        same = sum(a ** n for n in range(max(self.x_len[0], self.y_len[0]), min(self.x_len[1], self.y_len[1]) + 1))
        return sum(xs) * sum(ys) - same

    @property
    def heldout_examples(self) -> int:
        return self.heldout_examples_per_rule or self.examples_per_rule


@dataclass(frozen=True)
class RewriteData:
    """Generated rules as tasks: `train` (one per training rule, by index) and `heldout` (unseen rules)."""

    config: RewriteConfig
    train: list[TaskData] = field(default_factory=list)
    heldout: list[TaskData] = field(default_factory=list)


# ----------------------------------------------------------------------------- sampling

def _rng(config: RewriteConfig, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, *key])))


def _strings(rng: np.random.Generator, chars: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Uniform random strings of the given lengths (one draw for all characters)."""
    flat = "".join(chars[rng.integers(0, len(chars), int(lengths.sum()))].tolist())
    ends = np.cumsum(lengths).tolist()
    return [flat[e - n:e] for e, n in zip(ends, lengths.tolist())]


def _lengths(rng: np.random.Generator, span: tuple[int, int], n: int) -> np.ndarray:
    return rng.integers(span[0], span[1] + 1, n)


def sample_rules(config: RewriteConfig) -> list[tuple[str, str]]:
    """num_rules + num_heldout_rules distinct (x, y) pairs, x != y, in sampling order."""
    rng, chars = _rng(config, 0), np.array(list(config.alphabet))
    wanted, rules, seen = config.num_rules + config.num_heldout_rules, [], set()
    for _ in range(_MAX_ROUNDS * 10):
        n = max(2 * (wanted - len(rules)), 64)
        xs = _strings(rng, chars, _lengths(rng, config.x_len, n))
        ys = _strings(rng, chars, _lengths(rng, config.y_len, n))
        for rule in zip(xs, ys):
            if rule[0] != rule[1] and rule not in seen:
                seen.add(rule)
                rules.append(rule)
                if len(rules) == wanted:
                    return rules
    raise ConfigError(f"RewriteConfig: could not draw {wanted} distinct rules from a space of {config.rule_space()}; "
                      "use fewer rules or a larger alphabet/length range")


def rule_counts(config: RewriteConfig) -> list[int]:
    """Examples per training rule: uniform, or power law in rank at the same total (>= 1 each)."""
    n, total = config.num_rules, config.num_rules * config.examples_per_rule
    if config.frequency == "uniform":
        return [config.examples_per_rule] * n
    weights = np.arange(1, n + 1, dtype=np.float64) ** -float(config.exponent)
    share = weights / weights.sum() * (total - n)
    counts = np.floor(share).astype(np.int64)
    order = np.lexsort((np.arange(n), -(share - counts)))  # largest remainder first, ties by rank
    counts[order[: (total - n) - int(counts.sum())]] += 1
    return (counts + 1).tolist()


def _has_border(x: str) -> bool:
    """Whether a proper prefix of x is also its suffix (then copies of x can overlap, as in "aa", "aba")."""
    return any(x[:i] == x[-i:] for i in range(1, len(x)))


def _avoiding_filler(rng: np.random.Generator, alphabet: str, x: str, length: int) -> str:
    """A random string in which x never completes: at each position the one character that would finish
    an occurrence of x is excluded (exactly uniform over x-free strings when len(x) == 1)."""
    head, last = x[:-1], x[-1]
    without_last = alphabet.replace(last, "")
    out: list[str] = []
    for r in rng.random(length).tolist():
        choices = without_last if "".join(out[-len(head):]) == head or not head else alphabet
        out.append(choices[int(r * len(choices))])
    return "".join(out)


def _sample_strings(config: RewriteConfig, xs: list[str], noop: np.ndarray, stream: int) -> list[str]:
    """One z per example: example i holds no x_i (noop) or exactly k_i planted, overlapping-counted copies.

    All examples are drawn together (numpy for lengths, counts, characters and positions; Python only to
    splice strings), then the rejected ones (x also occurs in the filler) are re-drawn. After
    `_UNIFORM_ROUNDS` rounds the remaining ones (small alphabets, where uniform filler almost always
    contains x) get `_avoiding_filler` filler instead; a borderless x is then always accepted.
    """
    rng, chars, alphabet = _rng(config, stream, 1), np.array(list(config.alphabet)), config.alphabet
    m = config.max_occurrences
    lens_x = np.array([len(x) for x in xs], dtype=np.int64)
    border_of = {x: _has_border(x) for x in set(xs)}
    bordered = [border_of[x] for x in xs]
    out: list[str | None] = [None] * len(xs)
    pending = np.arange(len(xs))
    for round_ in range(_MAX_ROUNDS):
        n = len(pending)
        lx = lens_x[pending]
        lengths = _lengths(rng, config.z_len, n)
        ks = np.minimum(rng.integers(1, m + 1, n), lengths // lx)
        ks[noop[pending]] = 0
        filler_len = lengths - ks * lx
        if round_ < _UNIFORM_ROUNDS:
            fillers = _strings(rng, chars, filler_len)
        else:
            fillers = [_avoiding_filler(rng, alphabet, xs[i], fl) for i, fl in zip(pending.tolist(), filler_len.tolist())]
        positions = np.floor(rng.random((n, m)) * (filler_len + 1)[:, None]).astype(np.int64)
        positions[np.arange(m)[None, :] >= ks[:, None]] = np.iinfo(np.int64).max
        positions.sort(axis=1)
        rejected = []
        for i, k, filler, pos in zip(pending.tolist(), ks.tolist(), fillers, positions.tolist()):
            x = xs[i]
            if k == 0:
                z = filler
            elif k == 1:
                z = filler[:pos[0]] + x + filler[pos[0]:]
            else:
                cuts = [0, *pos[:k], len(filler)]
                z = x.join(filler[a:b] for a, b in itertools.pairwise(cuts))
            if (count_occurrences(x, z) if bordered[i] else z.count(x)) == k:
                out[i] = z
            else:
                rejected.append(i)
        if not rejected:
            return out  # type: ignore[return-value]
        pending = np.array(rejected, dtype=np.int64)
    raise ConfigError(f"RewriteConfig: could not place x={xs[int(pending[0])]!r} an exact number of times in a z of "
                      f"length {config.z_len} over alphabet {alphabet!r}; use a larger alphabet or longer z")


def _tasks(config: RewriteConfig, rules: list[tuple[str, str]], counts: list[int], first_index: int, heldout: bool,
           stream: int) -> tuple[TaskData, ...]:
    """One task per rule, `counts[r]` examples each, round(noop_fraction * total) of them no-ops."""
    total = sum(counts)
    noop = np.zeros(total, dtype=bool)
    noop[_rng(config, stream).choice(total, size=round(config.noop_fraction * total), replace=False)] = True
    owner = np.repeat(np.arange(len(rules)), counts).tolist()
    zs = _sample_strings(config, [rules[r][0] for r in owner], noop, stream)
    tasks, start = [], 0
    for r, ((x, y), count) in enumerate(zip(rules, counts)):
        index = first_index + r
        name = f"rule{index:05d}"
        chunk = zs[start:start + count]
        instances = tuple(Instance(id=f"{name}-{j}", input=z, outputs=(z.replace(x, y, 1),))
                          for j, z in enumerate(chunk))
        tasks.append(TaskData(name=name, source="rewrite", definition=rule_definition(x, y), instances=instances,
                              metadata={"x": x, "y": y, "rule_index": index, "heldout": heldout,
                                        "noop_examples": int(noop[start:start + count].sum())}))
        start += count
    return tuple(tasks)


@functools.lru_cache(maxsize=8)
def _generate(config: RewriteConfig) -> tuple[tuple[TaskData, ...], tuple[TaskData, ...]]:
    rules = sample_rules(config)
    n = config.num_rules
    # Hundreds of thousands of small immutable objects: the cyclic GC would rescan them over and over
    # (it doubled the run time); none of them can form a cycle, so pause it while they are built.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        train = _tasks(config, rules[:n], rule_counts(config), 0, False, stream=2)
        heldout = _tasks(config, rules[n:], [config.heldout_examples] * config.num_heldout_rules, n, True, stream=3)
    finally:
        if was_enabled:
            gc.enable()
    return train, heldout


def generate_rewrites(config: RewriteConfig | None = None) -> RewriteData:
    """Training and held-out rule tasks for `config` (default `RewriteConfig()`); cached per config."""
    config = config or RewriteConfig()
    if not isinstance(config, RewriteConfig):
        raise ConfigError(f"expected a RewriteConfig, got {type(config).__name__}")
    train, heldout = _generate(config)
    return RewriteData(config=config, train=list(train), heldout=list(heldout))


generate_rewrites.cache_clear = _generate.cache_clear  # type: ignore[attr-defined]


REWRITE_PARTS = ("train", "test", "test_fresh")


def rewrite_tasks(config: RewriteConfig | None, *, part: str | None = None) -> list[TaskData]:
    """The tasks of one part: "train" (training rules), "test" (held-out rules), None (both), or
    "test_fresh" (`heldout_fresh_tasks`: the held-out rules with other inputs, to train per-rule teachers
    that are then scored on "test")."""
    if part not in (None, *REWRITE_PARTS):
        raise UsageError(f"rewrite part {part!r} is unknown; expected train (seen rules), test (held-out rules) "
                         "or test_fresh (held-out rules, inputs disjoint from test's)")
    if part == "test_fresh":
        return heldout_fresh_tasks(config or RewriteConfig())
    data = generate_rewrites(config)
    return {"train": data.train, "test": data.heldout, None: data.train + data.heldout}[part]


def heldout_fresh_tasks(config: RewriteConfig, examples: int | None = None, stream: int = 8) -> list[TaskData]:
    """The held-out rules with `examples` (default `examples_per_rule`) NEW inputs each, drawn from another
    random stream and never equal to one of the rule's "test" inputs: what a per-rule teacher (an oracle
    with the rule's data) is trained on so that it is scored on inputs it has not seen.

    Returns:
      One task per held-out rule, in "test" order and with its names and metadata; a task may hold a few
      fewer than `examples` instances (draws equal to a test input are dropped).
    """
    import dataclasses

    heldout = generate_rewrites(config).heldout
    count = config.examples_per_rule if examples is None else examples
    rules = [(t.metadata["x"], t.metadata["y"]) for t in heldout]
    fresh = _tasks(config, rules, [count] * len(rules), config.num_rules, True, stream)
    out = []
    for test, new in zip(heldout, fresh):
        seen = {i.input for i in test.instances}
        kept = tuple(dataclasses.replace(i, id=f"{test.name}-fresh-{j}") for j, i in
                     enumerate(x for x in new.instances if x.input not in seen))
        noop = sum(i.outputs[0] == i.input for i in kept)
        out.append(dataclasses.replace(test, instances=kept, metadata={**test.metadata, "noop_examples": noop}))
    return out


def fresh_training_rule_tasks(config: RewriteConfig, ranks: list[int], examples: int, stream: int = 7) -> list[TaskData]:
    """Training rules `ranks` with `examples` NEW inputs each, drawn like training inputs from another
    random stream (training uses 2, held-out 3): seen rules, mostly unseen strings (a short z can repeat
    a training row). Tasks keep their training names and rule indices."""
    import dataclasses

    if any(not 0 <= r < config.num_rules for r in ranks):
        raise UsageError(f"fresh_training_rule_tasks: ranks must lie in [0, {config.num_rules}), got {ranks}")
    rules = sample_rules(config)
    fresh = _tasks(config, [rules[r] for r in ranks], [examples] * len(ranks), 0, False, stream)
    return [dataclasses.replace(t, name=f"rule{r:05d}", metadata={**t.metadata, "rule_index": r})
            for t, r in zip(fresh, ranks)]


def model_examples(task: TaskData) -> list[dict[str, Any]]:
    """A rule task's examples in the raw model form: {"inputs": "x|y|z=", "targets": rewritten z}."""
    x, y = task.metadata["x"], task.metadata["y"]
    return [{"inputs": rewrite_model_input(x, y, i.input), "targets": i.outputs[0]} for i in task.instances]
