"""hr_curves.png: hit rate @K for K = 1..20, one panel per evaluation scope ("all", "fresh", ...).

What it guards against, because each was misread before:

* "K of what": the title and the x axes say how many candidates a test request ranks (from
  ``results["dataset"]["stats"]``), so K = 20 is never mistaken for the whole recall set when the
  set is larger; where the set is not in the stats the plot says so instead of guessing;
* one curve hiding another: every method has its own colour, dash pattern and marker, and its points
  are shifted a little sideways around each K, so two identical curves show as two parallel lines;
  the legend also names the curve a method coincides with;
* a silent gap: a method that was asked for but has no curve is in the legend with the reason word.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from gpl.eval.plots_style import Style, gap, scope_title, scopes, seeds, spread_note

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_K = 20
SPREAD = 0.3  # the sideways shift of the methods' points spans at most ±SPREAD around each K
YLABEL = "hit rate @K\n(positives in the top K / min(K, positives),\nover test requests with a positive)"


def recall_set(stats: dict[str, Any]) -> tuple[str, float | None]:
    """(words for how many candidates a request ranks, their mean or None when the stats lack it).

    Takes a test-only count when the dataset stats have one, else the dataset-wide mean
    (``candidates_per_request``, gpl/eval/dataset.py); a range only when the stats carry ``<key>_min``
    and ``<key>_max``. Nothing is computed here: the plot states what results.json holds.
    """
    for key, where in (("test_candidates_per_request", "per test request"),
                       ("candidates_per_request", "per request (mean over all requests)")):
        n = stats.get(key)
        if isinstance(n, int | float) and math.isfinite(n) and n > 0:
            lo, hi = stats.get(f"{key}_min"), stats.get(f"{key}_max")
            span = f", {lo:.0f}–{hi:.0f}" if lo is not None and hi is not None else ""
            return f"~{n:.0f} candidates {where}{span}", float(n)
    return "each request's candidates (their number is not in results.json)", None


def _curve(results: dict[str, Any], m: str, scope: str) -> tuple[list[int], list[float], list[float]]:
    s = results["summary"][m][scope]
    ks = [k for k in range(1, MAX_K + 1) if f"curve_hr@{k}" in s and math.isfinite(s[f"curve_hr@{k}"]["mean"])]
    return ks, [s[f"curve_hr@{k}"]["mean"] for k in ks], [s[f"curve_hr@{k}"].get("std", 0.0) for k in ks]


def _same_as(curves: dict[str, tuple[list[int], list[float], list[float]]]) -> dict[str, str]:
    """Method -> the earlier method whose curve it repeats exactly (to the 12th decimal)."""
    first: dict[str, str] = {}
    out = {}
    for m, (ks, mean, _) in curves.items():
        key = json.dumps([ks, [round(v, 12) for v in mean]])
        if key in first:
            out[m] = first[key]
        else:
            first[key] = m
    return out


def _offsets(curves: dict[str, tuple[list[int], list[float], list[float]]]) -> list[tuple[str, float, bool]]:
    """(method, sideways shift, hollow markers?) per curve.

    A small shift per method (≤ ±SPREAD/3) parts near-identical curves; methods whose curves are the
    same are parted further (±2·SPREAD/3 around their group), a marker's width apart at the usual figure
    size, and the repeats get hollow markers so the first one shows through.
    """
    same = _same_as(curves)
    groups: dict[str, list[str]] = {}
    for m in curves:
        groups.setdefault(same.get(m, m), []).append(m)
    n = len(curves)
    step = SPREAD / 3 * 2 / max(n - 1, 1)
    out = []
    for j, m in enumerate(curves):
        members = groups[same.get(m, m)]
        r, g = members.index(m), len(members)
        apart = (r - (g - 1) / 2) * (SPREAD * 4 / 3) / (g - 1) if g > 1 else 0.0
        out.append((m, (j - (n - 1) / 2) * step + apart, r > 0))
    return out


def _xlabel(scope: str, n_cand: float | None) -> str:
    """Short enough for one panel: the full size of the set is in the figure title."""
    if n_cand is None:
        return "K = rank cut-off (top K of the request's candidates)"
    if scope == "fresh":
        return f"K = rank cut-off (top K of the fresh candidates only,\na subset of the ~{n_cand:.0f} per request)"
    return f"K = rank cut-off (top K of ~{n_cand:.0f} candidates per request)"


def hr_curves(results: dict[str, Any], labels: dict[str, str], style: Style) -> Figure:
    """One panel per scope, shared y axis; the legend sits under the panels, outside the data."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n_seeds = seeds(results)
    panels = scopes(results)
    words, n_cand = recall_set(results["dataset"].get("stats", {}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels) + 0.8, 6.6), sharey=True, squeeze=False,
                             layout="constrained")
    same_in: dict[str, dict[str, str]] = {}  # method -> {scope: method it coincides with}
    handles: dict[str, Any] = {}
    top = 0.0
    for ax, scope in zip(axes[0], panels, strict=True):
        curves = {m: _curve(results, m, scope) for m in results["methods"] if gap(results, m, scope) is None}
        curves = {m: c for m, c in curves.items() if c[0]}
        for m, other in _same_as(curves).items():
            same_in.setdefault(m, {})[scope] = other
        for m, dx, hollow in _offsets(curves):
            ks, mean, std = curves[m]
            xs = [k + dx for k in ks]
            (line,) = ax.plot(xs, mean, **style.line(m), **({"markerfacecolor": "none"} if hollow else {}))
            handles.setdefault(m, line)
            if n_seeds > 1:
                ax.fill_between(xs, [a - b for a, b in zip(mean, std, strict=True)],
                                [a + b for a, b in zip(mean, std, strict=True)], color=style.color(m), alpha=0.08)
            top = max(top, *(a + (b if n_seeds > 1 else 0.0) for a, b in zip(mean, std, strict=True)))
        if scope == "all" and n_cand is not None and n_cand <= MAX_K:
            ax.axvline(n_cand, color="grey", lw=0.8)
            ax.text(n_cand, 0.02, f" K ≈ {n_cand:.0f}: top K ≈ every candidate", rotation=90, fontsize=7,
                    color="grey", transform=ax.get_xaxis_transform(), va="bottom")
        ax.set_title(scope_title(results, scope), fontsize=10)
        ax.set_xlabel(_xlabel(scope, n_cand), fontsize=8)
        ax.set_xticks(range(1, MAX_K + 1))
        ax.set_xlim(1 - SPREAD - 0.3, MAX_K + SPREAD + 0.3)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(YLABEL, fontsize=9)
    axes[0][0].set_ylim(0, top * 1.08 if top > 0 else 1)
    entries: list[tuple[Any, str]] = []
    for m in results["methods"]:
        name = f"{m}: {labels.get(m, m)}"
        if m in handles:
            same = same_in.get(m, {})
            if same:
                where = "" if len(same) == len(panels) else " in " + ", ".join(same)
                name += f" (same curve as {', '.join(sorted(set(same.values())))}{where})"
            entries.append((handles[m], name))
        else:
            blank = Line2D([], [], color=style.color(m), linestyle="none", marker="x")
            entries.append((blank, f"{name}: no curve, {gap(results, m) or 'no curve_hr values'}"))
    fig.legend([h for h, _ in entries], [t for _, t in entries], loc="outside lower center", ncol=2, fontsize=8,
               frameon=False)
    fig.suptitle(f"{results['dataset']['name']}: hit rate @K on test requests, K = 1..{MAX_K} out of {words}\n"
                 f"({spread_note(n_seeds)}; each method's points shifted ≤ ±{SPREAD} around K so equal curves "
                 "stay visible)", fontsize=11)
    return fig


__all__ = ["hr_curves", "recall_set"]
