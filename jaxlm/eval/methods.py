"""Evaluation methods: how one task's instances become model queries, and what counts as the answer.

Each method turns the evaluated instances of one task into prompts (with the builders of
`jaxlm.data.prompts`, `icil` and `crosstask`, never re-written here) and asks the engine once per
batch of prompts: greedy generation (stop at a blank line) for free-form instances, rank
classification over the answer options for multiple-choice ones (BIG-bench `target_scores`, BBH with
parsed options).

Methods (gin-configurable; `name` labels the rows of a sweep's tables)
  Prompted(fmt)      one `format_prompt` format: zero-shot `def`, Tk-Instruct `def_pos2`, BIG-bench
                     `bigbench`, or `none` (the input alone). A task without positive examples
                     (BIG-bench, BBH) takes def_pos2's two examples from its labelled pool (seed 0).
  FewShot(k)         k in-task demonstrations: the task's positive examples when it has k, else k
                     labelled instances from beyond the evaluated ones (seeded choice).
  ICIL(k)            the fixed ICIL demo set (training tasks only) for every task, predictions cut at
                     the first blank line. K is capped at what the data allows (`k_used` says which).
  CrossTask(sources) one most-similar labelled example of each source task in context; one
                     prediction per source, the main prediction their majority vote; the sweep also
                     reports the mean and the best over sources.
  PseudoLabels(...)  a few unlabelled target inputs labelled by majority vote over the sources'
                     one-shot predictions, then shown as in-task demos in every source's prompt.
  Adapter(...)       no instruction in the input; one LoRA per task: a teacher (`teachers/` dir from
                     `LoRATeachers.save_teachers`; or cross-fitted folds of teachers, each scored only on
                     instances it was not trained on) or generated from the instruction by a hypernetwork
                     (`jaxlm.checkpoints.hypernet.load_hypernet`, run once per task, cached on disk; a
                     decoder-only fusion hypernetwork also reads the instruction as a cached prefix).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np

from jaxlm.data import crosstask, icil, prompts
from jaxlm.data.schema import Demo, Instance, TaskData
from jaxlm.errors import ConfigError, DataError, UsageError
from jaxlm.models import lora as lora_lib

BLANK_LINE = "\n\n"
LINE = "\n"  # cross-task answers: the first non-empty line


@dataclasses.dataclass
class MethodOutput:
    """One task's answers: a record per evaluated instance (its "prediction" is the method's answer),
    plus, for methods with several sources, every source's own predictions."""

    records: list[dict[str, Any]]
    by_source: dict[str, list[str]] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalContext:
    """What every method needs: the engine, its tokenizer, token budgets, and where caches live.

    source_tasks: loads the tasks a method takes demonstrations from (`source`, `names`) -> {name: task};
    the sweep binds it to `jaxlm.data.sources.load_tasks` over its data directory.
    """

    engine: Any
    tokenizer: Any
    source_tasks: Callable[..., dict[str, TaskData]]
    max_source_length: int = prompts.MAX_SOURCE_LENGTH
    max_new_tokens: int = 32
    workdir: Path | None = None
    embedder: Any = None  # a CachedEmbedder; built on first use (cross-task retrieval)
    embed_cache_dir: Path | None = None
    rank_normalization: str = "sum"  # which option score picks the answer: sum, mean (per token), byte
    _stops: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from jaxlm.eval.engine import RANK_NORMALIZATIONS

        if self.rank_normalization not in RANK_NORMALIZATIONS:
            raise ConfigError(f"eval_sweep.rank_normalization {self.rank_normalization!r}: expected one of "
                              f"{RANK_NORMALIZATIONS}")

    # ------------------------------------------------------------------ text <-> tokens

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def prompt_ids(self, text: str, prefix_ids: Sequence[int] | None = None, keep_last: int | None = None) -> list[int]:
        """A prompt's token ids, cut by Tk-Instruct's rule (the first `max_source_length` tokens).

        Args:
          text: the prompt text; tokenized with the tokenizer's special tokens (a BOS where it adds
            one, as TAGI's batches prepend it to student rows).
          prefix_ids: token ids read before the prompt (a decoder-only fusion hypernetwork's
            instruction, as in its training), or None.
          keep_last: cut to the LAST `keep_last` tokens instead (the rule of jaxlm's training batches,
            for an adapter evaluated on inputs cut as it was trained), or None.

        Returns:
          prefix_ids (if any) + the text's ids, the latter cut to `max_source_length` first tokens
          (or `keep_last` last ones).
        """
        ids = self.tokenize(text)
        ids = ids[: self.max_source_length] if keep_last is None else ids[max(0, len(ids) - keep_last):]
        return [*(prefix_ids or ()), *ids]

    def get_embedder(self) -> Any:
        if self.embedder is None:
            from jaxlm.data.embedding_cache import CachedEmbedder

            self.embedder = CachedEmbedder(cache_dir=self.embed_cache_dir)
        return self.embedder

    # ------------------------------------------------------------------ model queries

    def stop_ids(self, stop: str) -> list[tuple[int, ...]]:
        """Token sequences that end a generation at `stop` (`engine.stop_token_sequences`, cached)."""
        if stop not in self._stops:
            from jaxlm.eval.engine import stop_token_sequences

            self._stops[stop] = stop_token_sequences(self.tokenizer, stop)
        return self._stops[stop]

    def answer(self, task: TaskData, instances: Sequence[Instance], texts: Sequence[str], *,
               stop: str = BLANK_LINE, lora: Any = None, prefix_ids: Sequence[int] | None = None,
               keep_last: int | None = None) -> list[dict[str, Any]]:
        """Answers `instances` from their prompts `texts`.

        Args:
          task: the task (record fields).
          instances: N instances; free-form ones are generated, multiple-choice ones rank-classified.
          texts: N prompt texts.
          stop: BLANK_LINE or LINE, where an answer is cut.
          lora: one adapter for every prompt, or None.
          prefix_ids, keep_last: see `prompt_ids`.

        Returns:
          N records ({"task", "id", "prompt", "prediction", "references"}, multiple choice also the
          option scores).

        One record per instance: generated (cut by `cut_at(text, stop)`) or, for multiple choice, the
        best-ranked option by `rank_normalization`; a multiple-choice record carries every option's
        summed log-prob ("option_logprobs"), per-token mean ("option_logprobs_mean") and per-UTF-8-byte
        score ("option_logprobs_per_byte", lm-evaluation-harness's acc_norm) side by side. Decoding itself stops at a blank line either way: a LINE answer may open
        with a newline ("Output: \\n yes"), so a token-level newline stop would end it empty.
        `prefix_ids` go before every prompt's tokens (`prompt_ids`); the engine's prefix cache computes
        them once."""
        records: list[dict[str, Any] | None] = [None] * len(instances)
        free = [i for i, inst in enumerate(instances) if not inst.is_multiple_choice]
        mc = [i for i, inst in enumerate(instances) if inst.is_multiple_choice]
        if free:
            outs = self.engine.generate([self.prompt_ids(texts[i], prefix_ids, keep_last) for i in free], self.max_new_tokens,
                                        self.stop_ids(BLANK_LINE), lora=lora)
            for i, out in zip(free, outs):
                text = self.tokenizer.decode(out.output_ids)
                records[i] = _record(task, instances[i], texts[i], cut_at(text, stop))
        if mc:
            scores = self.rank([texts[i] for i in mc], [instances[i].options for i in mc], lora=lora,
                               prefix_ids=prefix_ids, keep_last=keep_last)
            for i, s in zip(mc, scores):
                opts = instances[i].options
                ways = {"sum": [float(x) for x in s],
                        "mean": [float(x) / max(1, len(self.option_ids(o))) for x, o in zip(s, opts)],
                        "byte": [float(x) / max(1, len(o.encode("utf-8"))) for x, o in zip(s, opts)]}
                best = int(np.argmax(ways[self.rank_normalization]))
                records[i] = {**_record(task, instances[i], texts[i], opts[best]),
                              "options": list(opts), "option_logprobs": ways["sum"],
                              "option_logprobs_mean": ways["mean"], "option_logprobs_per_byte": ways["byte"],
                              "rank_normalization": self.rank_normalization,
                              "option_scores": list(instances[i].option_scores)}
        return records  # type: ignore[return-value]

    def rank(self, texts: Sequence[str], options: Sequence[Sequence[str]], lora: Any = None,
             prefix_ids: Sequence[int] | None = None, keep_last: int | None = None) -> list[list[float]]:
        """Sum log-prob of each option's tokens after its prompt (`Engine.rank_classify`).

        Args:
          texts: N prompt texts; options: N lists of option strings; lora: an adapter or None;
          prefix_ids, keep_last: see `prompt_ids`.

        Returns:
          N lists of summed option log-probs (nats).
        """
        inputs = [self.prompt_ids(t, prefix_ids, keep_last) for t in texts]
        option_ids = [[self.option_ids(o) for o in opts] for opts in options]
        return self.engine.rank_classify(inputs, option_ids, lora=lora)

    def option_ids(self, option: str) -> list[int]:
        """An answer option's target tokens (T5: with </s>)."""
        return self.tokenizer.encode(option, add_special_tokens=self.engine.pretrained.family == "t5")


