"""What the three plots of ``gpl eval`` share, so one method and one scope read the same in each of them.

* one colour, dash pattern and marker per method, fixed by its place in ``results["methods"]`` (not by
  which methods happened to produce numbers), so a gap never shifts the colours of the others;
* the method's label as it ran (:func:`method_labels`);
* scope names in words ("fresh pairs (never exposed to the user in training)"), never the bare key;
* the gap text of a method that was asked for but has no numbers: a short word for the plot
  ("abstained", "not run") and the full reason for the note under it.
"""

from __future__ import annotations

from typing import Any

# evaluation scopes in reading order, with what each one holds (gpl/eval/run.py, "Evaluation scopes")
SCOPE_TITLES: dict[str, str] = {
    "all": "all test candidates",
    "fresh": "fresh pairs (never exposed to the user in training)",
    "anchored": "test requests of users with text anchors",
}
# dash patterns as (offset, on-off sequence): ten that stay apart even in grey print
DASHES: tuple[tuple[int, tuple[float, ...]], ...] = (
    (0, ()),
    (0, (6, 2)),
    (0, (2, 2)),
    (0, (6, 2, 1, 2)),
    (0, (1, 1)),
    (0, (9, 3, 2, 3, 2, 3)),
    (0, (3, 1, 1, 1, 1, 1)),
    (0, (12, 4)),
    (0, (4, 4)),
    (0, (2, 1, 6, 1)),
)
EXTRA_COLORS = ("black", "dimgrey", "darkgrey")
# eleven markers against ten colours and dashes: method 11 (often the KD teacher) differs from method 1
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def method_labels(results: dict[str, Any]) -> dict[str, str]:
    """Method -> label naming what actually ran.

    ``gpl eval --anchors memory`` replaces the LLM by the deterministic keyword generator
    (workers/anchors/generators/memory.py); the method list still calls that row "LLM text anchors".
    """
    labels = dict(results["methods"])
    if results.get("anchors", {}).get("mode") == "memory":
        for m, label in labels.items():
            if "text anchors" in label:
                labels[m] = label.replace("LLM text anchors", "text anchors").replace(
                    "text anchors", "keyword text anchors (in-memory generator, no LLM)")
    return labels


def seeds(results: dict[str, Any]) -> int:
    return int(results["config"].get("seeds", 1))


def spread_note(n_seeds: int) -> str:
    return f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed: no spread to show"


def scopes(results: dict[str, Any]) -> list[str]:
    """Scopes some method has numbers for, "all" first: the panels a plot draws, one per scope."""
    have = {sc for per_scope in results["summary"].values() for sc in per_scope}
    if not have:
        return ["all"]
    return [sc for sc in SCOPE_TITLES if sc in have] + sorted(have - set(SCOPE_TITLES))


def scope_title(results: dict[str, Any], scope: str) -> str:
    """The scope in words with its number of test requests, e.g. "all test candidates (52 test requests)"."""
    n = results.get("scopes", {}).get(scope)
    words = SCOPE_TITLES.get(scope, f"scope '{scope}'")
    return f"{words} ({n} test requests)" if n is not None else words


def gap(results: dict[str, Any], method: str, scope: str = "all") -> str | None:
    """Short text for the empty slot of a method without numbers in ``scope``; None when it has them."""
    if method in results.get("unavailable", {}):
        return "abstained" if "abstain" in str(results["unavailable"][method]).lower() else "not run"
    per_scope = results["summary"].get(method)
    if not per_scope:
        return "no result"
    if scope not in per_scope:
        return "not in this scope"
    return None


def gap_notes(results: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """One line per method that was asked for but has no numbers at all: why (the full reason)."""
    out = []
    for m in results["methods"]:
        short = gap(results, m)
        if short is None:
            continue
        why = results.get("unavailable", {}).get(m) or "asked for, but results.json has no numbers for it"
        out.append(f"{m} ({labels.get(m, m)}): {short}: {why}")
    return out


class Style:
    """One colour, dash pattern and marker per method, the same in every plot."""

    def __init__(self, methods: list[str]) -> None:
        import matplotlib.pyplot as plt

        self._i = {m: i for i, m in enumerate(methods)}
        self._cmap = plt.get_cmap("tab10")

    def color(self, m: str) -> Any:
        i = self._i.get(m, 0)
        # past ten methods tab10 would repeat a colour: greys instead, told apart by dash and marker
        return self._cmap(i) if i < 10 else EXTRA_COLORS[(i - 10) % len(EXTRA_COLORS)]

    def line(self, m: str) -> dict[str, Any]:
        i = self._i.get(m, 0)
        dash = DASHES[(i + i // len(DASHES)) % len(DASHES)]  # the second round of colours gets other dashes
        return {"color": self.color(m), "linestyle": dash, "marker": MARKERS[i % len(MARKERS)], "markersize": 5,
                "linewidth": 1.4}


__all__ = ["SCOPE_TITLES", "Style", "gap", "gap_notes", "method_labels", "scope_title", "scopes", "seeds",
           "spread_note"]
