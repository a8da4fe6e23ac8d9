"""The demo's metric and its printed summary: how the pre-ranker trained on the stream did on held-out requests.

Why apart from gpl/demo.py: that module runs the demo (models, world, stack, stream, wait); this one judges
its result — the entire-space AUC and GAUC of the last checkpoint against an exposed-only pre-ranker and
a popularity baseline, what the ``samples`` topic holds — and prints the summary ``gpl demo`` shows.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gpl.demo_history import held_out_histories
from gpl.eval.metrics import auc, gauc
from gpl.stack import Stack
from runtime.settings import Settings
from schemas.events import ExposureEvent, RecallEvent
from schemas.topics import SAMPLES
from schemas.wire import payload


def evaluate(settings: Settings, stack: Stack, test: list[tuple[str, Any]], truth: dict[tuple[str, int], int],
             train: list[tuple[str, Any]], *, directory: Path | None = None) -> dict[str, Any]:
    """Entire-space AUC of the last checkpoint (in ``directory``) on held-out requests, with a popularity
    baseline; GAUC over users as well, because a pre-ranker ranks within a request's recall set."""
    from workers.trainer.checkpoints import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(directory if directory is not None else settings.checkpoints_dir)
    if ckpt is None:
        return {"error": "no checkpoint written"}
    model, meta = load_checkpoint(ckpt)
    pop: Counter[int] = Counter()
    for t, e in train:
        if t == "exposure":
            for it in e.items:
                pop[it.item_id] += int(it.clicked)
    exposures = {e.request_id: e for t, e in test if t == "exposure" and isinstance(e, ExposureEvent)}
    users, items, labels, exposed = [], [], [], []
    for t, e in test:
        if t != "recall" or not isinstance(e, RecallEvent) or e.request_id not in exposures:
            continue
        shown = {it.item_id: it.clicked for it in exposures[e.request_id].items}
        for c in e.candidates:
            label = int(shown[c.item_id]) if c.item_id in shown else truth.get((e.request_id, c.item_id))
            if label is None:
                continue
            users.append(e.user_id)
            items.append(c.item_id)
            labels.append(label)
            exposed.append(c.item_id in shown)
    if not labels:
        return {"error": "no labeled test candidates"}
    ids = np.asarray(items, np.int64)
    uniq = np.unique(ids)
    pts = stack.index.retrieve(settings.encoder.collection, uniq)
    row = {int(i): r for r, i in enumerate(pts.ids.tolist())}
    keep = np.asarray([int(i) in row for i in ids])
    vecs = pts.vectors[[row[int(i)] for i in ids[keep]]]
    y = np.asarray(labels)[keep]
    ex = np.asarray(exposed)[keep]
    kept_users = [u for u, k in zip(users, keep, strict=True) if k]
    hist = held_out_histories(settings.encoder.collection, stack.index, train, kept_users, model.cfg)
    scores = model.score(kept_users, ids[keep], vecs, hist)
    popularity = np.asarray([pop[int(i)] for i in ids[keep]], np.float64)
    return {
        "checkpoint": str(ckpt.name),
        "test_candidates": int(len(y)),
        "test_positives": int(y.sum()),
        "auc_entire_space": _auc(scores, y),
        "gauc_entire_space": _gauc(scores, y, [u for u, k in zip(users, keep, strict=True) if k]),
        "auc_exposed": _auc(scores[ex], y[ex]),
        "auc_unexposed": _auc(scores[~ex], y[~ex]),
        "popularity_auc_entire_space": _auc(popularity, y),
        "popularity_auc_unexposed": _auc(popularity[~ex], y[~ex]),
        "checkpoint_counts": meta.get("counts", {}),
    }