def _record(task: TaskData, inst: Instance, prompt: str, prediction: str) -> dict[str, Any]:
    return {"task": task.name, "id": inst.id, "prompt": prompt, "prediction": prediction,
            "references": list(inst.outputs)}


def cut_at(text: str, stop: str) -> str:
    """The answer: up to ICIL's first blank line (BLANK_LINE), or the first non-empty line (LINE)."""
    if stop == BLANK_LINE:
        return icil.cut_at_blank_line(text)
    if stop == LINE:
        return next((line.strip() for line in text.splitlines() if line.strip()), "")
    raise ValueError(f"stop must be BLANK_LINE or LINE, got {stop!r}")


# ============================================================================ methods


class Method:
    """Base: `run(ctx, task, instances, pool, seed)` answers `instances`; `pool` holds the task's
    other labelled instances (never evaluated), a source of in-task demonstrations."""

    name: str = "method"
    seeded: bool = False  # whether `seed` changes the prompts (else a sweep runs seed 0 only)

    def run(self, ctx: EvalContext, task: TaskData, instances: Sequence[Instance], pool: Sequence[Instance],
            seed: int) -> MethodOutput:
        raise NotImplementedError


@gin.configurable
@dataclasses.dataclass
class Prompted(Method):
    """One prompt format of `jaxlm.data.prompts` (def, def_pos2, bigbench, none)."""

    fmt: str = "def"
    num_shots: int = 2
    name: str = ""

    def __post_init__(self) -> None:
        if self.fmt not in prompts.FORMATS or self.fmt in ("instruction", "fewshot"):
            raise ConfigError(f"Prompted.fmt {self.fmt!r}: use one of def, def_pos2, bigbench, none")
        self.name = self.name or self.fmt

    def run(self, ctx, task, instances, pool, seed):
        demos, info = None, {}
        if self.fmt == "def_pos2" and not task.positive_examples:  # BIG-bench/BBH: labelled pool instances
            demos = labelled_demos(task, pool, self.num_shots, seed)
            info = {"demos_from_pool": len(demos)}
        texts = [prompts.format_prompt(task, inst, self.fmt, num_shots=self.num_shots, demos=demos,
                                       count_tokens=ctx.count_tokens, max_source_length=ctx.max_source_length)
                 for inst in instances]
        return MethodOutput(ctx.answer(task, instances, texts), info=info)


