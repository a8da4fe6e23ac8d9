"""The plots of `gpl eval` say what they show: words in titles, honest axes, spread only with seeds,
legends that name every method that ran, every scope in its own titled panel, marked gaps for methods
that abstained, the real size of the ranked set, no curve hidden under another, reliability with counts
and base rate (pure plotting logic on a small hand-made results dict)."""

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
from gpl.eval.plots_curves import SPREAD  # noqa: E402
from gpl.eval.report import BAR_METRICS, markdown, tables  # noqa: E402

METHODS = {"exposed": "Exposed only", "gpl": "GPL (content anchors + calibrator)",
           "gpl-noconf": "GPL w/o confidence (w=1)", "gpl-anchors": "GPL content anchors + calibrator",
           "gpl-text": "GPL LLM text anchors + calibrator"}
RAN = [m for m in METHODS if m != "gpl-anchors"]  # gpl-anchors abstained
WHY = "calibrator abstained, no pseudo-labels: does not beat the base rate on held-out users (test)"
FRESH = "fresh pairs (never exposed to the user in training)"
COUNTS = [100, 0, 0, 0, 0, 10, 0, 0, 0, 0]  # 10 bins of width 0.1, as gpl/eval/metrics.py reliability() makes
TRUTH_RATE = 0.07


def _stat(mean: float, seeds: int) -> dict[str, float]:
    return {"mean": mean, "std": 0.02 if seeds > 1 else 0.0, "n": seeds}


def _scope(i: int, m: str, seeds: int, shift: float) -> dict[str, dict[str, float]]:
    s = {k: _stat(0.2 + 0.05 * i - shift, seeds) for k in METRICS}
    s["es_auc"] = _stat(0.45 if m == "gpl-text" else 0.7 + 0.02 * i - shift, seeds)
    s["coverage@10"] = _stat(4.5 + 0.1 * i, seeds)
    curve = 0.3 if m in ("gpl", "gpl-noconf") else 0.1 + 0.03 * i
    s.update({f"curve_hr@{k}": _stat(curve + 0.01 * k - shift, seeds) for k in range(1, 21)})
    return s