def sample_stats(settings: Settings, timeout: float = 60.0) -> dict[str, Any]:
    """Read ``samples`` to its end once: counts per source and the mean pseudo-label and weight."""
    from confluent_kafka import TopicPartition

    from runtime.kafka import consumer

    c = consumer(settings.kafka, f"demo-stats-{time.monotonic_ns()}")
    parts = [TopicPartition(SAMPLES.name, p, 0) for p in range(settings.kafka.partitions)]
    ends = {p.partition: c.get_watermark_offsets(p, timeout=10)[1] for p in parts}
    c.assign(parts)
    pos = {p: 0 for p in ends}
    n: Counter[str] = Counter()
    label_sum = weight_sum = 0.0
    deadline = time.monotonic() + timeout
    while any(pos[p] < ends[p] for p in ends) and time.monotonic() < deadline:
        for m in c.consume(1000, timeout=0.5):
            if m.error() is not None:
                continue
            pos[m.partition() or 0] = (m.offset() or 0) + 1
            for x in orjson.loads(payload(m.value()) or b'{"samples": []}')["samples"]:  # either wire format
                n[x["source"]] += 1
                if x["source"] == "pseudo":
                    label_sum += x["label"]
                    weight_sum += x["weight"]
    c.close()
    pseudo = n["pseudo"]
    return {"by_source": dict(n), "pseudo_label_mean": round(label_sum / pseudo, 4) if pseudo else None,
            "pseudo_weight_mean": round(weight_sum / pseudo, 4) if pseudo else None}


def _auc(scores: np.ndarray, y: np.ndarray) -> float | None:
    """The library's AUC (:func:`gpl.eval.metrics.auc`), rounded for the summary; None when one class is missing."""
    a = auc(scores, y)
    return None if math.isnan(a) else round(a, 4)


def _gauc(scores: np.ndarray, y: np.ndarray, users: list[str]) -> float | None:
    """The library's GAUC over users (users with one class left out), rounded; None when none qualifies."""
    _, groups = np.unique(np.asarray(users), return_inverse=True)
    g = gauc(scores, y, groups)
    return None if math.isnan(g) else round(g, 4)


def _calibration_lines(calib: dict[str, Any] | None, counts: dict[str, int] | None = None) -> list[str]:
    """Closed loop: pseudo-labels whose (user, item) was exposed later, against the real outcome.

    Two components measure it: the calibration monitor (per generator, ``calib``: its groups, when it ran
    in this process; else its join count) and the labeler's recalibration (``counts``, from the stages'
    accounting; it warns of drift in the log). Both are reported, so "none met" is never printed beside a
    drift warning about hundreds of them."""
    counts = counts or {}
    groups = (calib or {}).get("groups", [])
    lines = [f"  closed-loop check    {g['model']} ({g['prompt_hash'][:8]}{', fallback' if g['fallback'] else ''}): "
             f"{g['joined']} pseudo-labels met their real outcome later; mean p {g['mean_p']:.3f} vs observed "
             f"{g['observed_rate']:.3f}, ECE {g['label_ece']:.3f}" for g in groups]
    if not groups and counts.get("monitor_joined"):
        lines.append(f"  closed-loop check    calibration monitor: {counts['monitor_joined']} pseudo-labels met their "
                     "real outcome later (per generator: gpl_pseudo_label_ece on /metrics)")
    if counts.get("labeler_joined"):
        drift, ok = counts.get("drift_refits", 0), counts.get("calibrated_refits", 0)
        verdict = (f"{drift} of {drift + ok} intercept refits found calibration drift (ECE above labeler.ece_alert: "
                   "the labeler's warning)" if drift else f"{ok} intercept refits, no drift") if drift + ok \
            else "too few for a refit"
        lines.append(f"  closed-loop check    labeler: {counts['labeler_joined']} of its pseudo-labels met a later "
                     f"real label of the same user; {verdict}")
    if not lines:
        lines.append("  closed-loop check    no pseudo-labeled item was exposed later to the same user "
                     "(calibration monitor and labeler agree)")
    return lines


