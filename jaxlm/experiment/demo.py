"""`make demo`: the instruction-learning study end to end on embedded defaults, minutes on a CPU.

Stages, each a gin experiment in jaxlm/configs/demo/ that reruns alone (`jaxlm train|eval --gin_file=...`)
and each resumes: a training stage is skipped when its output exists, an evaluation stage skips the
results already in RUN/results.jsonl, so a killed demo resumes where it stopped:
  rules    generate the string-rewrite rules (setting.gin) -> RUN/rules/{train,heldout}.jsonl
  base     a byte-level Llama from scratch on "x|y|z=" rows (base.gin), then on packed rows that see
           each other, for ICIL-style prompts (base_context.gin) -> RUN/base_hf
  tagi     per-rule LoRA teachers, hypernetwork pretraining, then finetuning (tagi.gin) -> RUN/tagi
  rewrite  unseen rules: no instruction, rule in context, ICIL-style demos, generated adapters
           (eval_rewrite.gin) -> RUN/rewrite
  smollm2  SmolLM2-135M-Instruct with zero-shot `def`, `def_pos2`, ICIL and cross-task prompts on
           BIG-bench multiple choice (rank classification, per-byte normalised: acc_norm) and on
           Super-NI test tasks (generation, ROUGE-L) (smollm2.gin) -> RUN/smollm2; it reads real task
           data from the task-data root (--data_dir, $JAXLM_DATA_DIR, ../shared/data) and is skipped in
           one line when that is absent
Every result is appended to RUN/results.jsonl as it comes (`jaxlm.jsonl.ResultsLog`: fsynced, a torn
last line dropped, rows already there not appended twice); RUN/table.md and RUN/plots/*.png
(`jaxlm.eval.plots`) at the end.
`overrides` (extra gin files parsed after each stage's own) rescale every stage at once, e.g.
jaxlm/configs/tests/tiny_demo.gin for the test-size run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxlm.errors import UsageError
from jaxlm.jsonl import ResultsLog, json_line
from jaxlm.files import write_atomically

DEMO_DIR = "jaxlm/configs/demo"
STAGES = ("rules", "base", "tagi", "rewrite", "smollm2")
METHOD_LABELS = {
    "no_instruction": "no instruction (\"z=\")",
    "in_context": "rule in context (\"x|y|z=\")",
    "icil": "ICIL-style cross-task demos + rule",
    "hypernet": "hypernetwork adapter (TAGI), \"z=\"",
    "teacher": "per-rule LoRA teacher (oracle)",
}


class DemoRun:
    """One run directory and the gin overrides every stage gets; `run()` does the stages in order."""

    def __init__(self, workdir: str | Path, overrides: Sequence[str] = (), bindings: Sequence[str] = (),
                 search_paths: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir).resolve()
        self.overrides, self.bindings, self.search_paths = list(overrides), list(bindings), list(search_paths)
        self.results = self.workdir / "results.jsonl"
        # A row is the result of (study, method, task[, settings]): what `pending` checks before appending
        # again (a SmolLM2 cell rerun with other sweep settings is a new row; the report takes the last).
        self.log = ResultsLog(self.results, key=lambda r: (r.get("study"), r.get("method"), r.get("task"),
                                                          r.get("settings")))
        self.stage_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ plumbing
    def parse(self, stage_file: str, bindings: Sequence[str] = ()) -> None:
        from jaxlm.experiment.gin_config import parse_config

        parse_config([f"{DEMO_DIR}/{stage_file}", *self.overrides], [*bindings, *self.bindings], self.search_paths)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        self.log.append(rows)

    def done(self, study: str) -> list[dict[str, Any]]:
        return [r for r in self.log.rows() if r.get("study") == study]

    def rules(self) -> Any:
        import gin

        from jaxlm.data.string_rewrite import RewriteConfig

        self.parse("setting.gin")
        return gin.get_configurable(RewriteConfig)()

    def train_row(self, stage: str, run: Path) -> dict[str, Any]:
        """The last logged metrics of a training run (its metrics.jsonl), appended to results.jsonl."""
        logged = [r for r in ResultsLog(run / "metrics.jsonl").rows() if "loss" in r]  # torn last line and eval/* lines skipped
        if not logged:
            raise UsageError(f"{run / 'metrics.jsonl'}: no logged step; delete {run} and rerun the demo")
        last = logged[-1]
        row = {"study": "train", "stage": stage, "step": last["step"], "loss": _rounded(last.get("loss")),
               "accuracy": _rounded(last.get("accuracy")), "run": str(run)}
        self.append([row])
        return row

    # ------------------------------------------------------------------ stages
    def stage_rules(self) -> str:
        from jaxlm.data.string_rewrite import rewrite_tasks

        config = self.rules()
        out = self.workdir / "rules"
        counts = {}
        for part, name in (("train", "train"), ("test", "heldout")):
            tasks = rewrite_tasks(config, part=part)
            counts[name] = (len(tasks), sum(len(t.instances) for t in tasks))
            rows = [{"rule": t.name, "x": t.metadata["x"], "y": t.metadata["y"], "definition": t.definition,
                     "examples": [[i.input, i.outputs[0]] for i in t.instances]} for t in tasks]
            write_atomically(out / f"{name}.jsonl",
                             lambda f, rows=rows: f.write("".join(json_line(r, ensure_ascii=True) for r in rows)))
        return (f"{counts['train'][0]} training rules ({counts['train'][1]} examples), {counts['heldout'][0]} "
                f"held-out rules ({counts['heldout'][1]} examples) -> {out}")

    def train_and_export(self, stage_file: str, bindings: Sequence[str], run: Path, target: Path) -> dict[str, Any]:
        """Train one gin experiment into `run` (resuming it) and export its params as a HF dir (the
        objective's `export`: a full finetune's config.json + model.safetensors)."""
        import gin

        from jaxlm.experiment.runner import run_parsed_config

        self.parse(stage_file, bindings)
        out = run_parsed_config(run)
        gin.get_bindings("train")["objective"].export(target, out["state"].params, out["frozen"])
        return self.train_row(stage_file.removesuffix(".gin"), run)

    def stage_base(self) -> str:
        """Two phases: single rows (base.gin), then packed rows that see each other (base_context.gin)."""
        target, phase1 = self.workdir / "base_hf", self.workdir / "base_rows_hf"
        if (target / "config.json").is_file():
            return f"exists: {target}"
        if not (phase1 / "config.json").is_file():
            self.train_and_export("base.gin", [], self.workdir / "base", phase1)
        row = self.train_and_export("base_context.gin", [f"BASE_PHASE1 = '{phase1}'"],
                                    self.workdir / "base_context", target)
        return f"loss {row['loss']:.3f} after {row['step']} packed steps -> {target}"

    def stage_tagi(self) -> str:
        from jaxlm.experiment.runner import run_parsed_config

        run = self.workdir / "tagi"
        if (run / "stage2" / "hypernet" / "hypernet.json").is_file():
            summary = f"exists: {run}"
        else:
            self.parse("tagi.gin", [f"BASE = '{self.workdir / 'base_hf'}'"])
            run_parsed_config(run)
            rows = [self.train_row(f"tagi/{scope}", run / scope) for scope in ("teachers", "stage1", "stage2")]
            summary = "; ".join(f"{r['stage']}: loss {r['loss']:.3f} after {r['step']} steps" for r in rows) + f" -> {run}"
        teachers = run / "teachers" / "teachers"
        if (teachers / "teachers.json").is_file():
            fit = self.teacher_fit(teachers)
            summary += (f"\n  LoRA teachers ({fit['teachers']} training rules): exact match {fit['own_rows_em']:.1f}% on "
                        f"their own rows, {fit['fresh_inputs_em']:.1f}% on new inputs (rule in context: "
                        f"{fit['fresh_inputs_in_context_em']:.1f}%)")
        return summary

    def teacher_fit(self, teachers: Path) -> dict[str, Any]:
        """The "teachers" row: `jaxlm.eval.rewrite.teacher_fit` of the L_ins teachers (once per run dir)."""
        done = self.done("teachers")
        if done:
            return done[-1]
        import jaxlm
        from jaxlm.eval.engine import Engine
        from jaxlm.eval.rewrite import teacher_fit

        config = self.rules()
        engine = Engine(jaxlm.load_pretrained(self.workdir / "base_hf"), batch_size=64, buckets=(32, 64, 128, 256))
        row = {"study": "teachers", "method": "teacher", **teacher_fit(engine, teachers, config)}
        self.append([row])
        return row

    def stage_rewrite(self) -> str:
        import gin

        from jaxlm.eval.rewrite import RewriteEval

        self.parse("eval_rewrite.gin", [f"BASE = '{self.workdir / 'base_hf'}'", f"HYPERNET = '{self.workdir / 'tagi'}'"])
        evaluator = gin.get_configurable(RewriteEval)()

        def report(row: dict[str, Any]) -> None:
            print(f"  {METHOD_LABELS.get(row['method'], row['method'])}: exact match {row['exact_match']:.2f}%, "
                  f"NLL/token {row['target_nll']:.3f}", flush=True)
            self.append(self.log.pending([row]))  # a rerun of a deleted RUN/rewrite adds no second row

        rows = evaluator.run(self.workdir / "rewrite", on_result=report)
        self.append(self.log.pending(rows))  # rows evaluated by a run killed before appending
        return f"{rows[0]['rules']} held-out rules x {rows[0]['examples'] // rows[0]['rules']} examples"

    def stage_smollm2(self) -> str:
        from jaxlm.eval.report import expand_rows
        from jaxlm.eval.sweep import run_from_gin

        self.parse("smollm2.gin")
        missing = _missing_task_data(("bigbench", "superni"))
        if missing:
            return (f"skipped: it reads real task data and {', '.join(missing)} is not there; set JAXLM_DATA_DIR "
                    f"or pass --data_dir DIR (a folder with bigbench/ and superni/) to run it")
        out = run_from_gin(self.workdir / "smollm2")
        rows = out["reported"]  # this grid's cells, each its last line (not cells of an earlier grid)
        normalization = out.get("rank_normalization", "sum")
        source = {r["task"]: r["source"] for r in rows}
        settings = {(r["method"], r["task"]): r.get("settings", "") for r in rows}
        demo_rows = []
        for r in expand_rows(rows):  # + cross-task's :mean / :best variants
            kind, metric, key = _smollm2_metric(source[r["task"]], normalization)
            if key in r["metrics"]:
                demo_rows.append({"study": "smollm2", "kind": kind, "metric": metric, "model": r["model"],
                                  "method": r["method"], "task": r["task"],
                                  "settings": settings[(r["method"].split(":")[0], r["task"])],
                                  "score": round(float(r["metrics"][key]), 2)})
        self.append(self.log.pending(demo_rows))
        return f"{out['cells']} cells ({out['ran']} run), {out['num_compiles']} compiled shapes"

    # ------------------------------------------------------------------ run
    def run(self, stages: Sequence[str] = STAGES, log: Callable[[str], None] = print) -> Path:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise UsageError(f"--stages: {unknown} unknown; expected some of {STAGES}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log(f"jaxlm demo -> {self.workdir}")
        for i, stage in enumerate(stages, 1):
            log(f"\n[{i}/{len(stages)}] {stage}")
            start = time.perf_counter()
            summary = getattr(self, f"stage_{stage}")()
            self.stage_seconds[stage] = time.perf_counter() - start
            log(f"[{i}/{len(stages)}] {stage}: {summary} ({self.stage_seconds[stage]:.0f}s)")
        table = self.write_reports()
        log("\n" + table)
        log(f"\nrun directory: {self.workdir}")
        return self.workdir

    # ------------------------------------------------------------------ reports
    def write_reports(self) -> str:
        rewrite, smol = self.done("rewrite"), self.done("smollm2")
        lines = ["# jaxlm demo results", ""]
        if rewrite:
            r0 = rewrite[0]
            lines += [f"## Unseen string-rewrite rules ({r0['rules']} held-out rules, {r0['examples']} examples)", "",
                      "| method | exact match % | NLL / target token |", "|---|---|---|"]
            lines += [f"| {_cell(METHOD_LABELS.get(r['method'], r['method']))} | {r['exact_match']:.2f} | "
                      f"{r['target_nll']:.3f} |" for r in rewrite]
            lines.append("")
        fit = self.done("teachers")
        if fit:
            f = fit[-1]
            lines += [f"LoRA teachers of {f['teachers']} training rules (the L_ins targets): exact match "
                      f"{f['own_rows_em']:.2f}% on their own training rows, {f['fresh_inputs_em']:.2f}% on new inputs "
                      f"of their rule ({f['fresh_inputs_in_context_em']:.2f}% with the rule in context).", ""]
        for kind, rows in _by_kind(smol).items():
            tasks, methods, score = _score_grid(rows)
            lines += [f"## SmolLM2-135M-Instruct, {SMOLLM2_TITLES[kind]} ({rows[0].get('metric', 'accuracy %')})", "",
                      "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
            for m in methods:
                vals = [score.get((m, t)) for t in tasks]
                known = [v for v in vals if v is not None]
                mean = sum(known) / len(known) if known else float("nan")
                lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + f" | {mean:.1f} |")
            lines.append("")
        if self.stage_seconds:
            lines += ["Stage wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_seconds.items()), ""]
        text = "\n".join(lines)
        write_atomically(self.workdir / "table.md", lambda f: f.write(text))
        self.plot(rewrite, smol)
        return text

    def plot(self, rewrite: list[dict], smol: list[dict]) -> None:
        from jaxlm.eval import plots

        out = self.workdir / "plots"
        out.mkdir(parents=True, exist_ok=True)
        if rewrite:
            fig, _ = plots.hbars([METHOD_LABELS.get(r["method"], r["method"]) for r in rewrite],
                                 [r["exact_match"] for r in rewrite], xlabel="exact match on unseen rules (%)",
                                 xlim=(0, 100), title="String rewrites: unseen rules")
            plots.save(fig, out / "rewrite_methods.png")
        for kind, rows in _by_kind(smol).items():
            tasks, methods, score = _score_grid(rows)
            fig, _ = plots.grouped_bars(score, methods, tasks, figsize=(8, 3.8), ylabel=rows[0].get("metric", "accuracy %"),
                                        title=f"SmolLM2-135M-Instruct, {SMOLLM2_TITLES[kind]}",
                                        tick_kw={"fontsize": 7, "rotation": 15}, legend_kw={"fontsize": 7, "ncol": 2})
            plots.save(fig, out / f"smollm2_{kind}.png")
        runs = {r["stage"]: Path(r["run"]) / "metrics.jsonl" for r in self.done("train")}
        runs = {k: v for k, v in runs.items() if v.is_file()}
        if runs:
            curves = {stage: {m["step"]: m["loss"] for m in ResultsLog(path).rows() if m.get("loss") is not None}
                      for stage, path in runs.items()}
            fig, _ = plots.lines(curves, figsize=(7, 3.5), xlabel="step", ylabel="training loss", logy=True)
            plots.save(fig, out / "training_loss.png")


SMOLLM2_TITLES = {"bigbench": "BIG-bench multiple choice", "superni": "Super-NI test tasks, generation"}
ACC_NAMES = {"sum": "accuracy %", "mean": "accuracy % (per-token mean)", "byte": "acc_norm % (per byte)"}


def _smollm2_metric(source: str, normalization: str) -> tuple[str, str, str]:
    """(kind, metric label, metrics key) of a SmolLM2 sweep row by its task source: Super-NI rows are
    ROUGE-L, others (BIG-bench multiple choice) accuracy under the sweep's rank normalisation."""
    if source == "superni":
        return "superni", "ROUGE-L", "rougeL"
    return "bigbench", ACC_NAMES.get(normalization, "accuracy %"), "score"


