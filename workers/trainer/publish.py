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

The parts, a module each: the held-out slice (``workers/trainer/holdout.py``), measuring and deciding
(``workers/trainer/gate.py``, over the paired bootstrap of ``workers/trainer/gate_noise.py``) and the
files a server reads (``workers/trainer/published_area.py``). :class:`Publisher`, here, runs them at
every checkpoint and counts, logs and records each decision.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.settings import TrainerSettings
from workers.model import PreRanker
from workers.trainer.checkpoints import load_checkpoint
from workers.trainer.gate import Decision, decide, predict, scores_of
from workers.trainer.gate_noise import paired_bootstrap
from workers.trainer.holdout import Holdout, HoldoutRows
from workers.trainer.metrics import GATE_SCORE, PUBLISH_DECISIONS
from workers.trainer.published_area import PublishedArea

log = logging.getLogger(__name__)


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
