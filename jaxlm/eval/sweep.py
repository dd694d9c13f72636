"""Evaluation sweeps: a gin-configured grid of models x methods x tasks (x seeds), resumable cell by cell.

A cell is (model, method, task, seed). Each finished cell writes `predictions/<cell>.jsonl`
(atomically) and then appends one line to `results.jsonl` (flushed and fsynced: `jaxlm.jsonl.ResultsLog`),
so a killed sweep rerun with the same workdir skips every finished cell and recomputes at most the one
it was in.
Each line carries a digest of the cell's settings (model, method fields, instance cap, token
budgets): a rerun with changed settings redoes that cell, and the reports use its latest line.
At the end: `summary.md` / `summary.csv` (method x task group, `jaxlm.eval.report`), `plots/*.png`,
`config.gin` (the operative gin config) and `results.json` (lm-evaluation-harness shaped, with
bootstrap standard errors: `jaxlm.eval.harness`).

    jaxlm eval --gin_file=jaxlm/configs/eval/smollm2_superni.gin --workdir runs/eval_superni
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

from jaxlm.data.schema import Instance, TaskData
from jaxlm.errors import ConfigError, UsageError
from jaxlm.eval import methods as methods_lib
from jaxlm import jsonl
from jaxlm.jsonl import ResultsLog, json_line
from jaxlm.files import data_root, write_atomically

RESULTS = "results.jsonl"
PREDICTIONS = "predictions"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalModel:
    """A model of the grid: `pretrained` (a HF dir, .gguf or weight-package name; a PEFT adapter dir,
    merged into its `base_model_name_or_path`; or a `jaxlm train` run directory, exported from its
    newest checkpoint as `jaxlm export` does), the base model of a TAGI `hypernet` (what
    `Adapter(hypernet=...)` adapts), or a randomly initialised `config` (tests) that borrows the
    tokenizer of the model named by `tokenizer`. `dtype` is the compute dtype; `param_dtype` the dtype
    the weights are held in (a checkpoint's tensors are converted to it one at a time; None: float32
    for a checkpoint, the `config`'s for a random init; a `hypernet` base refuses it)."""

    name: str
    pretrained: str | None = None
    config: Any = None
    tokenizer: str | None = None
    hypernet: str | None = None
    seed: int = 0
    dtype: str = "float32"
    param_dtype: str | None = None

    def load(self, mesh: Any = None) -> Any:
        """The model as a `Pretrained`.

        Args:
          mesh: a `jax.sharding.Mesh`: a checkpoint's tensors (a HF dir, .gguf, weight package, a PEFT
            dir's base, a run dir's export) are placed on its shards as they are read
            (`load_pretrained(mesh=)`); None: the default device. A hypernet base or a random init is
            loaded on the default device either way (the engine shards it).

        Returns:
          The Pretrained (a PEFT dir: its LoRA merged into the base).

        Raises:
          ConfigError: not exactly one of pretrained / config / hypernet, a bad `param_dtype`, a
            random-init config without `tokenizer`, or a run dir whose export fails.
          CheckpointError: a file cannot be read (named).
        """
        from jaxlm.checkpoints.hf import FLOAT_DTYPES
        from jaxlm.checkpoints.pretrained import (
            Pretrained,
            init_params,
            load_pretrained,
            load_tokenizer,
        )

        if sum(x is not None for x in (self.pretrained, self.config, self.hypernet)) != 1:
            raise ConfigError(f"EvalModel {self.name!r}: set exactly one of pretrained, config or hypernet")
        if self.param_dtype not in (None, *FLOAT_DTYPES):
            raise ConfigError(f"EvalModel {self.name!r}: param_dtype={self.param_dtype!r}, expected one of {FLOAT_DTYPES}")
        if self.hypernet is not None and self.param_dtype is not None:
            raise ConfigError(f"EvalModel {self.name!r}: param_dtype is not supported with hypernet (its base "
                              "is read as the hypernetwork export holds it)")
        param_dtype = self.param_dtype or "float32"
        if self.hypernet is not None:
            from jaxlm.checkpoints.hypernet import load_hypernet

            return load_hypernet(self.hypernet).base
        if self.pretrained is not None:
            return _load_trained(Path(self.pretrained), self.dtype, param_dtype, mesh) if Path(self.pretrained).is_dir() \
                else load_pretrained(self.pretrained, dtype=self.dtype, param_dtype=param_dtype, mesh=mesh)
        if self.tokenizer is None:
            raise ConfigError(f"EvalModel {self.name!r}: a random-init config needs EvalModel.tokenizer (text in, text out)")
        family = self.config.family
        config = dataclasses.replace(self.config, param_dtype=self.param_dtype) if self.param_dtype else self.config
        return Pretrained(family, config, init_params(family, config, self.seed), load_tokenizer(self.tokenizer),
                          f"random-init:{self.name}")


def _load_trained(directory: Path, dtype: str, param_dtype: str = "float32", mesh: Any = None) -> Any:
    """A HF dir as is; a PEFT dir merged into its base; a run dir exported first (`jaxlm export`, in a
    child process: the run's own gin config must not replace the sweep's) into directory/export/."""
    import json
    import os
    import subprocess

    from jaxlm.checkpoints.peft import load_peft_model
    from jaxlm.checkpoints.pretrained import Pretrained, load_pretrained
    from jaxlm.models.lora import merge

    if (directory / "config.gin").is_file() and (directory / "checkpoints").is_dir():
        out = directory / "export"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the parent may hold the accelerator's memory
        proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "export", "--workdir", str(directory),
                               "--output", str(out)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or "exit status %d" % proc.returncode).splitlines()
            raise ConfigError(f"EvalModel.pretrained={str(directory)!r}: export failed: {lines[-1]}")
        directory = out
    adapter_config = directory / "adapter_config.json"
    if not adapter_config.is_file():
        return load_pretrained(directory, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    base = load_pretrained(json.loads(adapter_config.read_text())["base_model_name_or_path"], dtype=dtype,
                           param_dtype=param_dtype, mesh=mesh)
    base, lora = load_peft_model(directory, base)  # modules_to_save replace base params
    merged = merge(base.params, lora)
    return Pretrained(base.family, base.config, merged, base.tokenizer, str(directory), base.generation)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskSet:
    """Tasks of one source: the first `max_instances` instances of each are evaluated (the rest are
    the pool that few-shot and pseudo-label methods draw from). `group` labels the summary column
    (default: the source); "category" groups Super-NI tasks by their first category."""

    source: str
    part: str | None = None
    names: Sequence[str] | None = None
    english_only: bool = True
    max_instances: int | None = 20
    group: str | None = None

    def group_of(self, task: TaskData) -> str:
        if self.group == "category":
            return task.categories[0] if task.categories else self.source
        return self.group or self.source


def cell_id(model: str, method: str, task: str, seed: int) -> str:
    """A file-name-safe, unique-enough key for one cell."""
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "-", s) for s in (model, method, task)]
    return "__".join(safe + [f"s{seed}"])


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    method: str
    taskset: int
    task: str
    seed: int
    settings: str = ""

    @property
    def id(self) -> str:
        return cell_id(self.model, self.method, f"{self.taskset}.{self.task}", self.seed)


