"""Turn the comparison's results into what people read: a table, results.json, results.md and plots
(gpl/eval/plots.py).

Tables show mean ± std over seeds (sample std, n-1). A method that could not run shows its reason in
place of numbers, so a missing row is never silently dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gpl.eval.plots import METRICS, method_labels, plot

MAIN_COLS = ("es_auc", "es_gauc", "es_hr@3", "es_hr@5", "es_hr@10", "es_ndcg@10", "ex_auc", "ex_gauc")
EXTRA_COLS = (
    "tail_share@10",
    "tail_hr@10",
    "coverage@10",
    "ild@10",
    "pl_mean",
    "pl_truth_rate",
    "pl_auc",
    "pl_auc_all",
    "pl_ece",
    "pl_w_auc",
    "pl_w_ece",
)
SCOPE_COLS = ("es_auc", "es_gauc", "es_hr@3", "es_hr@5", "es_hr@10", "es_ndcg@10", "ex_auc")
BAR_METRICS = tuple(METRICS)  # the panels of metrics.png (gpl/eval/plots.py)


def _cell(stat: dict[str, float] | None, digits: int = 4) -> str:
    if not stat or stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def table_rows(
    results: dict[str, Any], cols: tuple[str, ...], scope: str = "all", *, short: bool = False
) -> list[list[str]]:
    """Rows of [method, cells...] in the configured method order; unavailable methods say why.

    ``short``: the method key instead of its label, and "n/a" instead of the reason (the console
    prints the reasons under the tables, where they do not widen every column).
    """
    rows: list[list[str]] = []
    summary = results["summary"]
    for m, label in method_labels(results).items():
        name = (m + " (ref)" if m == "teacher" else m) if short else label
        if m in results["unavailable"]:
            why = "n/a" if short else results["unavailable"][m]
            rows.append([name, why, *[""] * (len(cols) - 1)])
            continue
        stats = summary.get(m, {}).get(scope)
        if stats is None:
            continue
        rows.append([name, *[_cell(stats.get(c)) for c in cols]])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def tables(results: dict[str, Any], *, short: bool = False) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report."""
    out = [
        (
            "Entire space (all test requests) and exposed-only",
            ["method", *MAIN_COLS],
            table_rows(results, MAIN_COLS, short=short),
        ),
        (
            "Long tail, diversity, pseudo-label quality",
            ["method", *EXTRA_COLS],
            table_rows(results, EXTRA_COLS, short=short),
        ),
    ]
    if "fresh" in results["scopes"]:
        out.append(
            (
                "Fresh pairs: test candidates whose (user, item) was not exposed to that user in training",
                ["method", *SCOPE_COLS],
                table_rows(results, SCOPE_COLS, "fresh", short=short),
            )
        )
    if "anchored" in results["scopes"]:
        out.append(
            (
                f"Test requests of users with text anchors ({results['scopes']['anchored']} requests)",
                ["method", *SCOPE_COLS],
                table_rows(results, SCOPE_COLS, "anchored", short=short),
            )
        )
    return out


def print_tables(results: dict[str, Any]) -> None:
    """Print with rich when it is installed (it is an optional nicety), plain text otherwise."""
    notes = [f"{m}: {why}" for m, why in results["unavailable"].items()]
    notes.append("methods: " + "; ".join(f"{m} = {label}" for m, label in method_labels(results).items()))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, header, rows in tables(results, short=True):
            print(f"\n{title}\n{plain_table(header, rows)}")
        print("\n".join(notes))
        return
    console = Console(width=max(170, Console().width))
    for title, header, rows in tables(results, short=True):
        t = Table(title=title, show_lines=False)
        for h in header:
            t.add_column(h, no_wrap=True)
        for r in rows:
            t.add_row(*r)
        console.print(t)
    console.print("\n".join(notes), soft_wrap=True)


def markdown(results: dict[str, Any]) -> str:
    ds = results["dataset"]
    cfg = results["config"]
    a = results["anchors"]
    lines = [
        f"# GPL offline comparison — {ds['name']}",
        "",
        f"Seeds: {cfg['seeds']} (mean ± sample std), epochs: {cfg['epochs']}, methods share the pre-ranker, "
        f"loss, optimizer steps and seeds (gpl/eval/methods.py). Encoder: `{cfg['encoder']}`.",
        "",
        f"Dataset digest `{ds['digest']}`; split: {ds['split'].get('rule', ds['split'])}; "
        + ", ".join(f"{k} {v:.4g}" for k, v in ds["stats"].items())
        + ".",
        "",
    ]
    if ds.get("simulated"):
        lines += [f"What is simulated: {ds['simulated']}.", ""]
    books = ", ".join(f"{k} {v.get('users', 0)} users" for k, v in a.get("books", {}).items())
    lines += [f"Anchors (training clicks only): {books or 'none'} of {a['users_total']}. {a['rest']}.", ""]
    if a["users_with_text_anchors"]:
        lines += [f"Text anchors (`{a['mode']}`): {a['users_with_text_anchors']} users "
                  f"({a['share_of_users_with_text_anchors']:.1%}), {a['share_of_test_requests_anchored']:.1%} "
                  "of test requests.", ""]
    for title, header, rows in tables(results):
        lines += [f"## {title}", "", markdown_table(header, rows), ""]
    if results.get("calibration"):
        lines += ["## Pseudo-labels: calibrators (cross-fitted on training exposures)", ""]
        for m, v in results["calibration"].items():
            cv = v.get("cv", {})
            fig = (f"CV AUC {cv['cv_auc']:.3f}, log-loss gain {cv['gain']:.3f}, rows {cv['rows']:.0f}"
                   if "gain" in cv else "")
            if v.get("abstain"):
                lines.append(f"- {m}: **abstained, no pseudo-labels** — {v.get('reason')} {fig}")
            else:
                lines.append(f"- {m} [{v['source']} anchors, {v.get('features') or 'fixed map'}]: "
                             f"{v.get('describe')}{'; ' + fig if fig else ''}")
        lines.append("")
    if results.get("closed_loop_calibration"):
        lines += ["## Closed-loop calibration (GPL pseudo-labels met later by a real label)", ""]
        for m, snap in results["closed_loop_calibration"].items():
            for g in snap["groups"]:
                lines.append(
                    f"- {m} [{g['model']}, fallback={g['fallback']}]: joined {g['joined']}, label ECE "
                    f"{g['label_ece']:.4f}, weight ECE {g['weight_ece']:.4f}, mean p {g['mean_p']:.3f} vs "
                    f"observed {g['observed_rate']:.3f}"
                )
            if not snap["groups"]:
                lines.append(f"- {m}: no pseudo-labeled pair was exposed later ({snap['counts']})")
        lines.append("")
    t = results["timing_s"]
    lines += ["## Runtime", "", ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if isinstance(v, float)), ""]
    lines += ["Metric definitions: docs/eval.md. Plots: metrics.png, hr_curves.png, reliability.png.", ""]
    return "\n".join(lines)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_report(results: dict[str, Any], out: Path | str, *, plots: bool = True) -> list[Path]:
    """results.json, results.md and (optionally) the PNG plots in ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md"]
    files[0].write_text(json.dumps(results, indent=1, default=_json_default, allow_nan=True))
    files[1].write_text(markdown(results))
    if plots:
        files += plot(results, out)
    return files


__all__ = ["write_report", "print_tables", "markdown", "tables", "plot"]
