"""Evaluate a from-scratch byte model on string-rewrite rules: the methods of the rewrite studies.

Every method answers the same held-out instances (input z, gold rewritten z) and differs only in what
the model reads:
  no_instruction  "z="                                  (the baseline: the rule is unknown)
  in_context      "x|y|z="                              (the rule written in the input)
  icil            K solved rows of K other (training) rules, then "x|y|z=" (ICIL-style: fixed cross-task
                  demonstrations, one per rule, the same for every evaluated rule; rows are joined by EOS
                  exactly as packed training rows are, see `LanguageModel.context_across_rows`)
  teacher         "z=" with the rule's own LoRA teacher (an oracle trained on that rule's instances)
  hypernet        "z=" with the LoRA a hypernetwork generated from "x|y" (TAGI)
Metrics: exact match (%) and the mean per-token NLL of the gold target (+ EOS), which still ranks the
methods where greedy answers are all wrong. Adapters are stacked and gathered per row, so every method
is one batched engine call over all rules.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gin
import numpy as np

from jaxlm.data.schema import TaskData
from jaxlm.data.string_rewrite import (
    QUERY_END,
    rewrite_model_input,
    rewrite_tasks,
    rule_text,
)
from jaxlm.checkpoints.instruction_codec import text_codec
from jaxlm.errors import ConfigError, UsageError
from jaxlm.jsonl import ResultsLog, json_line
from jaxlm.files import write_atomically

REWRITE_METHODS = ("no_instruction", "in_context", "icil", "teacher", "hypernet")
ADAPTER_METHODS = ("teacher", "hypernet")
BYTES = text_codec("bytes")


def icil_demos(train_tasks: Sequence[TaskData], k: int, seed: int = 0) -> list[tuple[str, str]]:
    """K (model input, target) demonstrations from K distinct training rules, chosen once by `seed`."""
    if k > len(train_tasks):
        raise UsageError(f"icil demos: k={k} needs at least {k} training rules, got {len(train_tasks)}")
    rng = np.random.default_rng(seed)
    demos = []
    for t in rng.choice(len(train_tasks), size=k, replace=False):
        task = train_tasks[int(t)]
        inst = task.instances[int(rng.integers(len(task.instances)))]
        demos.append((rewrite_model_input(task.metadata["x"], task.metadata["y"], inst.input), inst.outputs[0]))
    return demos


def prompt_ids(method: str, task: TaskData, z: str, demos: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The ids one method feeds the model for input z of rule `task`."""
    if method not in REWRITE_METHODS:
        raise UsageError(f"rewrite method {method!r} is unknown; expected one of {REWRITE_METHODS}")
    x, y = task.metadata["x"], task.metadata["y"]
    if method in ("no_instruction", *ADAPTER_METHODS):
        return BYTES.encode(z + QUERY_END)
    ids: list[int] = []
    if method == "icil":
        for inputs, target in demos:
            ids += BYTES.encode(inputs) + BYTES.encode(target) + [BYTES.eos_id]
    return ids + BYTES.encode(rewrite_model_input(x, y, z))


@dataclass(frozen=True)
class RewriteScores:
    method: str
    exact_match: float  # % of instances whose greedy answer equals the gold rewrite
    target_nll: float  # mean over instances of the per-token NLL of gold + EOS
    predictions: list[dict[str, Any]]


def evaluate_method(engine: Any, tasks: Sequence[TaskData], method: str, *, lora: Any = None,
                    demos: Sequence[tuple[str, str]] = (), max_new_tokens: int = 24,
                    prefixes: Sequence[Sequence[int]] | None = None) -> RewriteScores:
    """One method on every instance of `tasks`; `lora` (adapter methods): N stacked adapters, adapter i
    for tasks[i]; `prefixes` (a decoder-only fusion hypernetwork): token ids read before every prompt of
    tasks[i], as training read the instruction."""
    if (method in ADAPTER_METHODS) != (lora is not None):
        raise UsageError(f"rewrite method {method!r}: {'needs' if method in ADAPTER_METHODS else 'takes no'} adapters")
    rows = [(i, task, inst) for i, task in enumerate(tasks) for inst in task.instances]
    prompts = [([*prefixes[i]] if prefixes is not None else []) + prompt_ids(method, task, inst.input, demos)
               for i, task, inst in rows]
    index = [i for i, _, _ in rows] if lora is not None else None
    gold = [inst.outputs[0] for _, _, inst in rows]
    answers = [BYTES.decode(r.output_ids) for r in
               engine.generate(prompts, max_new_tokens=max_new_tokens, lora=lora, adapter_index=index)]
    scored = engine.score([(p, BYTES.encode(g) + [BYTES.eos_id]) for p, g in zip(prompts, gold)],
                          lora=lora, adapter_index=index)
    nll = [-s.logprob / s.num_tokens for s in scored]
    hits = [a == g for a, g in zip(answers, gold)]
    predictions = [{"rule": task.name, "x": task.metadata["x"], "y": task.metadata["y"], "input": inst.input,
                    "gold": g, "prediction": a, "correct": h, "nll": round(n, 4)}
                   for (_, task, inst), g, a, h, n in zip(rows, gold, answers, hits, nll)]
    return RewriteScores(method, 100.0 * float(np.mean(hits)), float(np.mean(nll)), predictions)