def results_log(workdir: Path) -> ResultsLog:
    """`results.jsonl` of a sweep, keyed by (cell, settings): its done keys are the finished cells (a
    torn last line, from a kill mid-write, is dropped)."""
    return ResultsLog(Path(workdir) / RESULTS, key=lambda row: (row["cell"], row.get("settings", "")))


def settings_key(model: EvalModel, method: methods_lib.Method, ts: TaskSet, max_new_tokens: int,
                 max_source_length: int, rank_normalization: str = "sum") -> str:
    """A digest of everything that changes a cell's answers: a rerun with other settings redoes the cell
    (its new line supersedes the old one in the reports) instead of skipping it. (The prefix cache
    changes no answer; a non-default rank normalisation does.)"""
    import hashlib

    text = repr((model, method, ts.max_instances, ts.english_only, max_new_tokens, max_source_length)
                + (() if rank_normalization == "sum" else (rank_normalization,)))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@gin.configurable
def eval_sweep(
    workdir: str | Path,
    *,
    models: Sequence[EvalModel],
    methods: Sequence[methods_lib.Method],
    tasks: Sequence[TaskSet],
    seeds: Sequence[int] = (0,),
    data_dir: str | None = None,
    batch_size: int = 8,
    buckets: Sequence[int] | None = None,
    max_new_tokens: int = 32,
    max_source_length: int = 1024,
    embed_cache_dir: str | None = None,
    max_cells: int | None = None,
    progress: bool = True,
    mesh_shape: str | None = None,
    prefix_cache: bool = True,
    rank_normalization: str = "sum",
) -> dict[str, Any]:
    """Run every unfinished cell of the grid; return {"cells", "ran", "skipped", "num_compiles", "workdir",
    "rank_normalization", "reported": the grid's result rows (the last line of each of its cells, as
    in the reports)}.

    buckets: the engine's padded lengths (default `jaxlm.buckets.DEFAULT_LENGTH_BUCKETS`).
    max_cells: stop after running this many cells (a partial sweep; rerun to continue).
    mesh_shape: a device mesh for the engine, e.g. "data=-1" (`jax.sharding` via `jaxlm.sharding.make_mesh`;
      batches split over data x fsdp, which must divide `batch_size`); None: one device.
      `jaxlm eval --mesh` binds it.
    prefix_cache: compute each shared token prefix once (Llama; exact). False recomputes every row.
    rank_normalization: which option score picks a multiple-choice answer: "sum" of log-probs,
      "mean" per token, or "byte" per UTF-8 byte (lm-evaluation-harness's acc_norm); all three are
      written to the predictions either way.
    Besides results.jsonl, writes results.json shaped like lm-evaluation-harness output
    (`jaxlm.eval.harness`).
    """
    from jaxlm.data.sources import load_tasks
    from jaxlm.eval import report
    from jaxlm.eval.engine import Engine

    workdir = Path(workdir)
    mesh = None
    if mesh_shape is not None:
        from jaxlm.sharding import make_mesh

        try:
            mesh = make_mesh(mesh_shape)
        except ValueError as e:
            raise ConfigError(f"eval_sweep.mesh_shape={mesh_shape!r}: {e}") from None
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % ways:
            raise ConfigError(f"eval_sweep.mesh_shape={mesh_shape!r}: batch_size {batch_size} is not a multiple of "
                              f"its data x fsdp = {ways} devices")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval_sweep.methods: method names must be unique, got {names} (set name=...)")
    if not models or not methods or not tasks:
        raise ConfigError("eval_sweep: models, methods and tasks must each name at least one entry")
    task_lists = [load_tasks(ts.source, data_dir, part=ts.part, names=ts.names, english_only=ts.english_only)
                  for ts in tasks]
    for ts, loaded in zip(tasks, task_lists):
        if not loaded:
            raise ConfigError(f"TaskSet(source={ts.source!r}, part={ts.part!r}, names={ts.names}): no tasks in {data_dir or data_root()}")
    cells = [Cell(model.name, method.name, t, name, seed,
                  settings_key(model, method, tasks[t], max_new_tokens, max_source_length, rank_normalization))
             for model in models for method in methods for t, loaded in enumerate(task_lists) for name in loaded
             for seed in (seeds if method.seeded else seeds[:1])]
    if len({c.id for c in cells}) != len(cells):
        raise ConfigError("eval_sweep: two cells share an id (duplicate model names?)")
    results = results_log(workdir)
    done = results.done_keys()
    todo = [c for c in cells if (c.id, c.settings) not in done]
    if max_cells is not None:
        todo = todo[:max_cells]
    write_atomically(workdir / "config.gin", lambda f: f.write(gin.config_str()))

    source_tasks = functools.cache(lambda source, part=None, names=None: load_tasks(
        source, data_dir, part=part, names=None if names is None else list(names), english_only=True))
    bar = _progress(len(todo), progress)
    num_compiles, ran = 0, 0
    for model in models:
        mine = [c for c in todo if c.model == model.name]
        if not mine:
            continue
        engine = Engine(model.load(mesh), batch_size=batch_size, mesh=mesh, prefix_cache=prefix_cache,
                        **({"buckets": tuple(buckets)} if buckets else {}))
        ctx = methods_lib.EvalContext(
            engine, engine.pretrained.tokenizer,
            lambda source, part=None, names=None: source_tasks(source, part, None if names is None else tuple(names)),
            max_source_length=max_source_length, max_new_tokens=max_new_tokens, workdir=workdir,
            rank_normalization=rank_normalization,
            embed_cache_dir=Path(embed_cache_dir) if embed_cache_dir else workdir / "embeddings")
        by_name = {m.name: m for m in methods}
        for cell in mine:
            task = task_lists[cell.taskset][cell.task]
            ts = tasks[cell.taskset]
            evaluated, pool = split_instances(task, ts.max_instances)
            start = time.perf_counter()
            result = by_name[cell.method].run(ctx, task, evaluated, pool, cell.seed)
            lines = [json_line(r) for r in result.records]
            write_atomically(workdir / PREDICTIONS / f"{cell.id}.jsonl", lambda f, lines=lines: f.writelines(lines))
            results.append([cell_record(cell, ts, task, result, time.perf_counter() - start)])
            ran += 1
            bar.update(1)
        num_compiles += _compiles(engine)
    bar.close()
    latest = {r["cell"]: r for r in results.rows()}  # a cell redone with other settings: its last line counts
    reported = [r for r in latest.values() if r["cell"] in {c.id for c in cells}]
    report.write_reports(workdir, reported)
    write_harness_results(workdir, reported, {
        "models": [m.name for m in models], "methods": names, "batch_size": batch_size,
        "max_new_tokens": max_new_tokens, "max_source_length": max_source_length, "prefix_cache": prefix_cache,
        "rank_normalization": rank_normalization, "seeds": list(seeds), "num_compiles": num_compiles})
    write_atomically(workdir / "config.gin", lambda f: f.write(gin.operative_config_str()))
    skipped = len(cells) - len([c for c in cells if (c.id, c.settings) not in done])
    summary = {"cells": len(cells), "ran": ran, "skipped": skipped, "num_compiles": num_compiles,
               "workdir": str(workdir), "rank_normalization": rank_normalization,
               "reported": reported}
    print(f"jaxlm eval: {ran} cell(s) run, {skipped} already done, {len(cells)} in the grid; "
          f"{num_compiles} compiled shape(s)", file=sys.stderr)
    return summary


