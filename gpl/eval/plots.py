"""The plots of ``gpl eval``: metrics.png, hr_curves.png, reliability.png, written for people.

Rules they follow, because a plot is read faster than it is checked:

* titles in words ("AUC, entire space"), with the metric code in brackets after them for
  looking it up in docs/eval.md; every axis has a label saying what is counted;
* honest axes: counts, rates and diversities start at 0; AUC-like metrics are drawn as bars from
  0.5 (chance), with the axis said to start there, so a method below chance points down instead of
  looking like a short bar; one metric keeps one y range in every scope, so heights compare;
* every scope drawn, in words: "all test candidates" and "fresh pairs (never exposed to the user in
  training)" side by side, because a method can win on all candidates by remembering pairs;
* no silent gaps: a method that was asked for but abstained or could not run keeps its slot, marked
  with the reason word ("abstained"), and its full reason is written under the figure;
* spread only when there is one: error bars and bands need two seeds or more; with one seed the
  title says so;
* legends name what ran (the method's label, corrected when the anchors were the in-memory keyword
  generator rather than an LLM), every method keeps one colour, dash pattern and marker across the
  three plots (gpl/eval/plots_style.py), and legends sit outside the data.

HR@K curves: gpl/eval/plots_curves.py; the reliability diagram: gpl/eval/plots_reliability.py.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpl.eval.plots_curves import hr_curves
from gpl.eval.plots_reliability import reliability
from gpl.eval.plots_style import Style, gap, gap_notes, method_labels, scope_title, scopes, seeds, spread_note

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# code -> (title in words, where the axis starts: 0.5 = chance for AUC-like metrics, else 0)
METRICS: dict[str, tuple[str, float]] = {
    "es_auc": ("AUC, entire space", 0.5),
    "es_gauc": ("Per-user AUC (GAUC), entire space", 0.5),
    "es_hr@3": ("Hit rate @3, entire space", 0.0),
    "es_hr@5": ("Hit rate @5, entire space", 0.0),
    "es_hr@10": ("Hit rate @10, entire space", 0.0),
    "es_ndcg@10": ("NDCG @10, entire space", 0.0),
    "ex_auc": ("AUC, exposed items only", 0.5),
    "ex_gauc": ("Per-user AUC (GAUC), exposed items only", 0.5),
    "tail_share@10": ("Share of long-tail items in the top 10", 0.0),
    "tail_hr@10": ("Hit rate @10 on long-tail positives", 0.0),
    "coverage@10": ("Distinct categories in the top 10", 0.0),
    "ild@10": ("Diversity of the top 10 (mean cosine distance)", 0.0),
}
# code -> y-axis label: the quantity and its unit, short enough for a 3-inch panel
YLABELS: dict[str, str] = {
    "es_auc": "AUC (0.5 = chance)",
    "es_gauc": "mean per-user AUC",
    "es_hr@3": "hit rate @3 (0–1)",
    "es_hr@5": "hit rate @5 (0–1)",
    "es_hr@10": "hit rate @10 (0–1)",
    "es_ndcg@10": "NDCG @10 (0–1)",
    "ex_auc": "AUC (0.5 = chance)",
    "ex_gauc": "mean per-user AUC",
    "tail_share@10": "long-tail share of top 10",
    "tail_hr@10": "hit rate @10, tail (0–1)",
    "coverage@10": "categories per top 10",
    "ild@10": "mean cosine distance",
}
COLS = 4
GAP_STYLE: dict[str, Any] = {"rotation": 90, "ha": "center", "va": "bottom", "fontsize": 7, "color": "dimgrey",
                             "style": "italic"}


def _stat(results: dict[str, Any], m: str, scope: str, metric: str) -> dict[str, Any]:
    return results["summary"].get(m, {}).get(scope, {}).get(metric, {}) if gap(results, m, scope) is None else {}


def _limits(results: dict[str, Any], metric: str, floor: float, panels: list[str]) -> tuple[float, float]:
    """One y range for ``metric`` over every scope, with its error bars, so bar heights compare."""
    tops, lows = [floor], [floor]
    for scope in panels:
        for m in results["methods"]:
            s = _stat(results, m, scope, metric)
            mean = s.get("mean", float("nan"))
            if math.isfinite(mean):
                err = s.get("std", 0.0) if s.get("n", 0) > 1 else 0.0
                tops.append(mean + err)
                lows.append(mean - err)
    pad = 0.08 * ((max(tops) - min(lows)) or 1.0)
    return (min(lows) - pad if floor > 0 else 0.0), max(tops) + pad


def _panel(ax: Any, results: dict[str, Any], scope: str, metric: str, lim: tuple[float, float], style: Style) -> None:
    """The bars of one metric in one scope; an empty slot says why a method has no bar there."""
    title, floor = METRICS[metric]
    methods = list(results["methods"])
    stats = [_stat(results, m, scope, metric) for m in methods]
    means = [s.get("mean", float("nan")) for s in stats]
    spread = [s.get("std", 0.0) if s.get("n", 0) > 1 else 0.0 for s in stats]
    ax.bar(range(len(methods)), [v - floor for v in means], bottom=floor, color=[style.color(m) for m in methods],
           yerr=spread if seeds(results) > 1 else None, capsize=3,
           hatch=["//" if m == "teacher" else "" for m in methods], edgecolor="white", linewidth=0)
    marks = ax.get_xaxis_transform()  # x in data (the slot), y in axes (the panel's bottom)
    for i, (m, v) in enumerate(zip(methods, means, strict=True)):
        why = gap(results, m, scope) or (None if math.isfinite(v) else "no value")
        if why:
            ax.text(i, 0.03, why, transform=marks, **GAP_STYLE)
    if floor > 0:
        ax.axhline(floor, color="black", lw=0.8)
        ax.set_title(f"{title}  [{metric}]\nbars start at 0.5 = chance", fontsize=9)
    else:
        ax.set_title(f"{title}  [{metric}]", fontsize=9)
    ax.set_ylim(*lim)
    ax.set_ylabel(YLABELS.get(metric, metric), fontsize=8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=7)
    for tick, m in zip(ax.get_xticklabels(), methods, strict=True):
        if gap(results, m, scope):
            tick.set_color("dimgrey")
    ax.set_xlabel("method", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)


def _bars(results: dict[str, Any], labels: dict[str, str], style: Style) -> Figure:
    """A grid of metric panels per scope (one sub-figure each, titled in words), legend and gap note below."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = scopes(results)
    rows = math.ceil(len(METRICS) / COLS)
    fig = plt.figure(figsize=(4.4 * COLS, 3.4 * rows * len(panels) + 2.0), layout="constrained")
    limits = {metric: _limits(results, metric, floor, panels) for metric, (_, floor) in METRICS.items()}
    for sub, scope in zip(fig.subfigures(len(panels), 1, squeeze=False)[:, 0], panels, strict=True):
        sub.suptitle(scope_title(results, scope), fontsize=12, fontweight="bold")
        axes = sub.subplots(rows, COLS, squeeze=False).ravel()
        for ax, metric in zip(axes, METRICS, strict=False):
            _panel(ax, results, scope, metric, limits[metric], style)
        for ax in axes[len(METRICS):]:
            ax.axis("off")
    handles = []
    for m in results["methods"]:
        why = gap(results, m)
        if why:
            handles.append(Patch(facecolor="none", edgecolor=style.color(m), linestyle="--",
                                 label=f"{m}: {labels.get(m, m)}  [no bars: {why}]"))
        else:
            handles.append(Patch(facecolor=style.color(m), hatch="//" if m == "teacher" else "",
                                 label=f"{m}: {labels.get(m, m)}"))
    notes = gap_notes(results, labels)
    # the reasons head the legend, so the layout reserves room for them and they sit next to their swatches
    note = "\n".join(["Empty slots (asked for, no numbers):",
                      *(w for n in notes for w in textwrap.wrap(n, 170, subsequent_indent="    "))]) if notes else None
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False, title=note,
               title_fontsize=8)
    fig.suptitle(f"{results['dataset']['name']}: test-request metrics per method ({spread_note(seeds(results))})",
                 fontsize=13)
    return fig


def figures(results: dict[str, Any]) -> dict[str, Figure]:
    """File name -> figure of every plot (reliability only when there are soft labels); caller closes them."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    labels = method_labels(results)
    style = Style(list(results["methods"]))
    out = {"metrics.png": _bars(results, labels, style), "hr_curves.png": hr_curves(results, labels, style)}
    rel = reliability(results, labels, style)
    if rel is not None:
        out["reliability.png"] = rel
    return out


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the plots into ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    written = []
    for name, fig in figures(results).items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")  # bbox: keeps the legends and notes in the file
        plt.close(fig)
        written.append(out / name)
    return written


__all__ = ["METRICS", "YLABELS", "figures", "method_labels", "plot"]
