"""reliability.png: are the soft labels calibrated, and on how many rows does each point rest?

Top panel: per 10-bin curve, observed positive rate against the soft label given, with the diagonal
(perfect calibration) and the base rate (the truth rate of the labelled rows, ``pl_truth_rate``): a
curve flat on the base rate ranks nothing, however close it comes to the diagonal in one bin. Bottom
panel: how many labelled rows each bin holds, in the curves' colours, because a bin of 2 rows can sit
anywhere and should not be read like a bin of 200. Methods sharing their soft labels (kd/ukd,
gpl-anchors/gpl-noconf) share one curve, named together, so none hides another.
"""

from __future__ import annotations

import json
import math
import textwrap
from typing import TYPE_CHECKING, Any

from gpl.eval.plots_style import Style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BASE_RATE_DASH = (0, (1, 2))


def points(rel: dict[str, list[Any]]) -> list[tuple[float, float]]:
    """(mean label, observed rate) of the bins that hold rows."""
    return [(x, y) for x, y, c in zip(rel["predicted"], rel["observed"], rel["count"], strict=True)
            if x is not None and y is not None and c > 0]


def _base_rates(pl: dict[str, dict[str, Any]]) -> dict[float, list[str]]:
    """Truth rate -> methods whose labelled rows have it (methods on the same rows share one line)."""
    out: dict[float, list[str]] = {}
    for m, q in pl.items():
        rate = q.get("pl_truth_rate")
        if isinstance(rate, int | float) and math.isfinite(rate):
            out.setdefault(round(float(rate), 4), []).append(m)
    return out


def _counts(hx: Any, series: list[tuple[Any, list[int]]]) -> None:
    """Grouped bars of rows per bin, one colour per curve, side by side inside each bin."""
    if not series:
        return
    bins = max(len(c) for _, c in series)
    width = 0.85 / bins / len(series)
    for i, (color, counts) in enumerate(series):
        xs = [(b + 0.5) / bins + (i - (len(series) - 1) / 2) * width for b in range(len(counts))]
        hx.bar(xs, counts, width=width, color=color, edgecolor="none")
    positive = [c for _, counts in series for c in counts if c > 0]
    log = bool(positive) and max(positive) / min(positive) > 30
    if log:
        hx.set_yscale("log")
    hx.set_ylabel("labelled rows in the bin\n(count" + (", log scale)" if log else ")"), fontsize=9)
    hx.set_xlabel(f"soft label given ({bins} bins of width {1 / bins:.2g}; the points above sit at each bin's "
                  "mean label)", fontsize=9)
    for b in range(1, bins):
        hx.axvline(b / bins, color="grey", lw=0.4, alpha=0.5)


def reliability(results: dict[str, Any], labels: dict[str, str], style: Style) -> Figure | None:
    """The calibration figure, or None when no method produced soft labels."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pl = results.get("pseudo_labels", {})
    closed = results.get("closed_loop_calibration", {})
    if not pl and not closed:
        return None
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(8, 10.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]},
                                 layout="constrained")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="diagonal: perfect calibration (observed = given)")
    rates = _base_rates(pl)
    for rate, ms in rates.items():
        color = "black" if len(rates) == 1 else style.color(ms[0])
        ax.axhline(rate, color=color, lw=1.2, ls=BASE_RATE_DASH,
                   label=f"base rate: truth rate {rate:.3f} of the labelled rows ({', '.join(ms)})")
    groups: dict[str, list[str]] = {}
    for m, q in pl.items():
        groups.setdefault(json.dumps(q["reliability"]), []).append(m)
    series: list[tuple[Any, list[int]]] = []
    for key, ms in groups.items():
        rel, q = json.loads(key), pl[ms[0]]
        pts = points(rel)
        if not pts:
            continue
        names = " = ".join(f"{m}: {labels.get(m, m)}" for m in ms)
        ax.plot([a for a, _ in pts], [b for _, b in pts], **style.line(ms[0]),
                label=f"{names} (ECE {q['pl_ece']:.3f}, mean label {q.get('pl_mean', 0):.2f})")
        series.append((style.color(ms[0]), list(rel["count"])))
    for m, snap in closed.items():
        for g in snap["groups"]:
            pts = points(g["reliability"])
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], color="black", ls=":", marker="s", markersize=5,
                        label=f"{m} as streamed, later met by a real label (ECE {g['label_ece']:.3f}, "
                              f"n={g['joined']}" + (f", observed rate {g['observed_rate']:.2f})"
                                                    if "observed_rate" in g else ")"))
                series.append(("black", list(g["reliability"]["count"])))
    _counts(hx, series)
    handles, texts = ax.get_legend_handles_labels()
    for m, why in results.get("unavailable", {}).items():  # asked for, but no labels: said, not left out
        handles.append(Line2D([], [], color=style.color(m), linestyle="none", marker="x"))
        texts.append(textwrap.fill(f"{m}: {labels.get(m, m)}: no soft labels ({why})", 110, subsequent_indent="    "))
    ax.set_xlabel("soft label given (mean of the bin)", fontsize=9)
    ax.set_ylabel("observed positive rate in the bin (truth)", fontsize=9)
    ax.set_xlim(-0.02, 1.02)  # a margin, so points on the edges (a label of 0) stay visible
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelbottom=True)
    ax.grid(alpha=0.3)
    ax.set_title(f"{results['dataset']['name']}: calibration of soft labels on unexposed training candidates\n"
                 "whose truth is known (seed 0); bottom: rows per bin, same colours", fontsize=10)
    fig.legend(handles, texts, loc="outside lower center", fontsize=7, frameon=False)
    return fig


__all__ = ["points", "reliability"]
