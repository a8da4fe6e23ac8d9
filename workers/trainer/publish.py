"""Publishing the pre-ranker for serving, behind a quality gate on held-out real labels.

A checkpoint is the trainer's recovery point, not a serving decision: one bad stretch of the stream (a
broken labeler, a skewed replay) is checkpointed like any other. So every checkpoint is *gated*: it and
the currently published model are scored on the same held-out slice of recent real labels, and it is
published only when its AUC and GAUC (per-user AUC, impression-weighted) are not worse than the
published model's minus ``trainer.publish_margin`` *beyond the slice's own sampling noise*.

* The noise: a held-out slice of 1,000–2,000 rows measures a GAUC only to about ±0.02, so a fixed margin of
  0.005 refused checkpoints for differences the slice cannot see. The gate therefore scores both models on
  the same rows and takes a paired bootstrap of the difference (candidate − published; rows resampled
  for AUC, users for GAUC, the same draw for both models, seeded by the candidate's version):
  ``workers/trainer/gate_noise.py``. A checkpoint is refused only when even the upper end of the difference's
  90 % interval lies below ``-publish_margin``: worse with 95 % confidence, by more than the margin.
  The interval goes to ``gate.jsonl`` with the decision.

* The slice: a deterministic ``trainer.holdout_fraction`` of real-label samples, chosen by the hash of
  the sample id, is never trained (by any checkpoint, after any restart or replay), and the most recent
  ``trainer.holdout_max`` of them are kept in the checkpoint.
* The first publication: with nothing published, the baseline is a constant scorer (AUC = GAUC = 0.5);
  the candidate must beat it strictly. A holdout smaller than ``trainer.publish_min_holdout`` rows, or
  without both clicks and non-clicks, measures nothing: the decision is ``insufficient`` and nothing
  is published.
* Every decision (published, refused, insufficient) goes to ``gate.jsonl`` with its figures and interval,
  to the ``gpl_trainer_publish_decisions_total`` metric and to the log at INFO: a refusal is the gate
  working, not an incident (alert on the metric: deploy/base/alerts.yaml); ``gpl demo`` sums them up.

The published area (``<checkpoints dir>/published/``):

* ``model-<version>.pt``: the serving copy of a checkpoint, in the checkpoint format but without the
  optimizer state, the seen-set and the holdout (``load_checkpoint`` and ``gpl export`` read it);
* ``current``: the pointer, the file name being served; the only file a server needs to watch;
* ``history.jsonl``: append-only ``publish`` and ``rollback`` events; replayed, they give the stack of
  published models that ``gpl publish --rollback`` pops.
"""

from __future__ import annotations

import fcntl
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from runtime.settings import TrainerSettings
from workers.history import profile_of
from workers.labeler.calibrator import binary_auc
from workers.model import PreRanker, item_buckets, user_buckets
from workers.trainer.checkpoints import atomic_write, load_checkpoint, serving_copy
from workers.trainer.gate_noise import Paired, paired_bootstrap, per_user_auc
from workers.trainer.metrics import GATE_SCORE, PUBLISH_DECISIONS, PUBLISH_TIME, PUBLISHED_VERSION

log = logging.getLogger(__name__)
HOLDOUT_SLOTS = 10_000  # holdout_fraction resolution: 0.01 %
BASELINE = 0.5  # AUC and GAUC of a constant scorer
POINTER = "current"
HISTORY = "history.jsonl"
GATE_LOG = "gate.jsonl"


def is_holdout(key: int, fraction: float) -> bool:
    """Whether the sample with hash ``key`` (``sample_key``) is held out: the same answer in every run."""
    return key % HOLDOUT_SLOTS < round(fraction * HOLDOUT_SLOTS)


# --- the held-out slice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HoldoutRows:
    """Held-out samples with their content vectors, ready to score."""

    users: list[str]
    items: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, dim)
    labels: np.ndarray  # float32 (n,), 0 or 1
    history: np.ndarray | None = None  # float32 (n, dim): the rows' history profiles (a model with history)
    anchor: np.ndarray | None = None  # float32 (n, 2): the rows' anchor cross feature (a model with anchor_cross)

    _buckets: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.users)

    def buckets(self, kind: str, n: int) -> np.ndarray:
        """Hash buckets of the users or items, computed once for both models of a gate."""
        if (kind, n) not in self._buckets:
            self._buckets[kind, n] = user_buckets(self.users, n) if kind == "user" else item_buckets(self.items, n)
        return self._buckets[kind, n]


