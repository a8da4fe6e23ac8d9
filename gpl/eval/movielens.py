"""Build an evaluation dataset (docs/eval.md) from MovieLens with the seeded funnel simulator.

What is real and what is simulated (the report repeats this; gpl/simulate/__init__.py has the exact model):

* real: the users, the movies and their texts (title, genres, tags), the order and time of each
  user's ratings, and every label. A request's *targets* are 5 consecutive ratings of the user; a
  candidate is positive when the user rated it >= 4.0 (at any time), negative when rated lower.
* simulated: the funnel around those ratings. The recall stage (popularity, genre-affinity and random
  routes, 200 candidates with the targets injected), the biased exposure policy (top 10 by
  popularity + a little affinity + noise), and the click (= shown and rated >= 4). Everything is seeded.
* consequences: ~95% of unexposed candidates were never rated: their label is unknown and the
  metrics treat them as non-positives for ranking and leave them out of AUC. Clicks use future
  ratings by construction (the simulated user already "knows" they will like the film).

The split is temporal. ``per-user`` (default): each user's last ``test_fraction`` of requests (at least
one, for users with two or more requests) is the test period, via ``user_test_start_ms`` = the time
of the user's first test request; users with a single request stay in training (the global
``test_start_ms`` is set past the last request). ``global``: one cut at the ``1 - test_fraction``
quantile of request times (old users then have no test requests and recent ones little history).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from gpl.simulate import DEFAULT_PATH, SimConfig, load_movielens, simulate, write_jsonl
from gpl.simulate.export import built_with
from schemas.events import RecallEvent

FORMAT = "gpl-eval-dataset/1"
SIMULATED = (
    "recall candidates (popular/genre/random routes, 200 per request, targets injected), the exposure "
    "policy (top 10 by popularity + 0.3 affinity + noise) and clicks (shown and rated >= 4) are simulated "
    "by gpl/simulate/; users, items, rating times and all labels are real MovieLens data"
)


def build_movielens(
    out_dir: Path | str,
    *,
    seed: int = 0,
    users: int | None = None,
    test_fraction: float = 0.2,
    split: Literal["per-user", "global"] = "per-user",
    data: Path | str = DEFAULT_PATH,
    candidates: int = 200,
    exposed: int = 10,
    max_requests_per_user: int | None = 40,
    force: bool = False,
) -> Path:
    """Write events.jsonl, truth.jsonl, split.json and meta.json into ``out_dir``; returns it.

    Idempotent: a directory whose meta.json records the same configuration is left as it is.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    out = Path(out_dir)
    config: dict[str, Any] = {
        "seed": seed,
        "users": users,
        "test_fraction": test_fraction,
        "split": split,
        "candidates": candidates,
        "exposed": exposed,
        "max_requests_per_user": max_requests_per_user,
        "data": str(Path(data).resolve()),
    }
    key, built = built_with(out, config, force=force)
    if built:
        return out
    meta_file = out / "meta.json"
    out.mkdir(parents=True, exist_ok=True)
    ml = load_movielens(data)
    cfg = SimConfig(
        seed=seed,
        users=users,
        candidates=candidates,
        exposed=exposed,
        max_requests_per_user=max_requests_per_user,
    )
    sim = simulate(ml, cfg)
    tmp = out / ".events.jsonl.tmp"
    write_jsonl(sim, tmp)
    tmp.replace(out / "events.jsonl")
    with open(out / "truth.jsonl", "wb") as f:
        for (u, i), lab in sorted(sim.truth.items()):
            f.write(orjson.dumps({"user_id": u, "item_id": i, "label": lab}) + b"\n")

    by_user: dict[str, list[int]] = {}
    all_ts: list[int] = []
    for topic, ev in sim.events:
        if topic == "recall" and isinstance(ev, RecallEvent):
            by_user.setdefault(ev.user_id, []).append(ev.ts)
            all_ts.append(ev.ts)
    split_doc: dict[str, Any]
    if split == "per-user":
        per_user: dict[str, int] = {}
        for u, stamps in by_user.items():
            stamps.sort()
            if len(stamps) < 2:
                continue
            n_test = max(1, math.ceil(test_fraction * len(stamps)))
            per_user[u] = stamps[len(stamps) - n_test]
        split_doc = {
            "test_start_ms": max(all_ts) + 1 if all_ts else 0,
            "user_test_start_ms": per_user,
            "rule": f"per-user: last {test_fraction:.0%} of each user's requests (>= 1) are test",
        }
    else:
        cut = int(np.quantile(np.asarray(all_ts, np.int64), 1.0 - test_fraction)) if all_ts else 0
        split_doc = {
            "test_start_ms": cut,
            "rule": f"global: requests at or after the {1 - test_fraction:.0%} quantile of request times are test",
        }
    (out / "split.json").write_text(json.dumps(split_doc, sort_keys=True))
    meta = {
        "format": FORMAT,
        "name": f"movielens-small-seed{seed}",
        "config": config,
        "config_key": key,
        "simulated": SIMULATED,
        "sim_stats": sim.stats,
        "source": "gpl.eval.movielens.build_movielens",
    }
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def default_dir(data_dir: Path, seed: int = 0) -> Path:
    """Where ``gpl eval movielens`` builds the dataset: ``<data_dir>/eval/datasets/movielens-seed<S>``."""
    return Path(data_dir) / "eval" / "datasets" / f"movielens-seed{seed}"


__all__ = ["build_movielens", "default_dir", "SIMULATED", "FORMAT"]