def _by_kind(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{kind: rows} of the SmolLM2 rows, the last row of each (method, task) only (a rerun with other
    settings appends a newer one)."""
    latest = {(r.get("kind", "bigbench"), r["method"], r["task"]): r for r in rows}
    out: dict[str, list[dict[str, Any]]] = {}
    for (kind, _, _), r in latest.items():
        out.setdefault(kind, []).append(r)
    return out


def _score_grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(tasks, methods) in first-seen order and {(method, task): score} of the SmolLM2 rows."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return tasks, methods, {(r["method"], r["task"]): r["score"] for r in rows}


def _missing_task_data(folders: Sequence[str]) -> list[str]:
    """The source folders the parsed sweep would read that do not exist (under `eval_sweep.data_dir`
    when bound, else the task-data root `jaxlm.files.data_root`)."""
    import gin

    from jaxlm.files import data_root

    try:
        explicit = gin.query_parameter("eval_sweep.data_dir")
    except ValueError:
        explicit = None
    root = Path(explicit) if explicit else data_root()
    return [str(root / f) for f in folders if not (root / f).is_dir()]


def _rounded(value: Any) -> float | None:
    """A logged metric rounded to 4 places; None when it was not logged or not finite (null in JSON)."""
    return None if value is None else round(float(value), 4)


def _cell(text: str) -> str:
    """Text as one markdown table cell ("|" escaped)."""
    return text.replace("|", "\\|")


def run_demo(workdir: str, overrides: Sequence[str] = (), bindings: Sequence[str] = (),
             stages: Sequence[str] = STAGES, search_paths: Sequence[str] = ()) -> int:
    """Run the demo's `stages` into `workdir` (see the module docstring); 0 when done.

    Args:
      workdir: the run directory (a rerun resumes it).
      overrides: extra gin files parsed after every stage's own.
      bindings: extra 'KEY = value' bindings for every stage.
      stages: a subset of `STAGES`, run in the order given.
      search_paths: directories to look gin files up in.

    Raises:
      UsageError: an unknown stage; ConfigError: a gin problem, before the stage computes anything.
    """
    DemoRun(workdir, overrides, bindings, search_paths).run(stages)
    return 0