def labelled_demos(task: TaskData, pool: Sequence[Instance], k: int, seed: int) -> list[Demo]:
    """k in-task demonstrations: the task's positive examples when it has k, else a seeded choice of
    labelled `pool` instances (fewer when the pool is short)."""
    if len(task.positive_examples) >= k:
        return list(task.positive_examples[:k])
    labelled = [inst for inst in pool if inst.outputs]
    chosen = random.Random(seed).sample(labelled, min(k, len(labelled)))
    return [Demo(inst.input, inst.outputs[0]) for inst in chosen]


@gin.configurable
@dataclasses.dataclass
class FewShot(Method):
    """k in-task demonstrations then the input (`format_prompt(..., 'fewshot')`), no definition."""

    k: int = 2
    name: str = "fewshot"
    seeded: bool = True

    def run(self, ctx, task, instances, pool, seed):
        demos = labelled_demos(task, pool, self.k, seed)
        texts = [prompts.format_prompt(task, inst, "fewshot", num_shots=self.k, demos=demos) for inst in instances]
        return MethodOutput(ctx.answer(task, instances, texts), info={"num_demos": len(demos)})


@gin.configurable
@dataclasses.dataclass
class ICIL(Method):
    """The fixed ICIL demonstration set (one per seed, from the Super-NI training tasks) for every task.

    The protocol's K = 8 needs 8 qualifying training tasks; with fewer on disk the largest K <= `k`
    the data allows is used, recorded as `k_used` in every result of the method.

    `demo_file` uses a published demonstration set instead of building one (the ICIL paper's
    `ICIL_seed{1..10}.json`, `{"demo": [K strings]}`, strings shown verbatim): a path, or a pattern
    with "{seed}" filled with each sweep seed (`eval_sweep.seeds = (1, 2, 3)` for the paper's seeds
    1-3). The first `k` demonstrations are used; a file with fewer is a ConfigError naming ICIL.k.
    """

    k: int = 8
    max_demo_tokens: int = 256
    train_source: str = "superni"
    demo_file: str | None = None
    name: str = "icil"
    seeded: bool = True
    _demos: dict = dataclasses.field(default_factory=dict, repr=False)

    def _published(self, seed: int) -> icil.ICILDemoSet:
        path = Path(self.demo_file.format(seed=seed) if "{seed}" in self.demo_file else self.demo_file)
        if not path.is_file():
            raise ConfigError(f"ICIL.demo_file={self.demo_file!r}: {path} does not exist (seed {seed})")
        full = icil.published_demo_set(path, seed=seed)
        if self.k > full.k:
            raise ConfigError(f"ICIL.k={self.k}: {path} holds {full.k} demonstrations")
        return icil.published_demo_set(path, seed=seed, k=self.k)

    def demo_set(self, ctx: EvalContext, seed: int) -> icil.ICILDemoSet:
        if seed not in self._demos and self.demo_file is not None:
            self._demos[seed] = self._published(seed)
            if ctx.workdir is not None:
                self._demos[seed].to_json(Path(ctx.workdir) / "icil" / f"seed{seed}.json")
        if seed not in self._demos:
            train = ctx.source_tasks(self.train_source, part="train")
            demos = None
            for k in range(self.k, 0, -1):  # the largest K the data allows
                try:
                    demos = icil.build_icil_demos(train, k=k, seed=seed, max_demo_tokens=self.max_demo_tokens,
                                                  count_tokens=ctx.count_tokens)
                    break
                except DataError:
                    continue
            if demos is None:
                raise DataError(f"ICIL: none of the {len(train)} {self.train_source} training tasks qualifies as a demo")
            if ctx.workdir is not None:
                demos.to_json(Path(ctx.workdir) / "icil" / f"seed{seed}.json")
            self._demos[seed] = demos
        return self._demos[seed]

    def run(self, ctx, task, instances, pool, seed):
        demos = self.demo_set(ctx, seed)
        texts = [icil.icil_prompt(demos, task, inst, max_tokens=ctx.max_source_length, count_tokens=ctx.count_tokens)
                 for inst in instances]
        return MethodOutput(ctx.answer(task, instances, texts, stop=BLANK_LINE),
                            info={"k_used": demos.k, "k_asked": self.k, "demo_tasks": demos.tasks})