def teacher_fit(engine: Any, teachers_dir: str | Path, config: Any, *, examples: int = 5,
                max_new_tokens: int = 24) -> dict[str, Any]:
    """How well per-rule LoRA teachers of TRAINING rules learned their rule (the L_ins targets).

    Args:
      engine: an engine over the base the teachers adapt.
      teachers_dir: a LoRATeachers directory trained on the training rules (`global_task_index`:
        teacher i <-> training rule i, or saved under the rules' names).
      config: the RewriteConfig the rules come from.
      examples: instances per rule in each of the two evaluations.
      max_new_tokens: greedy decoding budget.

    Returns:
      {"teachers": N, "own_rows_em": exact match (%) on the first `examples` instances each teacher was
      trained on, "fresh_inputs_em": on `examples` new inputs of the same rules
      (`fresh_training_rule_tasks`), "fresh_inputs_in_context_em": the base with the rule in context on
      those same new inputs, "examples": per rule}.
    """
    import dataclasses

    from jaxlm.checkpoints.teachers import load_teachers, teacher_indices
    from jaxlm.data.string_rewrite import fresh_training_rule_tasks
    from jaxlm.models import lora as lora_lib

    train = rewrite_tasks(config, part="train")
    index = teacher_indices(teachers_dir, [t.name for t in train])
    _, stacked = load_teachers(teachers_dir, engine.pretrained)
    ranks = sorted((i, r) for r, t in enumerate(train) if (i := index.get(t.name)) is not None)
    if not ranks:
        raise ConfigError(f"teacher_fit: {teachers_dir} has no teacher for a training rule")
    lora = lora_lib.select(stacked, np.asarray([i for i, _ in ranks]))
    own = [dataclasses.replace(train[r], instances=train[r].instances[:examples]) for _, r in ranks]
    fresh = fresh_training_rule_tasks(config, [r for _, r in ranks], examples)
    run = functools.partial(evaluate_method, engine, max_new_tokens=max_new_tokens)
    return {"teachers": len(ranks), "examples": examples,
            "own_rows_em": round(run(own, "teacher", lora=lora).exact_match, 2),
            "fresh_inputs_em": round(run(fresh, "teacher", lora=lora).exact_match, 2),
            "fresh_inputs_in_context_em": round(run(fresh, "in_context").exact_match, 2)}