class Holdout:
    """The most recent held-out real labels (user, item, label, history items or None), bounded, saved in
    every checkpoint. The history items are the user's clicks before the row's request (a model that reads
    history is scored with the history it would have had), and the anchor cross feature it was trained with."""

    def __init__(self, capacity: int) -> None:
        self.rows: deque[tuple[str, int, float, tuple[int, ...] | None, tuple[float, ...] | None]] = deque(
            maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, user_id: str, item_id: int, label: float, history: list[int] | None = None,
            anchor: np.ndarray | list[float] | None = None) -> None:
        self.rows.append((user_id, int(item_id), float(label), None if history is None else tuple(history),
                          None if anchor is None else tuple(float(a) for a in anchor)))

    def state(self) -> dict[str, Any]:
        """Plain lists and tensors only: checkpoints are loaded with ``weights_only``."""
        out: dict[str, Any] = {
            "users": [r[0] for r in self.rows],
            "items": torch.tensor([r[1] for r in self.rows], dtype=torch.int64),
            "labels": torch.tensor([r[2] for r in self.rows], dtype=torch.float32),
        }
        if any(r[3] is not None for r in self.rows):
            out["history"] = [list(r[3] or ()) for r in self.rows]
        if any(r[4] is not None for r in self.rows):
            out["anchor"] = [list(r[4] or ()) or None for r in self.rows]
        return out

    def restore(self, state: dict[str, Any] | None) -> None:
        self.rows.clear()
        if state:
            hist = state.get("history") or [None] * len(state["users"])
            anchor = state.get("anchor") or [None] * len(state["users"])
            for u, i, y, h, a in zip(state["users"], state["items"].tolist(), state["labels"].tolist(), hist, anchor,
                                     strict=True):
                self.add(u, i, y, h, a)

    def item_ids(self) -> set[int]:
        return {r[1] for r in self.rows} | {i for r in self.rows for i in (r[3] or ())}

    def with_vectors(self, vectors: dict[int, np.ndarray], dim: int, history: bool = False) -> HoldoutRows:
        """The rows whose item has a vector (an item deleted from the index since is left out); with
        ``history``, each row's history profile from its history items' vectors."""
        kept = [r for r in self.rows if r[1] in vectors]
        hist = None
        if history:
            profiles = [profile_of(r[3] or (), vectors, dim) for r in kept]
            hist = np.stack(profiles) if profiles else np.zeros((0, dim), np.float32)
        return HoldoutRows(
            users=[r[0] for r in kept],
            items=np.asarray([r[1] for r in kept], np.int64),
            vectors=np.stack([vectors[r[1]] for r in kept]) if kept else np.zeros((0, dim), np.float32),
            labels=np.asarray([r[2] >= 0.5 for r in kept], np.float32),
            history=hist,
            anchor=np.asarray([r[4] if r[4] is not None else (0.0, 0.0) for r in kept], np.float32).reshape(-1, 2),
        )


# --- measuring and deciding --------------------------------------------------------------------------


def gauc(scores: np.ndarray, labels: np.ndarray, users: list[str]) -> tuple[float, int]:
    """(impression-weighted mean of per-user AUCs, users counted); users with one class are left out.

    Vectorised (one sort, ties share their average rank within the user): the gate runs at every
    checkpoint, and a per-user loop cost 0.2 s on 20,000 rows.
    """
    per_user, weight = per_user_auc(scores, labels, users)
    if per_user.size == 0:
        return float("nan"), 0
    return float((per_user * weight).sum() / weight.sum()), int(per_user.size)


@dataclass(frozen=True)
class Scores:
    """A model's figures on the held-out slice."""

    auc: float
    gauc: float
    rows: int
    positives: int
    gauc_users: int


def measure(model: PreRanker, rows: HoldoutRows) -> Scores:
    """Held-out AUC and GAUC of ``model`` (on logits: both are rank metrics, the sigmoid changes nothing)."""
    return scores_of(predict(model, rows), rows)


def scores_of(p: np.ndarray, rows: HoldoutRows) -> Scores:
    g, users = gauc(p, rows.labels, rows.users)
    return Scores(binary_auc(p, rows.labels), g, len(rows), int(rows.labels.sum()), users)


def predict(model: PreRanker, rows: HoldoutRows) -> np.ndarray:
    """The model's logits on the held-out rows (eval mode, no gradient; the training mode is restored)."""
    b = model.cfg.hash_buckets
    was_training = model.training
    try:
        with torch.no_grad():
            hist = None
            if model.cfg.history_items:
                h = rows.history if rows.history is not None else np.zeros_like(rows.vectors)
                hist = torch.from_numpy(np.ascontiguousarray(h, np.float32))
            anchor = None  # a row held out before the model read anchors has zeros (as a user without anchors)
            if model.cfg.anchor_cross:
                a = rows.anchor if rows.anchor is not None else np.zeros((len(rows), 2), np.float32)
                anchor = torch.from_numpy(np.ascontiguousarray(a, np.float32))
            p = model.eval()(torch.from_numpy(rows.buckets("user", b)), torch.from_numpy(rows.buckets("item", b)),
                             torch.from_numpy(rows.vectors), hist, anchor).numpy()
    finally:
        model.train(was_training)
    return np.asarray(p)