def results(seeds: int, *, anchors: str = "llm", fresh: bool = True) -> dict[str, Any]:
    """A results.json as gpl eval writes it: gpl and gpl-noconf share one HR curve; gpl-text is below chance;
    gpl-anchors was asked for and abstained; the fresh scope is a little lower than 'all'."""
    summary = {m: {"all": _scope(i, m, seeds, 0.0)} for i, m in enumerate(METHODS) if m in RAN}
    if fresh:
        for i, m in enumerate(METHODS):
            if m in RAN:
                summary[m]["fresh"] = _scope(i, m, seeds, 0.03)
    rel = {"predicted": [0.05, *[None] * 4, 0.55, *[None] * 4], "observed": [0.04, *[None] * 4, 0.45, *[None] * 4],
           "count": COUNTS}
    pl = {"reliability": rel, "pl_ece": 0.01, "pl_mean": 0.05, "pl_truth_rate": TRUTH_RATE}
    return {
        "dataset": {"name": "tiny", "stats": {"candidates_per_request": 60.0, "test_requests": 10.0}},
        "config": {"seeds": seeds}, "methods": dict(METHODS), "unavailable": {"gpl-anchors": WHY},
        "scopes": {"all": 10, **({"fresh": 10} if fresh else {})}, "anchors": {"mode": anchors},
        "summary": summary, "pseudo_labels": {m: dict(pl) for m in ("gpl", "gpl-noconf")},
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


def _legends(fig: Any) -> list[Any]:
    return [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]


def _legend_texts(fig: Any) -> list[str]:
    return [t.get_text() for lg in _legends(fig) for t in lg.get_texts()]


def _panels(fig: Any, scope_words: str) -> dict[str, Any]:
    """Metric code -> axes of metrics.png in the sub-figure whose title starts with ``scope_words``."""
    sub = next(sf for sf in fig.subfigs if sf._suptitle.get_text().startswith(scope_words))
    return {code: ax for ax in sub.axes for code in METRICS if f"[{code}]" in ax.get_title()}


def _bar_heights(ax: Any) -> list[float]:
    return [p.get_height() for c in ax.containers if isinstance(c, BarContainer) for p in c.patches]


def test_metric_panels_have_words_and_honest_axes(figs: Any) -> None:
    fig = figs(results(3))["metrics.png"]
    panels = _panels(fig, "all test candidates")
    assert len(panels) == len(METRICS) == len(BAR_METRICS)
    fresh = _panels(fig, FRESH)
    for code, (words, floor) in METRICS.items():
        ax = panels[code]
        title = ax.get_title()
        assert title.startswith(words) and not title.startswith(code)
        assert ax.get_ylabel() and ax.get_xlabel()  # every axis says what it counts
        low, _ = ax.get_ylim()
        assert ax.get_ylim() == fresh[code].get_ylim()  # one range per metric: heights compare across scopes
        if floor:  # AUC-like: bars grow from the chance line, said in the title, a bar below chance points down
            assert "0.5 = chance" in title and low < 0.5
            assert any(line.get_ydata()[0] == 0.5 for line in ax.get_lines())
            bottoms = {round(p.get_y(), 6) for p in ax.patches}
            assert bottoms == {0.5}
        else:
            assert low == 0.0, code


def test_both_scopes_get_titled_panels_with_their_own_numbers(figs: Any) -> None:
    res = results(1)
    f = figs(res)
    subs = [sf._suptitle.get_text() for sf in f["metrics.png"].subfigs]
    assert subs == ["all test candidates (10 test requests)", f"{FRESH} (10 test requests)"]
    for scope, words in (("all", "all test candidates"), ("fresh", FRESH)):
        heights = _bar_heights(_panels(f["metrics.png"], words)["es_hr@10"])
        want = [res["summary"][m][scope]["es_hr@10"]["mean"] if m in RAN else None for m in METHODS]
        assert [h for h, w in zip(heights, want, strict=True) if w is not None] == pytest.approx(
            [w for w in want if w is not None])
    curves = {ax.get_title(): ax for ax in f["hr_curves.png"].axes}
    assert set(curves) == {"all test candidates (10 test requests)", f"{FRESH} (10 test requests)"}
    fresh_ax = curves[f"{FRESH} (10 test requests)"]
    exposed = res["summary"]["exposed"]["fresh"]
    assert list(fresh_ax.get_lines()[0].get_ydata()) == pytest.approx([exposed[f"curve_hr@{k}"]["mean"]
                                                                       for k in range(1, 21)])
    single = figs(results(1, fresh=False))  # no fresh scope in the results: one panel, no empty one
    assert len(single["metrics.png"].subfigs) == 1 and len(single["hr_curves.png"].axes) == 1


def test_an_abstained_method_keeps_a_marked_slot(figs: Any) -> None:
    res = results(1)
    res["methods"]["ghost"] = "asked for, never reported"  # no summary and no reason: still not dropped
    res["summary"]["exposed"]["fresh"]["tail_hr@10"] = _stat(float("nan"), 1)  # a metric without a value
    f = figs(res)
    slot = list(res["methods"]).index("gpl-anchors")
    for words in ("all test candidates", FRESH):
        for code, ax in _panels(f["metrics.png"], words).items():
            marks = {t.get_text(): t.get_position()[0] for t in ax.texts}
            assert marks.get("abstained") == slot and marks.get("no result") == len(res["methods"]) - 1, code
            assert [t.get_text() for t in ax.get_xticklabels()] == list(res["methods"])
    assert "no value" in [t.get_text() for t in _panels(f["metrics.png"], FRESH)["tail_hr@10"].texts]
    legend = f["metrics.png"].legends[0]
    assert any(t.startswith("gpl-anchors: ") and "abstained" in t for t in _legend_texts(f["metrics.png"]))
    assert WHY in legend.get_title().get_text().replace("\n", " ").replace("     ", " ")
    assert any(t.startswith("gpl-anchors: ") and "no curve, abstained" in t for t in _legend_texts(f["hr_curves.png"]))
    assert any(t.startswith("gpl-anchors: ") and "no soft labels" in t for t in _legend_texts(f["reliability.png"]))


def test_curves_say_how_many_candidates_k_is_out_of(figs: Any) -> None:
    res = results(1)

    def words(r: dict[str, Any]) -> str:
        fig = figs(r)["hr_curves.png"]
        return " | ".join([fig._suptitle.get_text(), *(ax.get_xlabel() for ax in fig.axes)])

    text = words(res)
    assert "K = 1..20 out of ~60 candidates per request" in text and "subset of the ~60" in text
    assert "whole recall set" not in text
    test_only = copy.deepcopy(res)
    test_only["dataset"]["stats"] |= {"test_candidates_per_request": 45.0, "test_candidates_per_request_min": 30.0,
                                      "test_candidates_per_request_max": 60.0}
    assert "~45 candidates per test request, 30–60" in words(test_only)
    unknown = copy.deepcopy(res)
    unknown["dataset"]["stats"] = {}
    assert "not in results.json" in words(unknown) and "~" not in words(unknown).split("|")[1]
    small = copy.deepcopy(res)  # a recall set inside the K range: where the top K holds every candidate
    small["dataset"]["stats"]["candidates_per_request"] = 12.0
    ax = figs(small)["hr_curves.png"].axes[0]
    assert any("every candidate" in t.get_text() for t in ax.texts)


def test_identical_curves_stay_visible_and_are_named(figs: Any) -> None:
    f = figs(results(3))
    hr = f["hr_curves.png"]
    ax = hr.axes[0]
    lines = ax.get_lines()
    assert len(lines) == len(RAN)  # every method that ran is drawn, the coinciding ones too
    styles = {(str(line.get_linestyle()), str(line.get_dashes() if hasattr(line, "get_dashes") else ""),
               line.get_marker()) for line in lines}
    assert len({(line.get_marker()) for line in lines}) == len(lines) and len(styles) == len(lines)
    gpl, noconf = (lines[RAN.index(m)] for m in ("gpl", "gpl-noconf"))
    assert list(gpl.get_ydata()) == list(noconf.get_ydata())
    apart = [abs(a - b) for a, b in zip(gpl.get_xdata(), noconf.get_xdata(), strict=True)]
    assert min(apart) >= SPREAD  # a marker's width apart, not drawn on top of each other
    assert all(abs(x - round(x)) <= SPREAD for line in lines for x in line.get_xdata())
    assert any(t.startswith("gpl-noconf: ") and "same curve as gpl" in t for t in _legend_texts(hr))


def test_legends_name_every_method_and_sit_outside_the_data(figs: Any) -> None:
    f = figs(results(3))
    for name in ("metrics.png", "hr_curves.png"):
        texts = " | ".join(_legend_texts(f[name]))
        for m, label in METHODS.items():
            assert f"{m}: {label}" in texts, (name, m)
    rel_texts = _legend_texts(f["reliability.png"])
    assert any("later met by a real label" in t for t in rel_texts)
    assert any("gpl: " in t and "gpl-noconf: " in t for t in rel_texts)
    for name, fig in f.items():
        fig.canvas.draw()
        for legend in _legends(fig):
            box = legend.get_window_extent()
            assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.axison), name
    assert f["hr_curves.png"].axes[0].get_ylim()[0] == 0.0