@gin.configurable
@dataclass(frozen=True)
class RewriteEval:
    """The held-out-rule evaluation as a gin experiment (jaxlm/configs/demo/eval_rewrite.gin).

    `rules`: the RewriteConfig the base was trained on (its held-out part is evaluated, `max_rules` of
    them); `base`: the base HF dir; `hypernet`: a TAGI run or hypernet dir (method "hypernet");
    `teachers`: LoRA teachers of the held-out rules, teacher i for held-out rule i (method "teacher").
    ICIL demos: `icil_demos` training rules drawn with `seed`. `buckets`: the engine's padded lengths
    (None: the engine's default). Drivers with their own record format (experiments/studies/tagi)
    use the pieces: `heldout_tasks`, `load_engine`, `score`."""

    rules: Any = None
    base: str | None = None
    hypernet: str | None = None
    teachers: str | None = None
    methods: tuple[str, ...] = ("no_instruction", "in_context", "icil", "hypernet")
    icil_demos: int = 4
    seed: int = 0
    max_rules: int | None = None
    batch_size: int = 64
    buckets: tuple[int, ...] | None = (32, 64, 128, 256)  # rows are short: few compiled shapes
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if self.rules is None or self.base is None:
            raise ConfigError("RewriteEval.rules (@RewriteConfig()) and RewriteEval.base (a HF dir) must be bound")
        unknown = [m for m in self.methods if m not in REWRITE_METHODS]
        if unknown:
            raise ConfigError(f"RewriteEval.methods: {unknown} unknown; expected some of {REWRITE_METHODS}")
        for method, path in (("hypernet", self.hypernet), ("teacher", self.teachers)):
            if method in self.methods and not path:
                raise ConfigError(f"RewriteEval.methods has {method!r}: bind RewriteEval.{method if method == 'hypernet' else 'teachers'}")

    def adapters(self, method: str, tasks: Sequence[TaskData], pretrained: Any) -> Any:
        if method == "hypernet":
            from jaxlm.checkpoints.hypernet import load_hypernet

            return load_hypernet(self.hypernet).adapters([rule_text(t.metadata["x"], t.metadata["y"]) for t in tasks])
        if method == "teacher":
            from jaxlm.models import lora as lora_lib
            from jaxlm.checkpoints.teachers import load_teachers

            names, stacked = load_teachers(self.teachers, pretrained)
            if len(names) < len(tasks):
                raise ConfigError(f"RewriteEval.teachers {self.teachers}: {len(names)} teachers for {len(tasks)} rules")
            return lora_lib.select(stacked, np.arange(len(tasks)))
        return None

    def heldout_tasks(self) -> list[TaskData]:
        """The evaluated rules: the first `max_rules` held-out rules of `rules`."""
        return rewrite_tasks(self.rules, part="test")[: self.max_rules]

    def load_engine(self) -> Any:
        """An engine over the `base` model (its `.pretrained` is the base)."""
        import jaxlm
        from jaxlm.eval.engine import Engine

        buckets = {"buckets": tuple(self.buckets)} if self.buckets is not None else {}
        return Engine(jaxlm.load_pretrained(self.base), batch_size=self.batch_size, **buckets)

    def score(self, engine: Any, tasks: Sequence[TaskData], method: str,
              demos: Sequence[tuple[str, str]] = ()) -> RewriteScores:
        """`evaluate_method` of one method with its adapters (`adapters`) and `max_new_tokens`; `demos`
        are used by "icil" only."""
        return evaluate_method(engine, tasks, method, lora=self.adapters(method, tasks, engine.pretrained),
                               demos=demos if method == "icil" else (), max_new_tokens=self.max_new_tokens,
                               prefixes=self.prefixes(method, tasks))

    def prefixes(self, method: str, tasks: Sequence[TaskData]) -> list[list[int]] | None:
        """The instruction prefix of each task for a decoder-only fusion hypernetwork, else None."""
        if method != "hypernet":
            return None
        from jaxlm.checkpoints.hypernet import load_hypernet

        hyper = load_hypernet(self.hypernet)
        if not hyper.prefix_fusion:
            return None
        return [hyper.tokenize(rule_text(t.metadata["x"], t.metadata["y"])) for t in tasks]

    def run(self, workdir: str | Path, on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Evaluate every method not yet in WORKDIR/results.jsonl; each result line is appended (and
        fsynced, `jaxlm.jsonl.ResultsLog`) as its method finishes, its predictions written to
        WORKDIR/predictions/<method>.jsonl."""
        workdir = Path(workdir)
        results = ResultsLog(workdir / "results.jsonl", key=lambda r: r["method"])
        done = results.latest()
        if all(m in done for m in self.methods):
            return [done[m] for m in self.methods]
        heldout = self.heldout_tasks()
        demos = icil_demos(rewrite_tasks(self.rules, part="train"), self.icil_demos, self.seed)
        engine = self.load_engine()
        rows = []
        for method in self.methods:
            if method in done:
                rows.append(done[method])
                continue
            start = time.perf_counter()
            scores = self.score(engine, heldout, method, demos)
            row = {"study": "rewrite", "method": method, "exact_match": round(scores.exact_match, 2),
                   "target_nll": round(scores.target_nll, 4), "rules": len(heldout),
                   "examples": len(scores.predictions), "seconds": round(time.perf_counter() - start, 1)}
            if method == "icil":
                row["icil_demos"] = [f"{i}{t}" for i, t in demos]
            write_atomically(workdir / "predictions" / f"{method}.jsonl",
                             lambda f, p=scores.predictions: f.write("".join(json_line(r, ensure_ascii=True) for r in p)))
            results.append([row])
            if on_result:
                on_result(row)
            rows.append(row)
        return rows
