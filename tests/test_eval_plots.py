"""The plots of `gpl eval` say what they show: words in titles, honest axes, spread only with seeds,
legends that name every method that ran (pure plotting logic on a small hand-made results dict)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from gpl.eval.plots import METRICS, figures, method_labels, plot  # noqa: E402
from gpl.eval.report import BAR_METRICS, markdown, tables  # noqa: E402

METHODS = {"exposed": "Exposed only", "gpl": "GPL (content anchors + calibrator)",
           "gpl-noconf": "GPL w/o confidence (w=1)", "gpl-text": "GPL LLM text anchors + calibrator"}


def _stat(mean: float, seeds: int) -> dict[str, float]:
    return {"mean": mean, "std": 0.02 if seeds > 1 else 0.0, "n": seeds}


def results(seeds: int, *, anchors: str = "llm") -> dict[str, Any]:
    """A results.json as gpl eval writes it: gpl and gpl-noconf share one HR curve; gpl-text is below chance."""
    summary = {}
    for i, m in enumerate(METHODS):
        s = {k: _stat(0.2 + 0.05 * i, seeds) for k in METRICS}
        s["es_auc"] = _stat(0.45 if m == "gpl-text" else 0.7 + 0.02 * i, seeds)
        s["coverage@10"] = _stat(4.5 + 0.1 * i, seeds)
        curve = 0.3 if m in ("gpl", "gpl-noconf") else 0.1 + 0.05 * i
        s.update({f"curve_hr@{k}": _stat(curve + 0.01 * k, seeds) for k in range(1, 21)})
        summary[m] = {"all": s}
    rel = {"predicted": [0.05, 0.5, None], "observed": [0.04, 0.45, None], "count": [100, 10, 0]}
    return {
        "dataset": {"name": "tiny"}, "config": {"seeds": seeds}, "methods": dict(METHODS), "unavailable": {},
        "scopes": {"all": 10}, "anchors": {"mode": anchors}, "summary": summary,
        "pseudo_labels": {m: {"reliability": rel, "pl_ece": 0.01, "pl_mean": 0.05} for m in ("gpl", "gpl-noconf")},
        "closed_loop_calibration": {"gpl": {"groups": [{"reliability": rel, "label_ece": 0.02, "joined": 110}]}},
    }


@pytest.fixture
def figs() -> Any:
    made: list[dict[str, Any]] = []

    def make(res: dict[str, Any]) -> dict[str, Any]:
        made.append(figures(res))
        return made[-1]

    yield make
    for f in made:
        for fig in f.values():
            plt.close(fig)


def _legend_texts(fig: Any) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return [t.get_text() for lg in legends for t in lg.get_texts()]


def test_metric_panels_have_words_and_honest_axes(figs: Any) -> None:
    fig = figs(results(3))["metrics.png"]
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert len(panels) == len(METRICS) == len(BAR_METRICS)
    for code, (words, floor) in METRICS.items():
        title, ax = next((t, a) for t, a in panels.items() if f"[{code}]" in t)
        assert title.startswith(words) and not title.startswith(code)
        low, _ = ax.get_ylim()
        if floor:  # AUC-like: bars grow from the chance line, said in the title, a bar below chance points down
            assert "0.5 = chance" in title and low < 0.5
            assert any(line.get_ydata()[0] == 0.5 for line in ax.get_lines())
            bottoms = {round(p.get_y(), 6) for p in ax.patches}
            assert bottoms == {0.5}
        else:
            assert low == 0.0, code


def test_spread_only_with_more_than_one_seed(figs: Any) -> None:
    one, three = figs(results(1)), figs(results(3))
    assert "one seed" in one["metrics.png"]._suptitle.get_text()
    assert "over 3 seeds" in three["metrics.png"]._suptitle.get_text()

    def errorbars(f: Any) -> int:
        return sum(c.errorbar is not None for ax in f.axes for c in ax.containers if isinstance(c, BarContainer))

    assert errorbars(one["metrics.png"]) == 0 and errorbars(three["metrics.png"]) == len(METRICS)

    def bands(f: Any) -> int:
        return sum(isinstance(c, PolyCollection) for ax in f.axes for c in ax.collections)

    assert bands(one["hr_curves.png"]) == 0 and bands(three["hr_curves.png"]) > 0


def test_legends_name_every_method_and_hide_no_curve(figs: Any) -> None:
    f = figs(results(3))
    for name in ("metrics.png", "hr_curves.png"):
        texts = " | ".join(_legend_texts(f[name]))
        for m, label in METHODS.items():
            assert f"{m}: {label}" in texts, (name, m)
    hr = f["hr_curves.png"]
    ax = hr.axes[0]
    # gpl and gpl-noconf coincide: one line, named for both, so neither silently covers the other
    assert len(ax.get_lines()) == 3
    assert any("gpl: " in t and "gpl-noconf: " in t and "identical" in t for t in _legend_texts(hr))
    assert ax.get_ylim()[0] == 0.0
    legend = ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1  # outside the axes
    rel = f["reliability.png"]
    texts = _legend_texts(rel)
    assert any("later met by a real label" in t for t in texts)
    assert any("gpl: " in t and "gpl-noconf: " in t for t in texts)


def test_memory_anchors_are_not_called_llm(figs: Any) -> None:
    res = results(1, anchors="memory")
    assert "LLM text anchors" not in method_labels(res)["gpl-text"] and "no LLM" in method_labels(res)["gpl-text"]
    texts = " | ".join(_legend_texts(figs(res)["metrics.png"]))
    assert "LLM text anchors" not in texts and "in-memory generator" in texts
    assert "in-memory generator" in markdown({**_report_fields(res)})
    assert any("in-memory generator" in r[0] for _, _, rows in tables(res) for r in rows)
    assert method_labels(results(1))["gpl-text"] == METHODS["gpl-text"]


def _report_fields(res: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(res)
    out["dataset"] |= {"digest": "x", "split": {}, "stats": {}}
    out["config"] |= {"epochs": 1, "encoder": "e"}
    out["anchors"] |= {"books": {}, "users_total": 1, "rest": "", "users_with_text_anchors": 0}
    out["timing_s"] = {}
    out["closed_loop_calibration"] = {}
    return out


def test_plot_writes_the_three_files(tmp_path: Path) -> None:
    written = plot(results(2), tmp_path)
    assert sorted(p.name for p in written) == ["hr_curves.png", "metrics.png", "reliability.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