def write_harness_results(workdir: Path, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """DIR/results.json shaped like lm-evaluation-harness output (`jaxlm.eval.harness`), from the
    reported rows and their predictions files (a cell whose file is missing gets no stderr)."""

    from jaxlm.eval import harness
    from jaxlm.jsonl import read_jsonl

    records = {}
    for row in rows:
        path = Path(workdir) / PREDICTIONS / f"{row['cell']}.jsonl"
        if path.is_file():
            records[row["cell"]] = [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(path)]
    doc = harness.harness_results(rows, records, config)
    write_atomically(Path(workdir) / "results.json", lambda f: f.write(jsonl.dumps(doc, indent=2, sort_keys=False) + "\n"))


def split_instances(task: TaskData, max_instances: int | None) -> tuple[tuple[Instance, ...], tuple[Instance, ...]]:
    """(the evaluated instances: the first `max_instances`, the rest: a pool for in-task demos)."""
    if max_instances is None:
        return task.instances, ()
    return task.instances[:max_instances], task.instances[max_instances:]


def cell_metrics(records: Sequence[dict[str, Any]], task: TaskData) -> dict[str, Any]:
    """A cell's metrics (x100) from `jaxlm.eval.metrics`: ROUGE-L/EM (+ BIG-bench exact_str_match) over
    free-form records, rank accuracy over multiple-choice ones (graded by BIG-bench target_scores when
    the task has them), and `score`: accuracy for multiple choice, else the Super-NI category's metric
    (EM for classification-like categories, ROUGE-L otherwise; ROUGE-L outside Super-NI); a task
    mixing both weighs each part by its instance count."""
    from jaxlm.eval import metrics

    free = [r for r in records if "options" not in r]
    mc = [r for r in records if "options" in r]
    out: dict[str, Any] = {}
    parts = []
    if free:
        preds, refs = [r["prediction"] for r in free], [r["references"] for r in free]
        out.update(metrics.compute_metrics(preds, refs))
        if task.source in ("bigbench", "bbh"):
            out["exact_str_match"] = metrics.exact_str_match(preds, refs)
        chosen = metrics.metric_for_category(task.categories[0] if task.categories else None) \
            if task.source == "superni" else "rougeL"
        out["metric"] = chosen
        parts.append((len(free), out[chosen]))
    if mc:
        # The chosen option (a vote need not be any single ranking's argmax) as a one-hot ranking.
        picked = [[float(o == r["prediction"]) for o in r["options"]] for r in mc]
        gold = [r.get("option_scores") or {i for i, o in enumerate(r["options"]) if o in r["references"]} for r in mc]
        out["accuracy"] = metrics.rank_accuracy(picked, gold)
        out["metric"] = "accuracy" if not free else "mixed"
        parts.append((len(mc), out["accuracy"]))
    out["score"] = sum(n * v for n, v in parts) / sum(n for n, _ in parts) if parts else 0.0
    return out


def cell_record(cell: Cell, ts: TaskSet, task: TaskData, result: methods_lib.MethodOutput, seconds: float) -> dict:
    """The results.jsonl line of one cell: its key, metrics (and per-source metrics), method info."""
    rec = {"cell": cell.id, "model": cell.model, "method": cell.method, "task": task.name, "source": task.source,
           "group": ts.group_of(task), "seed": cell.seed, "settings": cell.settings, "num_instances": len(result.records),
           "metrics": cell_metrics(result.records, task)}
    if result.by_source:
        rec["by_source"] = {name: cell_metrics([{**r, "prediction": p} for r, p in zip(result.records, preds)], task)
                            for name, preds in result.by_source.items()}
    if result.info:
        rec["info"] = result.info
    rec["seconds"] = round(seconds, 3)
    return rec


def _compiles(engine: Any) -> int:
    n = getattr(engine, "num_compiles", None)
    return int(n) if n is not None else len(engine.compiled_shapes)


def _progress(total: int, enabled: bool) -> Any:
    from jaxlm.progress import bar

    return bar(total, "eval cells", "cell", show=None if enabled else False)  # a terminal only, as elsewhere


def run_from_gin(workdir: str | Path) -> dict[str, Any]:
    """`eval_sweep` with every argument from the parsed gin config (the `jaxlm eval` entry point)."""
    if not workdir:
        raise UsageError("jaxlm eval needs --workdir")
    return eval_sweep(workdir)
