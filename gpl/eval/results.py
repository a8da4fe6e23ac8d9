"""The parts of results.json that describe a comparison rather than run it: summaries over seeds, the anchors'
coverage, the dataset.

Why a module of its own: the driver (gpl/eval/run.py) trains and scores; what it then reports about its
numbers and its inputs is plain bookkeeping over what it collected, and report.py and the plots read it
back (the ``summary`` table, ``anchors``, ``dataset``), so its shape is kept in one place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpl.eval.anchor_sources import SourceAnchors
from gpl.eval.dataset import EvalDataset

Runs = dict[str, dict[str, dict[str, dict[str, float]]]]  # method -> seed -> scope -> metric -> value


def _nanstats(vals: list[float]) -> dict[str, float]:
    a = np.asarray([v for v in vals if v == v], np.float64)
    if not len(a):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def summarise(runs: Runs, scopes: dict[str, np.ndarray]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Method -> scope -> metric -> mean, sample std and n over the seeds that produced it (NaNs left out)."""
    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for method, per_seed in runs.items():
        for scope in scopes:
            keys = sorted({k for r in per_seed.values() for k in r.get(scope, {})})
            summary.setdefault(method, {})[scope] = {
                k: _nanstats([r[scope].get(k, float("nan")) for r in per_seed.values() if scope in r]) for k in keys
            }
    return summary


def anchors_report(
    ds: EvalDataset,
    books: dict[str, SourceAnchors],
    anchored: set[int],
    n_hist: int,
    *,
    mode: str,
    max_llm_users: int | None,
) -> dict[str, Any]:
    """Who had anchors: coverage of users and test requests, each anchor book, a few text examples."""
    return {
        "mode": mode,
        "max_llm_users": max_llm_users if mode == "llm" else None,
        "users_total": len(ds.users),
        "users_with_training_clicks": n_hist,
        "users_with_text_anchors": len(anchored),
        "share_of_users_with_text_anchors": len(anchored) / max(len(ds.users), 1),
        "share_of_test_requests_anchored": (
            float(np.isin(ds.req_user[ds.is_test], list(anchored)).mean()) if anchored else 0.0
        ),
        "rest": (
            "users without anchors get no pseudo-labels in the GPL rows (exposed rows only), as in the "
            "stream before a user's first anchor set; with capped LLM text anchors (gpl-text) the "
            "'anchored' scope isolates the users that route could act on"
        ),
        "books": {
            k: {"kind": b.kind, "model": b.model, "prompt_hash": b.prompt_hash, **b.info} for k, b in books.items()
        },
        "examples": {ds.users[u]: books["text"].users[u].texts for u in list(books["text"].users)[:5]}
        if "text" in books
        else {},
    }


def dataset_report(ds: EvalDataset) -> dict[str, Any]:
    """The dataset's name, digest, split and statistics (a per-user split's dates are left out: one per user)."""
    return {
        "name": ds.name,
        "digest": ds.digest,
        "split": {k: v for k, v in ds.split.items() if k != "user_test_start_ms"},
        "per_user_split": bool(ds.split.get("user_test_start_ms")),
        "stats": ds.stats(),
        "simulated": ds.meta.get("simulated", ""),
    }
