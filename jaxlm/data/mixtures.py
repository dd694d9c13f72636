"""seqio Mixtures of registered tasks: the rate schemes of instruction tuning, and the string-rewrite
diversity mixture.

Rate schemes (`rate=`), over each task's number of examples n in the split:
  "proportional"  examples-proportional with a cap (T5): rate = min(n, cap)  (cap=None: no cap)
  "uniform"       every task 1.0
  "temperature"   rate = min(n, cap) ** (1 / temperature)  (T5's temperature scaling; T=1 = proportional)
  a mapping       explicit {task name: weight}; every task of the mixture must have one
Rates are stored normalised (they sum to 1), so a Mixture's `get_rate` is the sampling probability.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS
from jaxlm.data.batches import MixtureBatches, build_mixture_batches, materialize_task
from jaxlm.data.tf_corner import import_seqio
from jaxlm.errors import UsageError

seqio = import_seqio()

RATE_SCHEMES = ("proportional", "uniform", "temperature")
Rate = Union[str, Mapping[str, float]]


def num_examples(task_name: str, split: str = "train") -> int:
    """Examples of a registered task in a split (jaxlm tasks record it at registration)."""
    task = seqio.TaskRegistry.get(task_name)
    n = task.num_input_examples(split)
    if n is None:
        n = materialize_task(task_name, split).num_examples
    return int(n)


def mixture_rates(
    task_names: Sequence[str],
    rate: Rate = "proportional",
    *,
    cap: int | None = None,
    temperature: float = 1.0,
    split: str = "train",
) -> dict[str, float]:
    """{task: normalised rate} under one of the schemes above."""
    if not task_names:
        raise UsageError("a mixture needs at least one task")
    if isinstance(rate, Mapping):
        missing = [t for t in task_names if t not in rate]
        if missing:
            raise UsageError(f"explicit mixture weights miss tasks {missing[:5]}")
        raw = {t: float(rate[t]) for t in task_names}
    elif rate == "uniform":
        raw = {t: 1.0 for t in task_names}
    elif rate in ("proportional", "temperature"):
        if cap is not None and cap < 1:
            raise UsageError(f"mixture rate cap must be at least 1, got {cap}")
        if temperature <= 0:
            raise UsageError(f"mixture temperature must be positive, got {temperature}")
        power = 1.0 / temperature if rate == "temperature" else 1.0
        sizes = {t: num_examples(t, split) for t in task_names}
        raw = {t: float(min(n, cap) if cap else n) ** power for t, n in sizes.items()}
    else:
        raise UsageError(f"mixture rate {rate!r}: expected one of {RATE_SCHEMES} or a {{task: weight}} mapping")
    if any(r < 0 for r in raw.values()) or sum(raw.values()) <= 0:
        raise UsageError(f"mixture rates must be non-negative with a positive sum, got {raw}")
    total = sum(raw.values())
    return {t: r / total for t, r in raw.items()}


def mixture_from_tasks(
    name: str,
    task_names: Sequence[str],
    rate: Rate = "proportional",
    *,
    cap: int | None = None,
    temperature: float = 1.0,
    split: str = "train",
) -> seqio.Mixture:
    """Register (replacing any previous one of that name) a seqio Mixture of registered tasks."""
    unknown = [t for t in task_names if t not in seqio.TaskRegistry.names()]
    if unknown:
        raise UsageError(f"mixture {name!r}: tasks not registered: {unknown[:5]} (register_tasks first)")
    rates = mixture_rates(task_names, rate, cap=cap, temperature=temperature, split=split)
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(rates.items()))


def register_rewrite_mixture(
    config: Any,
    *,
    part: str = "train",
    vocabulary: Any = None,
    rate: Rate = "proportional",
    name: str | None = None,
) -> str:
    """The instruction-diversity mixture: one seqio task per rewrite rule of `config` (N rules, skewed
    example counts per `config`), mixed examples-proportionally by default so rule frequencies follow
    the config's skew. Returns the mixture name (`rewrite_mix:<part>:<config digest>` unless `name`)."""
    import hashlib

    from jaxlm.data.tasks import register_tasks
    from jaxlm.data.vocab import byte_vocabulary

    names = register_tasks("rewrite", None, vocabulary=vocabulary or byte_vocabulary(), part=part, rewrite_config=config)
    digest = hashlib.sha1(repr(config).encode()).hexdigest()[:10]
    name = name or f"rewrite_mix:{part}:{digest}"
    split = "train" if part == "train" else "test"
    mixture_from_tasks(name, names, rate, split=split)
    return name


def rewrite_batches(
    config: Any,
    *,
    batch_size: int,
    layout: str = "decoder_only",
    max_input_len: int = 256,
    max_target_len: int = 128,
    buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    pack: bool = False,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    part: str = "train",
    vocabulary: Any = None,
    rate: Any = "proportional",
) -> MixtureBatches:
    """Register a string-rewrite diversity mixture from a `RewriteConfig` and batch it (byte vocab by default).

    part "train": the training rules; "test": the held-out rules (e.g. to score unseen rules)."""
    name = register_rewrite_mixture(config, part=part, vocabulary=vocabulary, rate=rate)
    return build_mixture_batches(
        name, batch_size=batch_size, layout=layout, max_input_len=max_input_len, max_target_len=max_target_len,
        buckets=buckets, pack=pack, seed=seed, shard_index=shard_index, num_shards=num_shards,
        split="train" if part == "train" else "test",  # held-out rules are registered as test tasks
    )