def _gate_line(gate: dict[str, Any] | None) -> str:
    """The publication gate's decisions in one line (each is in gate.jsonl, and counted in
    gpl_trainer_publish_decisions_total), not a log line per refused checkpoint."""
    if not gate or not gate.get("decisions"):
        return "  quality gate         no checkpoint gated"
    by = gate.get("by_outcome", {})
    parts = ", ".join(f"{by[k]} {k}" for k in ("published", "refused", "insufficient") if by.get(k))
    last = f"; last refusal: {gate['last_refusal']}" if gate.get("last_refusal") else ""
    return f"  quality gate         {gate['decisions']} checkpoints: {parts} (noise-aware; gate.jsonl){last}"


def _calibrator_line(c: dict[str, Any]) -> str:
    if not c.get("fitted"):
        return f"none — the labeler abstains ({c.get('reason', 'not fitted')})"
    cv = c.get("cv", {})
    return (f"{c['version']} on {', '.join(c['features'])}; held-out users: AUC {cv.get('cv_auc')}, "
            f"ECE {cv.get('cv_ece')}, log-loss gain {cv.get('gain')} over the base rate")


def _verdict(m: dict[str, Any], b: dict[str, Any]) -> str:
    """GPL against exposed-only on the same held-out requests, in words (one run: no error bars)."""
    pairs = [(k, m.get(k), b.get(k)) for k in ("gauc_entire_space", "auc_entire_space")]
    known = [(k, g, e) for k, g, e in pairs if g is not None and e is not None]
    if not known:
        return "unknown (a model was not trained)"
    return ", ".join(f"{k.split('_')[0].upper()} {'+' if g >= e else ''}{g - e:.4f}" for k, g, e in known) + \
        " (GPL minus exposed-only; one seed, one run)"


def print_summary(summary: dict[str, Any]) -> None:
    m = summary.get("metric", {})
    b = m.get("exposed_only", {}) or {}
    lines = [
        "GPL stream demo — summary",
        f"  events in            {summary['events_in']}",
        f"  requests joined      {summary['requests_joined']}  (expired {summary['requests_expired']})",
        f"  unexposed candidates {summary['unexposed_candidates']}",
        f"  real-label samples   {summary['real_samples']}",
        f"  anchor requests      {summary['anchor_requests']}",
        f"  anchor sets          {summary['anchor_sets_generated']}  (fallbacks {summary['anchor_fallbacks']})",
        f"  calibrator           {_calibrator_line(summary.get('calibrator') or {})}",
        f"  pseudo-labels        {summary['pseudo_labels']}  mean label {summary['pseudo_label_mean']}"
        f"  mean weight {summary['pseudo_weight_mean']}  (sampled out {summary['sampled_out']})",
        f"  dead letters         {summary['dlq'] or 0}",
        f"  checkpoints          {len(summary['checkpoints'])} {summary['checkpoints'][-1:] }",
        f"  pre-ranker, GPL      AUC entire space {m.get('auc_entire_space')}  GAUC {m.get('gauc_entire_space')}"
        f"  exposed {m.get('auc_exposed')}  unexposed {m.get('auc_unexposed')}",
        f"  pre-ranker, exposed  AUC entire space {b.get('auc_entire_space')}  GAUC {b.get('gauc_entire_space')}"
        f"  exposed {b.get('auc_exposed')}  unexposed {b.get('auc_unexposed')}  (same stream, no pseudo-labels)",
        f"  popularity baseline  AUC entire space {m.get('popularity_auc_entire_space')}  unexposed"
        f" {m.get('popularity_auc_unexposed')}  ({m.get('test_candidates')} held-out candidates)",
        f"  did the labels help  {_verdict(m, b)}",
        *_calibration_lines(summary.get("calibration"), summary.get("closed_loop")),
        _gate_line(summary.get("gate")),
        f"  all accounted for    {summary['quiescent']}   errors: {summary['stage_errors'] or 'none'}",
        f"  wall time            {summary['seconds']} s",
    ]
    print("\n".join(lines))