def majority_votes(by_source: dict[str, list[str]]) -> list[str]:
    """Per instance, `crosstask.majority_vote` over the sources (in source order, so ties go to the first)."""
    columns = list(by_source.values())
    return [crosstask.majority_vote([col[i] for col in columns]) for i in range(len(columns[0]))]


@gin.configurable
@dataclasses.dataclass
class CrossTask(Method):
    """Cross-task prompting: one most-similar labelled example of each source task in context.

    Every prompt is `crosstask.crosstask_prompt`; its blocks are newline-separated, so an answer is
    the first non-empty generated line. `num_sources` keeps the first N of `sources`.
    """

    sources: Sequence[str] = ()
    source: str = "superni"
    num_sources: int | None = None
    name: str = "crosstask"

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError(f"{type(self).__name__}.sources: name at least one source task")

    def source_tasks(self, ctx: EvalContext) -> dict[str, TaskData]:
        names = list(self.sources)[: self.num_sources]
        tasks = ctx.source_tasks(self.source, names=names)
        missing = [n for n in names if n not in tasks]
        if missing:
            raise DataError(f"{type(self).__name__}.sources: task(s) {missing} not found in the {self.source} data")
        return {n: tasks[n] for n in names}

    def one_shot(self, ctx: EvalContext, task: TaskData, instances: Sequence[Instance],
                 in_task_demos: Sequence[Demo] = ()) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
        """Each source's records and predictions for `instances` (all sources' prompts in one engine call)."""
        sources = self.source_tasks(ctx)
        texts = []
        for src in sources.values():
            nearest = crosstask.nearest_source_examples([i.input for i in instances], src, ctx.get_embedder())
            texts += [crosstask.crosstask_prompt(src, demo, task, inst.input, in_task_demos)
                      for demo, inst in zip(nearest, instances)]
        answers = ctx.answer(task, list(instances) * len(sources), texts, stop=LINE)
        n = len(instances)
        records = {name: answers[i * n:(i + 1) * n] for i, name in enumerate(sources)}
        return records, {name: [r["prediction"] for r in recs] for name, recs in records.items()}

    def run(self, ctx, task, instances, pool, seed):
        records, by_source = self.one_shot(ctx, task, instances)
        return MethodOutput(_voted(records, by_source), by_source)


