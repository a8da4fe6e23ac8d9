"""A simulation as a replayable JSONL event file, and how biased its exposure is.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpl.simulate.funnel import SimConfig, Simulation, simulate
from gpl.simulate.movielens import DEFAULT_PATH, MovieLens, load_movielens
from schemas.events import ExposureEvent, RecallEvent
from schemas.jsonl import write_events


def write_jsonl(sim: Simulation, path: Path | str) -> int:
    """Write the catalogue, then the request events in emission order, as a replayable JSONL file."""
    with open(path, "wb") as f:
        n = write_events(f, (("items", it) for it in sim.items))
        n += write_events(f, sim.events)
    return n


def popularity_bias(ml: MovieLens, sim: Simulation, head_fraction: float = 0.1) -> dict[str, float]:
    """How strongly exposure favours popular items: P(exposed | head candidate) vs P(exposed | tail).

    Head = the ``head_fraction`` most-rated items of the catalogue. Used by tests and the demo report.
    """
    pop = dict(zip(ml.item_ids.tolist(), ml.popularity.tolist(), strict=True))
    cut = np.quantile(ml.popularity, 1.0 - head_fraction)
    shown: set[tuple[str, int]] = set()
    for topic, ev in sim.events:
        if topic == "exposure" and isinstance(ev, ExposureEvent):
            shown.update((ev.request_id, it.item_id) for it in ev.items)
    c: Counter[str] = Counter()
    for topic, ev in sim.events:
        if topic != "recall" or not isinstance(ev, RecallEvent):
            continue
        for item in ev.item_ids:
            part = "head" if pop[item] >= cut else "tail"
            c[part] += 1
            c[f"{part}_exposed"] += (ev.request_id, item) in shown
    head = c["head_exposed"] / max(c["head"], 1)
    tail = c["tail_exposed"] / max(c["tail"], 1)
    return {"head_exposure_rate": head, "tail_exposure_rate": tail, "ratio": head / max(tail, 1e-12),
            "head_candidate_share": c["head"] / max(c["head"] + c["tail"], 1)}


def main(argv: list[str] | None = None) -> None:
    """``python -m gpl.simulate OUT.jsonl [--users N] [--candidates N] [--seed S]``: write, print stats."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--exposed", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    ml = load_movielens(a.data)
    sim = simulate(ml, SimConfig(seed=a.seed, users=a.users, candidates=a.candidates, exposed=a.exposed))
    n = write_jsonl(sim, a.out)
    print(f"wrote {n} events to {a.out}")
    for k, v in {**sim.stats, **popularity_bias(ml, sim)}.items():
        print(f"  {k}: {v:.4g}")


def built_with(out: Path, config: Mapping[str, Any], *, force: bool = False) -> tuple[str, bool]:
    """(key of ``config``, whether ``out`` already holds a dataset built with exactly that configuration).

    Dataset builders write the key into ``meta.json`` as ``config_key``; a rebuild is skipped only when it
    matches, so a changed knob never reuses a stale dataset.
    """
    key = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=8).hexdigest()
    meta_file = Path(out) / "meta.json"
    if force or not meta_file.is_file():
        return key, False
    try:
        return key, json.loads(meta_file.read_text()).get("config_key") == key
    except json.JSONDecodeError:
        return key, False
