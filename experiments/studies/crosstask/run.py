"""Study 3 analysis: per-target table of the sweep, and gain from each source vs activation similarity.

Run after the sweep (`jaxlm eval --gin_file=experiments/studies/crosstask/crosstask.gin --workdir W`):
    python experiments/studies/crosstask/run.py --workdir W [--plots_dir docs/plots]

For every (source, target) pair: gain = accuracy of the target with that source's one-shot prompt
minus the target's zero-shot accuracy (both from W/results.jsonl), and similarity = cosine of the two
tasks' SmolLM2 activations (`jaxlm.eval.activations.task_vectors`: mean over the first `num_inputs`
inputs of each task of the mean-pooled hidden states). Declared before looking at the results, the
primary measure is the middle layer, inputs alone, centered cosine (the mean of all tasks' vectors
subtracted: raw mean-pooled cosines all sit near 1); the others are reported beside it.
Writes W/analysis.json, W/analysis.md and PNGs (`jaxlm.eval.plots`, dpi 100) to --plots_dir; a
(method, target) pair without a result is a gap in the bar chart and left out of its mean.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from jaxlm.eval import plots
from jaxlm.files import write_atomically
from jaxlm.jsonl import ResultsLog

METHODS = [("zero_shot", "zero-shot (def)"), ("crosstask:mean", "cross-task 1-shot, mean of sources"),
           ("crosstask:best", "cross-task 1-shot, best source (oracle)"), ("crosstask", "cross-task, vote of sources"),
           ("crosstask:mean_pl_sources", "cross-task 1-shot, mean of the pseudo-label sources"),
           ("pseudo_labels:mean", "+2 pseudo-labelled demos, mean of sources"),
           ("pseudo_labels", "+2 pseudo-labelled demos, vote"), ("gold_fewshot", "2 gold in-task demos")]


def method_scores(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{method variant: {target: accuracy}} with the `:mean` / `:best` variants of jaxlm.eval.report."""
    from jaxlm.eval.report import expand_rows

    out: dict[str, dict[str, float]] = {}
    for r in expand_rows(rows):
        out.setdefault(r["method"], {})[r["task"]] = float(r["metrics"]["score"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--plots_dir", default="docs/plots")
    ap.add_argument("--data_dir", default="../shared/data")
    ap.add_argument("--num_inputs", type=int, default=8)
    ap.add_argument("--layers", default="15,30", help="1-based block counts; the first is the primary one")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    rows = list(ResultsLog(workdir / "results.jsonl", key=lambda r: r["cell"]).latest().values())
    scores = method_scores(rows)
    zero = scores["zero_shot"]
    targets = sorted(zero)
    by_source = {r["task"]: {s: m["score"] for s, m in r["by_source"].items()} for r in rows if r["method"] == "crosstask"}
    sources = list(next(iter(by_source.values())))
    pl_sources = next((list(r["by_source"]) for r in rows if r["method"] == "pseudo_labels"), None)
    if pl_sources:  # pseudo-labels may use fewer sources: the matching cross-task baseline
        scores["crosstask:mean_pl_sources"] = {t: float(np.mean([v[s] for s in pl_sources]))
                                               for t, v in by_source.items()}
    gains = {(s, t): by_source[t][s] - zero[t] for t in targets if t in by_source for s in sources}

    from scipy import stats

    import jaxlm
    from jaxlm.data.sources import load_tasks
    from jaxlm.eval import activations
    from jaxlm.eval.engine import Engine

    src_tasks = load_tasks("superni", args.data_dir, names=sources)
    tgt_tasks = load_tasks("bigbench", args.data_dir, names=targets)
    tasks = {**src_tasks, **tgt_tasks}
    engine = functools.cache(lambda: Engine(jaxlm.load_pretrained("smollm2-135m-instruct"), batch_size=8))
    texts = {
        "inputs": {n: [i.input for i in t.instances[: args.num_inputs]] for n, t in tasks.items()},
        "definition+input": {n: [f"Definition: {t.definition.strip()}\nInput: {i.input.strip()}"
                                 for i in t.instances[: args.num_inputs]] for n, t in tasks.items()},
    }
    pairs = sorted(gains)
    gain_P = np.array([gains[p] for p in pairs])
    measures = []
    for layer in [int(x) for x in args.layers.split(",")]:
        for text_kind, by_task in texts.items():
            vecs = cached_task_vectors(workdir / "activations" / f"layer{layer}_{text_kind}_n{args.num_inputs}.npz",
                                       lambda by_task=by_task, layer=layer: activations.task_vectors(
                                           engine(), by_task, layer=layer))
            names = list(vecs)
            center = np.mean([vecs[n] for n in names], axis=0)
            for centered in (True, False):
                sim = {(s, t): float(activations.cosine_matrix(vecs[s][None], vecs[t][None],
                                                                center if centered else None)[0, 0]) for s, t in pairs}
                sim_P = np.array([sim[p] for p in pairs])
                pr, pp = stats.pearsonr(sim_P, gain_P)
                sr, sp = stats.spearmanr(sim_P, gain_P)
                # Within target: per-target means removed, so a target that every source helps does not count.
                wr = stats.pearsonr(within_target(sim_P, pairs), within_target(gain_P, pairs))[0]
                wsr = stats.spearmanr(within_target(sim_P, pairs), within_target(gain_P, pairs))[0]
                measures.append({"layer": layer, "text": text_kind, "centered": centered,
                                 "pearson": float(pr), "pearson_p": float(pp), "spearman": float(sr),
                                 "spearman_p": float(sp), "within_pearson": float(wr), "within_spearman": float(wsr),
                                 "num_pairs": len(pairs), "similarity": sim_P.tolist()})
                print(f"layer {layer:2d} {text_kind:16s} centered={centered!s:5s} pearson {pr:+.3f} (p {pp:.3f}) "
                      f"spearman {sr:+.3f} (p {sp:.3f}) n={len(pairs)}", flush=True)
    primary = measures[0]
    result = {"targets": targets, "sources": sources, "scores": scores,
              "pairs": [{"source": s, "target": t, "gain": gains[(s, t)], "similarity": primary["similarity"][i]}
                        for i, (s, t) in enumerate(pairs)],
              "measures": measures, "primary": {k: v for k, v in primary.items() if k != "similarity"}}
    write_atomically(workdir / "analysis.json", lambda f: json.dump(result, f, indent=1))
    write_atomically(workdir / "analysis.md", lambda f: f.write(markdown(result)))
    plots = Path(args.plots_dir)
    plot_methods(scores, targets, plots / "crosstask_methods.png")
    plot_scatter(result, plots / "crosstask_gain_vs_similarity.png")
    print(markdown(result))


def within_target(x_P: np.ndarray, pairs: list[tuple[str, str]]) -> np.ndarray:
    """x minus the mean of x over the pairs with the same target."""
    targets = np.array([t for _, t in pairs])
    return x_P - np.array([x_P[targets == t].mean() for t in targets])


def cached_task_vectors(path: Path, compute) -> dict[str, np.ndarray]:
    """Task vectors from `path` when there, else computed and saved (the sweep's tasks do not change)."""
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    vecs = compute()
    write_atomically(path, lambda f: np.savez(f, **vecs), binary=True)
    return vecs


def markdown(result: dict) -> str:
    scores, targets = result["scores"], result["targets"]
    lines = ["| method | " + " | ".join(t.replace("_", " ") for t in targets) + " | mean |",
             "|---|" + "---|" * (len(targets) + 1)]
    for key, label in METHODS:
        if key not in scores:
            continue
        vals = [scores[key].get(t) for t in targets]
        mean = np.mean([v for v in vals if v is not None])
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + f" | **{mean:.1f}** |")
    lines += ["", "| layer | text | cosine | Pearson r (p) | Spearman rho (p) | within-target Pearson / Spearman | pairs |",
              "|---|---|---|---|---|---|---|"]
    for m in result["measures"]:
        lines.append(f"| {m['layer']} | {m['text']} | {'centered' if m['centered'] else 'raw'} | "
                     f"{m['pearson']:+.3f} ({m['pearson_p']:.3f}) | {m['spearman']:+.3f} ({m['spearman_p']:.3f}) | "
                     f"{m['within_pearson']:+.3f} / {m['within_spearman']:+.3f} | {m['num_pairs']} |")
    return "\n".join(lines) + "\n"


def plot_methods(scores: dict, targets: list[str], path: Path) -> None:
    methods = [(k, lab) for k, lab in METHODS if k in scores]
    fig, _ = plots.grouped_bars(
        {(key, t): v for key, _ in methods for t, v in scores[key].items()}, [k for k, _ in methods], targets,
        labels=dict(methods), mean="mean", group_labels=[t.replace("_", "\n") for t in targets] + ["mean"],
        figsize=(10, 4.2), ylabel="accuracy (%)", ylim=(0, 135),  # room for the legend above the bars
        title="SmolLM2-135M-Instruct, BIG-bench multiple choice (8 instances per task)",
        tick_kw={"fontsize": 7}, legend_kw={"fontsize": 6.5, "ncol": 3, "loc": "upper left"})
    plots.save(fig, path)


def plot_scatter(result: dict, path: Path) -> None:
    m = result["primary"]
    fig, _ = plots.scatter(
        {t: [(p["similarity"], p["gain"]) for p in result["pairs"] if p["target"] == t] for t in result["targets"]},
        hline=0, xlabel=f"activation cosine (layer {m['layer']}, {m['text']}, {'centered' if m['centered'] else 'raw'})",
        ylabel="gain of 1-shot source over zero-shot (acc. points)", title_size=9,
        title=f"Pearson {m['pearson']:+.2f}, Spearman {m['spearman']:+.2f}, n={m['num_pairs']} pairs",
        legend_kw={"fontsize": 6, "loc": "best"})
    plots.save(fig, path)


if __name__ == "__main__":
    main()