def decide(candidate: Scores, published: Scores | None, margin: float, min_rows: int,
           paired: Paired | None = None) -> tuple[str, str]:
    """(outcome, reason): ``published``, ``refused`` or ``insufficient``. Pure: both figures are on one slice.

    With ``paired`` (the bootstrap interval of candidate − published on that slice) a metric fails only
    when the interval's upper end is below ``-margin``; without it, when the point difference is."""
    if candidate.rows < min_rows or math.isnan(candidate.auc):
        return "insufficient", (f"holdout has {candidate.rows} rows ({candidate.positives} clicks); the gate needs "
                                f"{min_rows} with clicks and non-clicks")
    if published is None:
        beats = candidate.auc > BASELINE and (math.isnan(candidate.gauc) or candidate.gauc > BASELINE)
        return ("published", "first publication: beats a constant scorer") if beats else (
            "refused", f"nothing published and AUC {candidate.auc:.4f} / GAUC {candidate.gauc:.4f} do not beat "
                       f"a constant scorer ({BASELINE})")
    failures = []
    for name, c, p in (("AUC", candidate.auc, published.auc), ("GAUC", candidate.gauc, published.gauc)):
        if math.isnan(c):  # groups depend on the labels only, so GAUC is NaN for both models or for neither
            continue
        hi = paired.interval(name)[1] if paired is not None else c - p
        if hi < -margin:
            noise = "" if paired is None else f" (difference {c - p:+.4f}, {paired.confidence:.0%} interval up to " \
                                               f"{hi:+.4f} on {paired.resamples} paired resamples)"
            failures.append(f"{name} {c:.4f} < published {p:.4f} - {margin}{noise}")
    if failures:
        return "refused", "; ".join(failures)
    if paired is None:
        return "published", f"AUC and GAUC within {margin} of the published model or better"
    return "published", (f"AUC and GAUC not worse than the published model by more than {margin} beyond the "
                         f"slice's noise (differences' {paired.confidence:.0%} intervals reach above -{margin})")


@dataclass(frozen=True)
class Decision:
    """One gate decision, as written to ``gate.jsonl``."""

    candidate: int
    published: int | None  # the version gated against; None: the constant-scorer baseline
    outcome: str
    reason: str
    margin: float
    candidate_scores: Scores
    published_scores: Scores | None
    at: float
    interval: dict[str, Any] | None = None  # the paired bootstrap of candidate - published (Paired.to_json)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("candidate_scores", "published_scores"):  # NaN is not JSON
            if d[key] is not None:
                d[key] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d[key].items()}
        return d


# --- the published area ------------------------------------------------------------------------------


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "ab") as f:
        f.write(orjson.dumps(record) + b"\n")
        f.flush()


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


class PublishedArea:
    """The files a server reads: model copies, the ``current`` pointer, the history; changes under a lock,
    because the trainer publishes while an operator may roll back from ``gpl publish``."""

    def __init__(self, directory: Path, keep: int = 10) -> None:
        self.directory = directory
        self.keep = keep

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def current(self) -> Path | None:
        """The published model file the pointer names, or None."""
        pointer = self.directory / POINTER
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if path.is_file() else None

    def history(self) -> list[dict[str, Any]]:
        return _read_lines(self.directory / HISTORY)

    def decisions(self) -> list[dict[str, Any]]:
        return _read_lines(self.directory / GATE_LOG)

    def stack(self) -> list[dict[str, Any]]:
        """Published entries, oldest first, as the history leaves them: publish pushes, rollback pops."""
        out: list[dict[str, Any]] = []
        for event in self.history():
            if event["event"] == "publish":
                out.append(event)
            elif event["event"] == "rollback" and out:
                out.pop()
        return out

    def _point(self, name: str) -> None:
        atomic_write(self.directory / POINTER, lambda f: f.write(name.encode() + b"\n"))

    def publish(self, payload: dict[str, Any], decision: Decision) -> Path:
        """Copy the checkpoint's serving part, record it, then move the pointer (a reader never sees a
        pointer to a missing or torn file); prune model files deeper than ``keep`` in the stack."""
        with self._locked():
            path = self.directory / f"model-{int(payload['version']):06d}.pt"
            atomic_write(path, lambda f: torch.save(serving_copy(payload), f))
            _append_line(self.directory / HISTORY, {
                "event": "publish", "file": path.name, "version": int(payload["version"]), "at": decision.at,
                "auc": decision.to_json()["candidate_scores"]["auc"],
                "gauc": decision.to_json()["candidate_scores"]["gauc"],
            })
            self._point(path.name)
            live = {e["file"] for e in self.stack()[-self.keep:]} | {path.name}
            for old in self.directory.glob("model-*.pt"):
                if old.name not in live:
                    old.unlink(missing_ok=True)
        PUBLISHED_VERSION.set(int(payload["version"]))
        PUBLISH_TIME.set(decision.at)
        return path

    def rollback(self) -> dict[str, Any]:
        """Point back at the previously published model; returns its history entry."""
        with self._locked():
            stack = self.stack()
            if len(stack) < 2:
                raise ValueError(f"{self.directory}: {len(stack)} published model(s), nothing to roll back to")
            back, to = stack[-1], stack[-2]
            if not (self.directory / to["file"]).is_file():
                raise FileNotFoundError(f"{to['file']} was pruned (trainer.keep_published); cannot roll back to it")
            _append_line(self.directory / HISTORY, {"event": "rollback", "file": back["file"],
                                                    "version": back["version"], "to": to["file"], "at": time.time()})
            self._point(to["file"])
        PUBLISHED_VERSION.set(int(to["version"]))
        PUBLISH_TIME.set(time.time())
        return to

    def record(self, decision: Decision) -> None:
        with self._locked():
            _append_line(self.directory / GATE_LOG, decision.to_json())


