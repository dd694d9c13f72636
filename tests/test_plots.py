"""`jaxlm.eval.plots` and its callers: a missing (method, task) cell is a gap (a NaN bar, left out of
means), never a bar of height 0; values are read back from the matplotlib Axes."""

from __future__ import annotations

import math

import pytest

from jaxlm.eval import plots


def _bar_sets(ax):
    from matplotlib.container import BarContainer

    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _bars(ax):
    """{legend label: [bar heights in x order]} of a grouped bar chart."""
    return {c.get_label(): [p.get_height() for p in c.patches] for c in _bar_sets(ax)}


def _capture(monkeypatch) -> dict:
    """Patch `plots.save` to keep each saved figure, by the file name of its first path."""
    drawn, save = {}, plots.save

    def keep(fig, *paths):
        drawn[paths[0].name] = fig
        return save(fig, *paths)

    monkeypatch.setattr(plots, "save", keep)
    return drawn


def _same(got, want):
    return len(got) == len(want) and all(
        (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w) for g, w in zip(got, want))


def test_grouped_bars_draw_a_missing_cell_as_nan_not_zero():
    values = {("zero", "t1"): 40.0, ("zero", "t2"): 60.0, ("zero", "t3"): 0.0,
              ("icil", "t1"): 50.0, ("icil", "t3"): None}  # icil has no t2; its t3 is None
    fig, ax = plots.grouped_bars(values, ["zero", "icil"], ["t1", "t2", "t3"], mean="mean",
                                 labels={"icil": "ICIL"}, errors={("icil", "t1"): 2.0})
    bars = _bars(ax)
    assert _same(bars["zero"], [40.0, 60.0, 0.0, 100.0 / 3])  # a real 0 stays 0
    assert _same(bars["ICIL"], [50.0, math.nan, math.nan, 50.0])  # gaps; the mean skips them
    assert [t.get_text() for t in ax.get_xticklabels()] == ["t1", "t2", "t3", "mean"]
    # Bars of one group sit side by side within 0.8 of the slot, centred on the tick.
    zero, icil = _bar_sets(ax)
    assert [p.get_x() + p.get_width() / 2 for p in (zero.patches[0], icil.patches[0])] == pytest.approx([-0.2, 0.2])
    # Only the series with errors gets error bars.
    assert zero.errorbar is None and icil.errorbar is not None


def test_report_plot_methods_leaves_a_gap_for_a_method_without_a_group(tmp_path, monkeypatch):
    from jaxlm.eval import report

    rows = [{"model": "m", "method": "def", "group": "g1", "task": "a", "seed": 0, "metrics": {"score": 30.0}},
            {"model": "m", "method": "def", "group": "g2", "task": "b", "seed": 0, "metrics": {"score": 10.0}},
            {"model": "m", "method": "icil", "group": "g1", "task": "a", "seed": 0, "metrics": {"score": 70.0}}]
    drawn = _capture(monkeypatch)
    path = report.plot_methods(report.summarize(rows), "m", "score", tmp_path / "plots" / "m_score.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = drawn["m_score.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["g1", "g2", "all"]
    bars = _bars(ax)
    assert _same(bars["def"], [30.0, 10.0, 20.0])
    assert _same(bars["icil"], [70.0, math.nan, 70.0])


def test_demo_plots_a_missing_smollm2_cell_as_a_gap(tmp_path, monkeypatch):
    from jaxlm.experiment.demo import DemoRun

    drawn = _capture(monkeypatch)
    mc = {"study": "smollm2", "kind": "bigbench", "metric": "acc_norm % (per byte)"}
    smol = [{**mc, "method": "zero_shot", "task": "winowhy", "score": 55.0},
            {**mc, "method": "zero_shot", "task": "navigate", "score": 48.0},
            {**mc, "method": "icil", "task": "navigate", "score": 51.0},
            {"study": "smollm2", "kind": "superni", "metric": "ROUGE-L", "method": "icil", "task": "task645", "score": 20.0}]
    rewrite = [{"study": "rewrite", "method": "no_instruction", "exact_match": 10.0},
               {"study": "rewrite", "method": "in_context", "exact_match": 80.0}]
    DemoRun(tmp_path).plot(rewrite, smol)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["rewrite_methods.png", "smollm2_bigbench.png",
                                                                      "smollm2_superni.png"]
    bars = _bars(drawn["smollm2_bigbench.png"].axes[0])
    assert _same(bars["zero_shot"], [55.0, 48.0]) and _same(bars["icil"], [math.nan, 51.0])
    assert drawn["smollm2_bigbench.png"].axes[0].get_ylabel() == "acc_norm % (per byte)"
    assert _same(_bars(drawn["smollm2_superni.png"].axes[0])["icil"], [20.0])
    assert drawn["smollm2_superni.png"].axes[0].get_ylabel() == "ROUGE-L"
    ax = drawn["rewrite_methods.png"].axes[0]
    # First method on top: barh draws bottom-up, so the heights come reversed.
    assert [p.get_width() for p in ax.patches] == [80.0, 10.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ['rule in context ("x|y|z=")', 'no instruction ("z=")']


def test_hbars_and_lines():
    _, ax = plots.hbars(["a", "b", "c"], [10.0, None, 30.0])
    assert _same([p.get_width() for p in ax.patches], [30.0, math.nan, 10.0])
    _, ax = plots.lines({"uniform": {1000: [40.0, 60.0], 100: [10.0]}, "power_law": {100: 5.0}},
                        styles={"uniform": {"fmt": "o-", "color": "tab:blue"}}, logx=True)
    uniform, power = ax.lines
    assert list(uniform.get_xdata()) == [100, 1000] and list(uniform.get_ydata()) == [10.0, 50.0]
    assert uniform.get_color() == "tab:blue" and list(power.get_ydata()) == [5.0]
    # Each seed of a list is a dot beside the mean line.
    assert sorted(map(tuple, ax.collections[0].get_offsets().tolist())) == [(100, 10.0), (1000, 40.0), (1000, 60.0)]
    assert ax.get_xscale() == "log"


def test_save_writes_a_png_to_every_path(tmp_path):
    fig, _ = plots.scatter({"t1": [(0.1, 2.0), (0.5, -1.0)], "t2": []}, hline=0)
    first = plots.save(fig, tmp_path / "a" / "x.png", tmp_path / "y.png")
    assert first == tmp_path / "a" / "x.png"
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (tmp_path / "a" / "x.png", tmp_path / "y.png"))