def test_every_axis_with_numbers_is_labelled(figs: Any) -> None:
    for name, fig in figs(results(2)).items():
        fig.canvas.draw()
        for ax in fig.axes:
            if not ax.axison:
                continue
            if any(t.get_visible() and t.get_text() for t in ax.get_xticklabels()):
                assert ax.get_xlabel(), (name, ax.get_title())
            if any(t.get_visible() and t.get_text() for t in ax.get_yticklabels()):
                assert ax.get_ylabel(), (name, ax.get_title())


def test_reliability_shows_counts_base_rate_and_diagonal(figs: Any) -> None:
    fig = figs(results(1))["reliability.png"]
    curve_ax, count_ax = fig.axes
    lines = curve_ax.get_lines()
    assert any(list(ln.get_xdata()) == [0, 1] and list(ln.get_ydata()) == [0, 1] for ln in lines)  # diagonal
    base = [ln for ln in lines if list(ln.get_ydata()) == [TRUTH_RATE, TRUTH_RATE]]
    assert len(base) == 1 and any("base rate" in t and f"{TRUTH_RATE:.3f}" in t for t in _legend_texts(fig))
    bars = [c for c in count_ax.containers if isinstance(c, BarContainer)]
    assert [p.get_height() for p in bars[0].patches] == COUNTS  # the shared soft labels, then the closed loop
    assert len(bars) == 2 and "count" in count_ax.get_ylabel()
    assert curve_ax.get_xlabel() and curve_ax.get_ylabel() and count_ax.get_xlabel()


def test_spread_only_with_more_than_one_seed(figs: Any) -> None:
    one, three = figs(results(1)), figs(results(3))
    assert "one seed" in one["metrics.png"]._suptitle.get_text()
    assert "over 3 seeds" in three["metrics.png"]._suptitle.get_text()

    def errorbars(f: Any) -> int:
        return sum(c.errorbar is not None for ax in f.axes for c in ax.containers if isinstance(c, BarContainer))

    assert errorbars(one["metrics.png"]) == 0 and errorbars(three["metrics.png"]) == 2 * len(METRICS)  # 2 scopes

    def bands(f: Any) -> int:
        return sum(isinstance(c, PolyCollection) for ax in f.axes for c in ax.collections)

    assert bands(one["hr_curves.png"]) == 0 and bands(three["hr_curves.png"]) > 0


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
