"""The plots of ``gpl eval``: metrics.png, hr_curves.png, reliability.png, written for people.

Rules they follow, because a plot is read faster than it is checked:

* titles in words ("AUC, entire space"), with the metric code in brackets after them for
  looking it up in docs/eval.md;
* honest axes: counts, rates and diversities start at 0; AUC-like metrics are drawn as bars from
  0.5 (chance), with the axis said to start there, so a method below chance points down instead of
  looking like a short bar;
* spread only when there is one: error bars and bands need two seeds or more; with one seed the
  title says so;
* legends name what ran (the method's label, corrected when the anchors were the in-memory keyword
  generator rather than an LLM), every method keeps one colour across the three plots, the legend
  sits outside the axes, and curves that coincide are drawn once and named together.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def method_labels(results: dict[str, Any]) -> dict[str, str]:
    """Method -> label naming what actually ran.

    ``gpl eval --anchors memory`` replaces the LLM by the deterministic keyword generator
    (workers/generators/memory.py); the method list still calls that row "LLM text anchors".
    """
    labels = dict(results["methods"])
    if results.get("anchors", {}).get("mode") == "memory":
        for m, label in labels.items():
            if "text anchors" in label:
                labels[m] = label.replace("LLM text anchors", "text anchors").replace(
                    "text anchors", "keyword text anchors (in-memory generator, no LLM)")
    return labels


def _seeds(results: dict[str, Any]) -> int:
    return int(results["config"].get("seeds", 1))


def _spread_note(seeds: int) -> str:
    return f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed: no spread to show"


class _Style:
    """One colour, line style and marker per method, the same in every plot."""

    def __init__(self, methods: list[str]) -> None:
        import matplotlib.pyplot as plt

        cmap = plt.get_cmap("tab10")
        self._i = {m: i for i, m in enumerate(methods)}
        self._cmap = cmap

    def color(self, m: str) -> Any:
        return self._cmap(self._i.get(m, 0) % 10)

    def line(self, m: str) -> dict[str, Any]:
        i = self._i.get(m, 0)
        return {"color": self.color(m), "linestyle": LINESTYLES[i % len(LINESTYLES)],
                "marker": MARKERS[i % len(MARKERS)], "markersize": 4}


def _bars(results: dict[str, Any], methods: list[str], labels: dict[str, str], style: _Style) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    seeds = _seeds(results)
    cols = 4
    rows = math.ceil(len(METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.1 * rows + 1.6))
    for ax, (metric, (title, floor)) in zip(axes.ravel(), METRICS.items(), strict=False):
        stats = [results["summary"][m]["all"].get(metric, {}) for m in methods]
        means = [s.get("mean", float("nan")) for s in stats]
        spread = [s.get("std", 0.0) if s.get("n", 0) > 1 else 0.0 for s in stats]
        x = range(len(methods))
        ax.bar(x, [v - floor for v in means], bottom=floor, color=[style.color(m) for m in methods],
               yerr=spread if seeds > 1 else None, capsize=3,
               hatch=["//" if m == "teacher" else "" for m in methods], edgecolor="white", linewidth=0)
        finite = [v for v in means if math.isfinite(v)]
        hi = max([*finite, floor]) if finite else 1.0
        lo = min([*finite, floor]) if finite else floor
        pad = 0.08 * (hi - lo or 1.0)
        if floor > 0:
            ax.axhline(floor, color="black", lw=0.8)
            ax.set_ylim(min(lo, floor) - pad, hi + pad)
            ax.set_title(f"{title}  [{metric}]\nbars start at 0.5 = chance", fontsize=9)
        else:
            ax.set_ylim(0, hi + pad)
            ax.set_title(f"{title}  [{metric}]", fontsize=9)
        ax.set_xticks(list(x))
        ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(METRICS):]:
        ax.axis("off")
    handles = [Patch(facecolor=style.color(m), hatch="//" if m == "teacher" else "", label=f"{m}: {labels[m]}")
               for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{results['dataset']['name']}: test-request metrics per method ({_spread_note(seeds)})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def _hr_curves(results: dict[str, Any], methods: list[str], labels: dict[str, str], style: _Style) -> Figure:
    import matplotlib.pyplot as plt

    seeds = _seeds(results)
    curves: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for m in methods:
        s = results["summary"][m]["all"]
        ks = [k for k in range(1, 21) if f"curve_hr@{k}" in s]
        curves[m] = (ks, [s[f"curve_hr@{k}"]["mean"] for k in ks], [s[f"curve_hr@{k}"]["std"] for k in ks])
    # methods whose curves coincide are drawn once and named together (none hides another)
    groups: dict[str, list[str]] = {}
    for m, (ks, mean, _) in curves.items():
        groups.setdefault(json.dumps([ks, [round(v, 12) for v in mean]]), []).append(m)
    fig, ax = plt.subplots(figsize=(11, 5))
    top = 0.0
    for ms in groups.values():
        ks, mean, std = curves[ms[0]]
        if not ks:
            continue
        label = " = ".join(f"{m}: {labels[m]}" for m in ms) + (" (identical)" if len(ms) > 1 else "")
        ax.plot(ks, mean, label=label, **style.line(ms[0]))
        if seeds > 1:
            ax.fill_between(ks, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], color=style.color(ms[0]), alpha=0.12)
        top = max(top, *(a + (b if seeds > 1 else 0) for a, b in zip(mean, std, strict=True)))
    ax.set_xlabel("K (top-K of the whole recall set)")
    ax.set_xticks(range(1, 21))
    ax.set_ylabel("hit rate @K")
    ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    ax.set_title(f"{results['dataset']['name']}: hit rate @K on test requests, entire space ({_spread_note(seeds)})",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _points(rel: dict[str, list[Any]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y, c in zip(rel["predicted"], rel["observed"], rel["count"], strict=True)
            if x is not None and y is not None and c > 0]


def _reliability(results: dict[str, Any], labels: dict[str, str], style: _Style) -> Figure | None:
    import matplotlib.pyplot as plt

    pl = results.get("pseudo_labels", {})
    closed = results.get("closed_loop_calibration", {})
    if not pl and not closed:
        return None
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    # methods sharing their soft labels (kd/ukd, gpl/gpl-noconf) share one curve, named together
    curves: dict[str, list[str]] = {}
    for m, q in pl.items():
        curves.setdefault(json.dumps(q["reliability"]), []).append(m)
    for key, ms in curves.items():
        pts, q = _points(json.loads(key)), pl[ms[0]]
        if pts:
            names = " = ".join(f"{m}: {labels.get(m, m)}" for m in ms)
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=f"{names} (ECE {q['pl_ece']:.3f}, "
                    f"mean label {q.get('pl_mean', 0):.2f})", **style.line(ms[0]))
    for m, snap in closed.items():
        for g in snap["groups"]:
            pts = _points(g["reliability"])
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], color="black", ls=":", marker="s", markersize=5,
                        label=f"{m} as streamed, later met by a real label (ECE {g['label_ece']:.3f}, "
                              f"n={g['joined']})")
    ax.set_xlabel("soft label given (mean of the bin)")
    ax.set_ylabel("observed positive rate (truth)")
    ax.set_xlim(-0.02, 1.02)  # a margin, so points on the edges (a label of 0) stay visible
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_title(f"{results['dataset']['name']}: calibration of soft labels\non unexposed training candidates "
                 "whose truth is known (seed 0)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    return fig


def figures(results: dict[str, Any]) -> dict[str, Figure]:
    """File name -> figure of every plot (reliability only when there are soft labels); caller closes them."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    methods = [m for m in results["methods"] if m in results["summary"]]
    labels = method_labels(results)
    style = _Style(list(results["methods"]))
    out = {"metrics.png": _bars(results, methods, labels, style),
           "hr_curves.png": _hr_curves(results, methods, labels, style)}
    rel = _reliability(results, labels, style)
    if rel is not None:
        out["reliability.png"] = rel
    return out


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the plots into ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    written = []
    for name, fig in figures(results).items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")  # bbox: keeps the legends outside the axes
        plt.close(fig)
        written.append(out / name)
    return written


__all__ = ["METRICS", "figures", "method_labels", "plot"]