# --- the trainer's side ------------------------------------------------------------------------------


class Publisher:
    """Gates the trainer's checkpoints against the published model and publishes those that pass."""

    def __init__(self, checkpoints_dir: Path, cfg: TrainerSettings) -> None:
        self.cfg = cfg
        self.area = PublishedArea(checkpoints_dir / "published", cfg.keep_published)
        self._published: tuple[Path, int, PreRanker] | None = None  # loaded once per pointer value

    def published_model(self) -> tuple[int, PreRanker] | None:
        """The model the pointer names now (an operator's rollback is seen at the next gate)."""
        path = self.area.current()
        if path is None:
            return None
        if self._published is None or self._published[0] != path:
            model, meta = load_checkpoint(path)
            self._published = (path, int(meta["version"]), model)
        return self._published[1], self._published[2]

    def gate_holdout(self, payload: dict[str, Any], model: PreRanker, holdout: Holdout,
                     vectors: dict[int, np.ndarray]) -> Decision | None:
        """Gate a checkpoint the trainer just committed on its held-out rows (``vectors``: their items').

        After the commit: the checkpoint is durable whatever the gate says, and a failing gate (a corrupt
        published file, a full disk) is logged and retried at the next checkpoint, never fatal (None).
        """
        rows = holdout.with_vectors(vectors, model.cfg.content_dim, history=bool(model.cfg.history_items))
        try:
            return self.gate(payload, model, rows)
        except (OSError, ValueError, RuntimeError):
            log.exception("trainer: publishing gate failed for checkpoint %d; it stays unpublished",
                          int(payload["version"]))
            return None

    def gate(self, payload: dict[str, Any], model: PreRanker, rows: HoldoutRows) -> Decision:
        p_cand = predict(model, rows)
        cand = scores_of(p_cand, rows)
        pub = self.published_model()
        pub_scores = paired = None
        if pub is not None:
            p_pub = predict(pub[1], rows)
            pub_scores = scores_of(p_pub, rows)
            if len(rows):  # the same rows, the same draws for both models: the noise of the difference
                paired = paired_bootstrap(p_cand, p_pub, rows.labels, rows.users, seed=int(payload["version"]))
        outcome, reason = decide(cand, pub_scores, self.cfg.publish_margin, self.cfg.publish_min_holdout, paired)
        decision = Decision(candidate=int(payload["version"]), published=pub[0] if pub is not None else None,
                            outcome=outcome, reason=reason, margin=self.cfg.publish_margin, candidate_scores=cand,
                            published_scores=pub_scores, at=time.time(),
                            interval=paired.to_json() if paired is not None else None)
        if outcome == "published":
            self.area.publish(payload, decision)
        self.area.record(decision)
        PUBLISH_DECISIONS.labels(outcome=outcome).inc()
        for name, s in (("candidate", cand), ("published", pub_scores)):
            if s is not None:
                GATE_SCORE.labels(model=name, metric="auc").set(s.auc)
                GATE_SCORE.labels(model=name, metric="gauc").set(s.gauc)
        log.info("trainer: checkpoint %d %s for serving (AUC %.4f, GAUC %.4f on %d held-out rows; published %s): %s",
                decision.candidate, outcome, cand.auc, cand.gauc, cand.rows,
                "none" if pub_scores is None else f"v{pub[0] if pub else '?'} AUC {pub_scores.auc:.4f} "
                                                  f"GAUC {pub_scores.gauc:.4f}", reason)
        return decision
