"""A sweep's `results.json` in the shape of lm-evaluation-harness output, for tools that read it.

    {"results": {key: {"alias", "<metric>,none", "<metric>_stderr,none", ...}},
     "n-samples": {key: {"original", "effective"}}, "higher_is_better": {key: {metric: true}},
     "configs": {key: {"task", "model", "method", "seed", "source", "group"}}, "versions": {key: 1.0},
     "config": {...the sweep's settings, bootstrap_iters...}, "git_hash", "date", "package_versions"}

One entry per cell (model, method, task, seed), keyed "model/method/task" (plus "/seed N" for seeds
other than 0). Metrics are x100 as in results.jsonl: free-form cells get `exact_match` and `rougeL`
(max over references), multiple-choice cells `acc` (the method's chosen option) and, when the
predictions carry the option scores, `acc_mean` (per-token mean) and `acc_norm` (per UTF-8 byte, as
the harness defines it). Standard errors are bootstrap estimates (`bootstrap_stderr`) over the
cell's instances, seeded, so a rerun writes the same numbers.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.eval import metrics as metrics_lib

BOOTSTRAP_ITERS = 1000
PACKAGES = ("jaxlm", "jax", "jaxlib", "flax", "optax", "numpy", "transformers", "gin-config", "rouge-score")


def bootstrap_stderr(values: Sequence[float], iters: int = BOOTSTRAP_ITERS, seed: int = 1234) -> float:
    """Bootstrap standard error of the mean of `values` (std of `iters` resampled means, ddof=1).

    Args:
      values: per-instance scores.
      iters: resamples.
      seed: numpy RNG seed (the result is deterministic).

    Returns:
      The standard error, in the values' units; 0.0 for fewer than two values.
    """
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(iters, len(x)))].mean(axis=1)
    return float(np.std(means, ddof=1))


def _gold(record: dict[str, Any]) -> Any:
    return record.get("option_scores") or {i for i, o in enumerate(record["options"]) if o in record["references"]}


def instance_scores(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-instance metric values (x100) of one cell's prediction records.

    Args:
      records: the cell's predictions lines: free-form ({"prediction", "references"}) and/or
        multiple-choice ({"options", "prediction", "references", optional "option_scores",
        "option_logprobs_mean", "option_logprobs_per_byte"}).

    Returns:
      {metric: one value per instance that has it}: exact_match, rougeL (free-form), acc, and
      acc_mean / acc_norm where every multiple-choice record carries those scores.
    """
    out: dict[str, list[float]] = {}
    free = [r for r in records if "options" not in r]
    mc = [r for r in records if "options" in r]
    if free:
        out["exact_match"] = [100 * metrics_lib.max_over_references(metrics_lib.exact_match, r["prediction"], r["references"])
                              for r in free]
        out["rougeL"] = [100 * metrics_lib.max_over_references(metrics_lib.rouge_l, r["prediction"], r["references"])
                         for r in free]
    if mc:
        picked = [[float(o == r["prediction"]) for o in r["options"]] for r in mc]
        out["acc"] = [metrics_lib.rank_accuracy([p], [_gold(r)]) for p, r in zip(picked, mc)]
        for name, field in (("acc_mean", "option_logprobs_mean"), ("acc_norm", "option_logprobs_per_byte")):
            if all(field in r for r in mc):
                out[name] = [metrics_lib.rank_accuracy([r[field]], [_gold(r)]) for r in mc]
    return out


def git_hash(directory: Path | None = None) -> str | None:
    """The git commit of the jaxlm checkout (None outside a git checkout)."""
    directory = directory or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape the numbers (None when not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def harness_results(rows: Sequence[dict[str, Any]], records: dict[str, Sequence[dict[str, Any]]],
                    config: dict[str, Any], bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """The lm-evaluation-harness shaped document of a sweep.

    Args:
      rows: the results.jsonl lines of the cells to report (latest per cell).
      records: cell id -> its prediction records (a cell without any is reported without stderr).
      config: the sweep's settings (written under "config").
      bootstrap_iters: resamples per standard error.

    Returns:
      The JSON-serialisable document (see the module docstring).
    """
    doc: dict[str, Any] = {"results": {}, "groups": {}, "configs": {}, "versions": {}, "n-shot": {},
                           "higher_is_better": {}, "n-samples": {}}
    for row in rows:
        key = f"{row['model']}/{row['method']}/{row['task']}" + (f"/seed {row['seed']}" if row.get("seed") else "")
        per = instance_scores(records.get(row["cell"], []))
        result: dict[str, Any] = {"alias": key}
        for name, values in per.items():
            result[f"{name},none"] = float(np.mean(values))
            result[f"{name}_stderr,none"] = bootstrap_stderr(values, bootstrap_iters)
        if "score" in row.get("metrics", {}):
            result["score,none"] = row["metrics"]["score"]
        doc["results"][key] = result
        doc["configs"][key] = {"task": row["task"], "model": row["model"], "method": row["method"],
                               "seed": row.get("seed", 0), "source": row.get("source"), "group": row.get("group"),
                               "cell": row["cell"], "settings": row.get("settings")}
        doc["versions"][key] = 1.0
        doc["n-shot"][key] = (row.get("info") or {}).get("k_used", 0)
        doc["higher_is_better"][key] = {name: True for name in [*per, "score"]}
        n = row.get("num_instances", len(records.get(row["cell"], [])))
        doc["n-samples"][key] = {"original": n, "effective": n}
    doc["config"] = {**config, "bootstrap_iters": bootstrap_iters}
    doc["git_hash"] = git_hash()
    doc["date"] = datetime.datetime.now(datetime.timezone.utc).timestamp()
    doc["package_versions"] = package_versions()
    return doc
