"""Calibration monitor: ``samples`` → join pseudo-labels with the real labels they later got → reliability.

Why: a pseudo-label is a claim ("this user would click this item with probability p, and we are w
sure"). The stream itself eventually checks some claims: an item that was recalled but not shown to a
user (pseudo-labeled) is often shown to the same user in a later request, and then it gets a real
label (click or exposed negative). Joining the two closes the loop on the label map and on the
confidence weights, online and per anchor generator, with no offline truth.

Reads top to bottom: poll SampleBatches, dead-letter what does not parse; for a real sample
(``click`` / ``exposed-negative``) look its (user, item) up in a bounded LRU of earlier pseudo-labels
and, on a hit, add the pair to its group's curves and forget the pseudo-label (one outcome per claim);
then remember the batch's pseudo samples (user, item) → (p, w, anchor model, prompt hash, version,
fallback), a newer claim replacing an older one. Gauges are refreshed every ``export_every_s``.

Groups: (anchor model, prompt hash, fallback). The anchor *version* of each joined pseudo-label is
kept only as a range per group: versions are per-user epoch-ms stamps, so a group per version would
be one group (and one Prometheus label set) per user and generation.

Curves per group, 10 equal-width bins:

* labels — bin by p: mean p vs observed click rate; ECE = Σ n_b/N |mean p_b − rate_b|;
* weights — bin by w: mean w vs mean agreement 1 − |y − p| (a weight claims how close the label is);
  ECE likewise. A weight that is high exactly where labels are right reads as calibrated.

State lives in memory: a restart begins with an empty LRU, and joins resume as new pseudo-labels
arrive (offsets are committed after each poll, so nothing is re-read). Counting: every message is
``in`` and ends ``processed`` or ``dlq:<reason>``; samples are counted ``pseudo`` / ``real``, and real
ones ``joined`` or ``unmatched``; ``evicted`` pseudo-labels left the LRU unjoined.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.kafka import Accounting
from runtime.settings import Settings
from runtime.stage_io import StageIO
from runtime.stage_port import StagePort
from schemas.events import SampleBatch
from schemas.topics import SAMPLES
from workers.calibration_metrics import (
    PSEUDO_ECE,
    PSEUDO_JOINED,
    PSEUDO_PENDING,
    PSEUDO_RELIABILITY_OBSERVED,
    PSEUDO_RELIABILITY_PAIRS,
    PSEUDO_RELIABILITY_PREDICTED,
    PSEUDO_WEIGHT_ECE,
)
from workers.labeler.outcome_memory import OutcomeMemory

log = logging.getLogger(__name__)
STAGE = "calibration"
BINS = 10
GroupKey = tuple[str, str, bool]  # (anchor model, prompt hash, fallback)


@dataclass
class Curve:
    """Running reliability sums of one group (both curves share the bin count)."""

    bins: int = BINS
    n: np.ndarray = field(init=False)
    sum_p: np.ndarray = field(init=False)
    sum_y: np.ndarray = field(init=False)
    wn: np.ndarray = field(init=False)
    sum_w: np.ndarray = field(init=False)
    sum_agree: np.ndarray = field(init=False)
    min_version: int = 0
    max_version: int = 0

    def __post_init__(self) -> None:
        z = np.zeros(self.bins)
        self.n, self.sum_p, self.sum_y = z.copy(), z.copy(), z.copy()
        self.wn, self.sum_w, self.sum_agree = z.copy(), z.copy(), z.copy()

    def add(self, p: np.ndarray, w: np.ndarray, y: np.ndarray, versions: np.ndarray) -> None:
        p, w, y = (np.clip(np.asarray(a, np.float64), 0.0, 1.0) for a in (p, w, y))
        b = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
        self.n += np.bincount(b, minlength=self.bins)
        self.sum_p += np.bincount(b, weights=p, minlength=self.bins)
        self.sum_y += np.bincount(b, weights=y, minlength=self.bins)
        bw = np.minimum((w * self.bins).astype(np.int64), self.bins - 1)
        self.wn += np.bincount(bw, minlength=self.bins)
        self.sum_w += np.bincount(bw, weights=w, minlength=self.bins)
        self.sum_agree += np.bincount(bw, weights=1.0 - np.abs(y - p), minlength=self.bins)
        if len(versions):
            lo, hi = int(np.min(versions)), int(np.max(versions))
            self.min_version = lo if self.min_version == 0 else min(self.min_version, lo)
            self.max_version = max(self.max_version, hi)

    @staticmethod
    def _ece(n: np.ndarray, pred: np.ndarray, obs: np.ndarray) -> float:
        total = n.sum()
        if total == 0:
            return float("nan")
        ok = n > 0
        return float((np.abs(pred[ok] - obs[ok])).sum() / total)

    def summary(self) -> dict[str, Any]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mp, my = self.sum_p / self.n, self.sum_y / self.n
            mw, ma = self.sum_w / self.wn, self.sum_agree / self.wn
        return {
            "joined": int(self.n.sum()),
            "label_ece": self._ece(self.n, self.sum_p, self.sum_y),
            "weight_ece": self._ece(self.wn, self.sum_w, self.sum_agree),
            "mean_p": float(self.sum_p.sum() / self.n.sum()) if self.n.sum() else float("nan"),
            "observed_rate": float(self.sum_y.sum() / self.n.sum()) if self.n.sum() else float("nan"),
            "reliability": {
                "predicted": _floats(mp),
                "observed": _floats(my),
                "count": self.n.astype(int).tolist(),
            },
            "weight_reliability": {
                "weight": _floats(mw),
                "agreement": _floats(ma),
                "count": self.wn.astype(int).tolist(),
            },
            "anchor_versions": [self.min_version, self.max_version],
        }


def _floats(a: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in a.tolist()]


class CalibrationBook:
    """The pure join: pseudo-labels remembered in a bounded LRU, real labels joined against them.

    No Kafka here; :class:`CalibrationMonitor` feeds it from the ``samples`` topic and ``gpl eval``
    feeds it arrays from a dataset replay.
    """

    def __init__(self, capacity: int = 200_000, bins: int = BINS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.bins = bins
        # (user, item) → (p, w, group, anchor version): the memory the labeler's recalibration uses too
        self._lru: OutcomeMemory[tuple[float, float, GroupKey, int]] = OutcomeMemory(capacity)
        self.curves: dict[GroupKey, Curve] = {}
        self._counts: dict[str, int] = {
            "remembered": 0,
            "joined": 0,
            "unmatched": 0,
        }
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def counts(self) -> dict[str, int]:
        """remembered / replaced / evicted claims and joined / unmatched real labels, so far."""
        return {**self._counts, "replaced": self._lru.replaced, "evicted": self._lru.evicted}

    def remember(
        self,
        users: Iterable[str],
        items: Iterable[int],
        p: Iterable[float],
        w: Iterable[float],
        group: GroupKey,
        versions: Iterable[int],
    ) -> None:
        """Remember pseudo-labels; a pair already remembered takes the newer claim and moves to the end."""
        with self._lock:
            for u, i, pp, ww, v in zip(users, items, p, w, versions, strict=True):
                self._lru.remember(u, i, (float(pp), float(ww), group, int(v)))
                self._counts["remembered"] += 1

    def join(self, users: Iterable[str], items: Iterable[int], labels: Iterable[float]) -> int:
        """Join real labels with remembered pseudo-labels; returns how many joined."""
        by_group: dict[GroupKey, tuple[list[float], list[float], list[float], list[int]]] = {}
        with self._lock:
            for u, i, y in zip(users, items, labels, strict=True):
                hit = self._lru.take(u, i)
                if hit is None:
                    self._counts["unmatched"] += 1
                    continue
                p, w, g, v = hit
                acc = by_group.setdefault(g, ([], [], [], []))
                acc[0].append(p)
                acc[1].append(w)
                acc[2].append(float(y))
                acc[3].append(v)
            joined = 0
            for g, (ps, ws, ys, vs) in by_group.items():
                curve = self.curves.get(g)
                if curve is None:
                    curve = self.curves[g] = Curve(self.bins)
                curve.add(np.asarray(ps), np.asarray(ws), np.asarray(ys), np.asarray(vs, np.int64))
                joined += len(ps)
            self._counts["joined"] += joined
        return joined

    def observe(self, batch: SampleBatch) -> tuple[int, int, int]:
        """(pseudo, real, joined) of a SampleBatch: real samples are joined first, then pseudo remembered."""
        real = [s for s in batch.samples if s.source != "pseudo"]
        pseudo = [s for s in batch.samples if s.source == "pseudo"]
        joined = self.join([batch.user_id] * len(real), [s.item_id for s in real], [s.label for s in real])
        if pseudo:
            lin = batch.lineage
            group: GroupKey = (lin.anchor_model, lin.prompt_hash, lin.fallback) if lin else ("unknown", "", False)
            version = lin.anchor_version if lin else 0
            self.remember(
                [batch.user_id] * len(pseudo),
                [s.item_id for s in pseudo],
                [s.label for s in pseudo],
                [s.weight for s in pseudo],
                group,
                [version] * len(pseudo),
            )
        return len(pseudo), len(real), joined

    def snapshot(self) -> dict[str, Any]:
        """Plain-JSON state: counts, pending pairs, and per group its curves and ECEs."""
        with self._lock:
            groups = [
                {"model": g[0], "prompt_hash": g[1], "fallback": g[2], **c.summary()}
                for g, c in sorted(self.curves.items())
            ]
            return {
                "pending": len(self._lru),
                "capacity": self.capacity,
                "bins": self.bins,
                "counts": self.counts,
                "groups": groups,
            }

    def export(self) -> None:
        """Set the Prometheus gauges from the current curves."""
        snap = self.snapshot()
        PSEUDO_PENDING.set(snap["pending"])
        for g in snap["groups"]:
            labels = {
                "model": g["model"],
                "prompt_hash": g["prompt_hash"],
                "fallback": str(g["fallback"]).lower(),
            }
            PSEUDO_JOINED.labels(**labels).set(g["joined"])
            for gauge, key in ((PSEUDO_ECE, "label_ece"), (PSEUDO_WEIGHT_ECE, "weight_ece")):
                if g[key] == g[key]:  # NaN: no joined pair yet
                    gauge.labels(**labels).set(g[key])
            rel = g["reliability"]
            for b in range(self.bins):
                for gauge, vals in (
                    (PSEUDO_RELIABILITY_PREDICTED, rel["predicted"]),
                    (PSEUDO_RELIABILITY_OBSERVED, rel["observed"]),
                    (PSEUDO_RELIABILITY_PAIRS, rel["count"]),
                ):
                    v = vals[b]
                    if v is not None:
                        gauge.labels(**labels, bin=str(b)).set(float(v))


class CalibrationMonitor:
    """Consume ``samples`` in its own group and keep the closed-loop calibration of pseudo-labels."""

    def __init__(
        self, settings: Settings, *, capacity: int = 200_000, bins: int = BINS, export_every_s: float = 1.0
    ) -> None:
        self.settings = settings
        self.book = CalibrationBook(capacity, bins)
        self.accounting = Accounting(STAGE)
        self.export_every_s = export_every_s

    def snapshot(self) -> dict[str, Any]:
        return {**self.book.snapshot(), "accounting": self.accounting.snapshot()}

    def run(self, stop: threading.Event, *, poll: int = 256, io: StagePort | None = None) -> None:
        """Join and count until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        if io is None:
            io = StageIO(self.settings.kafka, STAGE, self.accounting, registry=self.settings.schema_registry)
        io.subscribe([SAMPLES.name])
        last_export = 0.0
        with io:
            try:
                while not stop.is_set():
                    msgs = io.poll(poll, 0.5)
                    for m in msgs:
                        self.accounting.add("in")
                        batch = io.decode(m, SampleBatch)
                        if batch is None:
                            continue
                        with io.processing(m):  # a failure of one batch's step: its DLQ, and go on
                            n_pseudo, n_real, joined = self.book.observe(batch)
                            self.accounting.add("processed")
                            self.accounting.add("pseudo", n_pseudo)
                            self.accounting.add("real", n_real)
                            self.accounting.add("joined", joined)
                            self.accounting.add("unmatched", n_real - joined)
                            io.done(m)
                    if msgs and not io.commit(stop, what="dead letters"):  # dead letters, then their offsets
                        break
                    now = time.monotonic()
                    if now - last_export >= self.export_every_s:
                        self.book.export()
                        last_export = now
            finally:
                self.book.export()


__all__ = ["CalibrationBook", "CalibrationMonitor", "Curve", "BINS", "STAGE"]