def _voted(records: dict[str, list[dict]], by_source: dict[str, list[str]]) -> list[dict]:
    """The first source's records with the vote as "prediction" and every source's prompt/prediction kept."""
    votes = majority_votes(by_source)
    first = next(iter(records.values()))
    out = []
    for i, (rec, vote) in enumerate(zip(first, votes)):
        rest = {k: v for k, v in rec.items()
                if k not in ("prompt", "prediction", "option_logprobs", "option_logprobs_mean", "option_logprobs_per_byte")}
        out.append({**rest, "prediction": vote,
                    "sources": {n: {"prompt": records[n][i]["prompt"], "prediction": by_source[n][i]} for n in records}})
    return out


@gin.configurable
@dataclasses.dataclass
class PseudoLabels(CrossTask):
    """Cross-task prompting plus `num_labels` pseudo-labelled in-task demos.

    The unlabelled inputs are the first `num_labels` of a seeded shuffle of the task's pool (its
    labels never read), else of the evaluated inputs; each is labelled by the majority vote of the
    sources' one-shot predictions, then shown (as `in_task_demos`) in every source's prompt.
    """

    num_labels: int = 2
    name: str = "pseudo_labels"
    seeded: bool = True

    def pseudo_demos(self, ctx: EvalContext, task: TaskData, instances: Sequence[Instance],
                     pool: Sequence[Instance], seed: int) -> list[Demo]:
        unlabelled = list(pool) or list(instances)
        random.Random(seed).shuffle(unlabelled)
        unlabelled = [dataclasses.replace(i, outputs=()) for i in unlabelled[: self.num_labels]]
        _, by_source = self.one_shot(ctx, task, unlabelled)
        return [Demo(inst.input, label) for inst, label in zip(unlabelled, majority_votes(by_source))]

    def run(self, ctx, task, instances, pool, seed):
        demos = self.pseudo_demos(ctx, task, instances, pool, seed)
        records, by_source = self.one_shot(ctx, task, instances, demos)
        return MethodOutput(_voted(records, by_source), by_source,
                            info={"pseudo_labels": [{"input": d.input, "label": d.output} for d in demos]})


# ============================================================================ adapters


@gin.configurable
@dataclasses.dataclass
class Adapter(Method):
    """A LoRA per task and no instruction in the input: a trained teacher, or one a hypernetwork
    generates from the task's instruction (once per task, cached under `cache_dir`, default
    `<workdir>/adapters/<hypernet digest>/<task>.msgpack`).

    Set exactly one of
      teachers       a `teachers/` dir (`LoRATeachers.save_teachers`): the task's teacher for every instance;
      fold_teachers  cross-fitted teachers, ((teachers dir, first, stop), ...): evaluated instances
                     first..stop-1 (their place among the task's evaluated instances) use that dir's
                     teacher, which the user trained on the task's OTHER instances (e.g. two folds of
                     50: a teacher is never scored on an instance it was trained on); every evaluated
                     instance must fall in one fold;
      hypernet       a hypernetwork (`load_hypernet`). One trained with decoder-only fusion also reads
                     the instruction's tokens as a prefix of every prompt, as in training (the engine's
                     prefix cache computes it once per task); encoder-decoder fusion is refused.

    input_format: "none" (the bare input) or "query" (Tk's "Now complete the following example -
    Input: ... Output: "); None = what the hypernetwork's student saw in training, else "none". The
    hypernetwork reads the instruction as it did in training (`jaxlm.data.tagi_tasks.instruction_for`),
    cut to `max_instruction_tokens` (None: the encoder's limit; bind the training data's
    tagi_data.max_instruction_len when that was shorter). `max_input_tokens`: keep the LAST that many
    tokens of each input, as jaxlm's training batches cut student rows (bind the adapter's training
    tagi_data.max_input_len); None keeps the sweep's rule (the first max_source_length tokens).
    """

    teachers: str | None = None
    fold_teachers: Sequence[Sequence[Any]] | None = None
    hypernet: str | None = None
    input_format: str | None = None
    cache_dir: str | None = None
    max_instruction_tokens: int | None = None
    max_input_tokens: int | None = None
    name: str = "adapter"
    _teachers: dict = dataclasses.field(default_factory=dict, repr=False)
    _hypernet: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.teachers, self.fold_teachers, self.hypernet)) != 1:
            raise ConfigError("Adapter: set exactly one of Adapter.teachers (a teachers/ dir), Adapter.fold_teachers "
                              "or Adapter.hypernet")
        if self.input_format not in (None, "none", "query"):
            raise ConfigError(f"Adapter.input_format {self.input_format!r}: expected 'none' or 'query'")
        for field in ("max_instruction_tokens", "max_input_tokens"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise ConfigError(f"Adapter.{field}={getattr(self, field)}: must be >= 1")
        if self.fold_teachers is not None:
            folds = []
            for fold in self.fold_teachers:
                if (not isinstance(fold, (tuple, list)) or len(fold) != 3 or not all(isinstance(x, int) for x in fold[1:])
                        or not 0 <= fold[1] < fold[2]):
                    raise ConfigError(f"Adapter.fold_teachers: {fold!r} is not (teachers dir, first, stop) with "
                                      "0 <= first < stop")
                folds.append((str(fold[0]), int(fold[1]), int(fold[2])))
            spans = sorted((a, b) for _, a, b in folds)
            if not spans or any(b > a2 for (_, b), (a2, _) in zip(spans, spans[1:])):
                raise ConfigError(f"Adapter.fold_teachers: the instance ranges {spans} are empty or overlap")
            self.fold_teachers = tuple(folds)

    def _teacher(self, ctx: EvalContext, directory: str, task: TaskData) -> Any:
        key = (directory, id(ctx.engine.pretrained))  # per model of the sweep
        if key not in self._teachers:
            from jaxlm.checkpoints.teachers import load_teachers

            self._teachers[key] = load_teachers(directory, ctx.engine.pretrained)
        names, stacked = self._teachers[key]
        if task.name not in names:
            raise DataError(f"Adapter teachers {directory}: no teacher for task {task.name!r} (has {names})")
        return lora_lib.select(stacked, names.index(task.name))

    def adapter_for(self, ctx: EvalContext, task: TaskData) -> Any:
        """The task's LoRA: its teacher (`teachers`) or the hypernetwork's adapter (`hypernet`)."""
        if self.teachers is not None:
            return self._teacher(ctx, self.teachers, task)
        if self.hypernet is None:
            raise ConfigError("Adapter.fold_teachers: one teacher per fold, not per task (use run())")
        return self._generated(ctx, task)

    def _generated(self, ctx: EvalContext, task: TaskData) -> Any:
        from flax import serialization

        cache = None
        if self.cache_dir or ctx.workdir:
            key = self._hypernet_digest()
            root = Path(self.cache_dir) if self.cache_dir else Path(ctx.workdir) / "adapters"
            cache = root / key / (re.sub(r"[^A-Za-z0-9._-]+", "_", task.name) + ".msgpack")
            if cache.is_file():
                raw = serialization.msgpack_restore(cache.read_bytes())
                return lora_lib.LoraWeights(raw["params"], int(raw["rank"]), float(raw["alpha"]))
        hyper = self.loaded_hypernet()
        lora = hyper.adapters([self.instruction(task)], self.max_instruction_tokens)
        lora = lora_lib.select(lora, 0) if lora.batched else lora
        if cache is not None:
            from jaxlm.files import write_atomically

            doc = {"params": lora.params, "rank": lora.rank, "alpha": lora.alpha}
            write_atomically(cache, lambda f: f.write(serialization.msgpack_serialize(
                serialization.to_state_dict(doc))), binary=True)
        return lora

    def _hypernet_digest(self) -> str:
        """What the adapter cache is keyed by: the hypernetwork's files (metadata contents, every
        file's size and mtime, so retraining in place is a new key) and the instruction cut."""
        from jaxlm.checkpoints.hypernet import find_hypernet_dir

        directory = find_hypernet_dir(self.hypernet, missing_ok=True) or Path(self.hypernet)
        h = hashlib.sha1(f"{directory.resolve()}|{self.max_instruction_tokens}".encode())
        for f in sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else ():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def instruction(self, task: TaskData) -> str:
        """What the hypernetwork reads for `task`, as in its training (`instruction_for`)."""
        from jaxlm.data.tagi_tasks import instruction_for

        return instruction_for(task, self.loaded_hypernet().instruction_format["teacher_format"])

    def prefix_ids(self, task: TaskData) -> list[int] | None:
        """The instruction tokens read before every prompt of `task`.

        Returns:
          The hypernetwork's codec ids of the task's instruction, cut to `max_instruction_tokens` (a
          decoder-only fusion hypernetwork: what its training's cached prefix held), else None.
        """
        if self.hypernet is None or not self.loaded_hypernet().prefix_fusion:
            return None
        return self.loaded_hypernet().tokenize(self.instruction(task), self.max_instruction_tokens)

    def loaded_hypernet(self) -> Any:
        if self._hypernet is None:
            try:
                from jaxlm.checkpoints.hypernet import load_hypernet
            except ImportError as e:
                raise UsageError(f"Adapter.hypernet needs jaxlm.checkpoints.hypernet (not available: {e}); "
                                 "use Adapter.teachers for trained teachers") from None
            hyper = load_hypernet(self.hypernet)
            if hyper.config.fusion and not hyper.prefix_fusion:  # T5: fused encoder states, not a prompt prefix
                raise ConfigError(f"Adapter.hypernet {self.hypernet}: trained with encoder-decoder instruction fusion "
                                  "(hypernet.json hypernet.fusion), which the eval sweep's adapter method does not "
                                  "feed (it joins instruction states to the encoder output); retrain with "
                                  "HypernetConfig.fusion = False")
            self._hypernet = hyper
        return self._hypernet

    def run(self, ctx, task, instances, pool, seed):
        fmt = self.input_format
        if fmt is None:
            fmt = self.loaded_hypernet().instruction_format["student_format"] if self.hypernet else "none"
        texts = [prompts.tk_query(inst.input) if fmt == "query" else prompts.format_prompt(task, inst, "none")
                 for inst in instances]
        if self.fold_teachers is None:
            return MethodOutput(ctx.answer(task, instances, texts, lora=self.adapter_for(ctx, task),
                                           prefix_ids=self.prefix_ids(task), keep_last=self.max_input_tokens))
        records: list[dict[str, Any] | None] = [None] * len(instances)
        for directory, first, stop in self.fold_teachers:
            span = range(first, min(stop, len(instances)))
            if span:
                lora = self._teacher(ctx, directory, task)
                for i, record in zip(span, ctx.answer(task, [instances[i] for i in span], [texts[i] for i in span],
                                                      lora=lora, keep_last=self.max_input_tokens)):
                    records[i] = record
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            raise ConfigError(f"Adapter.fold_teachers {[f[1:] for f in self.fold_teachers]}: evaluated instance "
                              f"{missing[0]} of task {task.name!r} is in no fold ({len(instances)} evaluated)")
        return MethodOutput(records, info={"fold_teachers": [f[0] for f in self.fold_teachers]})
