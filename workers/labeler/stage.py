"""The labeler without its Kafka loop: the engine's decisions performed on the anchor cache, the calibrator
and the outputs.

Why apart: workers/labeler/engine.py decides (label now, defer, hold, time out, give back);
workers/labeler/loop.py polls and hands each message here. Between them sits what the decisions are
performed on: the anchor cache (an ``anchors`` message updates the user's set, or is refused to
``anchors.dlq``: another encoder's space is ``encoder_mismatch``, counted ``anchors_refused``), the
labeling itself (workers/labeler/assemble.py ``label_many``: score, pseudo-label, weigh, sample, one
SampleBatch to ``samples`` keyed by user), the calibrator (loaded from ``gpl calibrate``'s file, or the
labeler abstains: workers/labeler/abstention.py) and the closed loop (real labels on ``samples`` count
the calibrator's priors and meet earlier pseudo-labels: workers/labeler/recalibration.py).

Accounting. ``accounting`` counts unexposed batches and their candidates; for batches
``in = labeled + timed_out + dlq:<reason> + deferred and held (still waiting) + deferred_at_stop +
abstained_at_stop + released``; for candidates of decoded batches ``candidates = pseudo + sampled_out +
duplicate + no_vector + candidates_timed_out + candidates_dlq + candidates_deferred_at_stop +
candidates_abstained_at_stop + candidates_released + (waiting)``. :meth:`LabelerStage.balance` checks both.
``anchor_accounting`` counts anchor sets: ``in = accepted + stale + tombstone + dlq:<reason>``;
``anchors_refused`` counts the refusals among the dead letters (``dlq:encoder_mismatch``,
``dlq:dim_mismatch``, ``dlq:bad_vectors``).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Message

from runtime.kafka import Accounting, DeadLetters
from runtime.settings import Settings
from runtime.stage_port import StagePort
from runtime.vectors.index import VectorIndex
from schemas.codec import DecodeError
from schemas.events import AnchorSet
from schemas.topics import ANCHORS, PSEUDO_HEADER, SAMPLES, UNEXPOSED
from workers.labeler.abstention import file_signature, missing_calibrator_hint
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.assemble import MICRO_BATCH, Abstained, Labeling, LabelStats, NoAnchors, label_many
from workers.labeler.calibrator import CalibratorError, load_calibrator
from workers.labeler.engine import Batch, LabelerEngine
from workers.labeler.features import FEATURES
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.metrics import ABSTAINING, ANCHOR_AGE, CALIBRATION_DRIFT, LATENCY
from workers.labeler.recalibration import Recalibrator

log = logging.getLogger("workers.labeler")  # the stage's name, as before the package (log filters, tests)
STAGE = "labeler"


class LabelerStage:
    """The labeler's state and its effects; ``io`` is the Kafka side (or its twin) while the loop runs."""

    io: StagePort | None = None

    def __init__(self, settings: Settings, index: VectorIndex, *, progress: bool = False) -> None:
        self.settings = settings
        self.cfg = settings.labeler
        self.items = ItemMatrix(index, settings.encoder.collection, settings.encoder.model,
                                retry_s=self.cfg.item_retry_s, dtype=self.cfg.matrix_dtype)
        self.cache = AnchorBook(settings.encoder.model, self.items)
        self.ctx = Labeling(self.cache, self.items, self.cfg, settings.encoder.collection)
        self.recalibrator = Recalibrator(self.cfg.recalibrate_every, self.cfg.ece_alert)
        self._cal_seen: tuple[int, int] | None = None  # the calibrator file as last loaded (stat)
        self.accounting = Accounting(STAGE)
        self.anchor_accounting = Accounting(f"{STAGE}-anchors")
        self.engine = LabelerEngine(self.cfg, self.accounting, lambda user: self.cache.get(user) is not None)
        self.held = self.engine.held  # batches abstained on, waiting for a calibrator
        self.progress = progress

    # ------------------------------------------------------------------------------------- anchors

    def on_anchors(self, m: Message, anchor_dlq: DeadLetters) -> None:
        """Take a user's new anchor set (or refuse it), then label that user's waiting batches."""
        acc = self.anchor_accounting
        acc.add("in")
        if m.value() is None:  # compaction tombstone: the user's anchors are withdrawn
            key = m.key()
            if key is not None:
                self.cache.drop(key.decode("utf-8", "replace"))
            acc.add("tombstone")
            return
        assert self.io is not None
        try:
            aset = self.io.wire.decode(ANCHORS.name, m.value(), AnchorSet)
        except DecodeError as e:
            anchor_dlq.send(m, e)
            return
        outcome = self.cache.put(aset)
        if outcome == AnchorBook.ACCEPTED:
            acc.add("accepted")
            self.label(self.engine.release(aset.user_id))
        elif outcome == AnchorBook.STALE:
            acc.add("stale")
        else:  # another encoder's space (or unusable vectors): never score against it
            acc.add("anchors_refused")
            why = (f"anchor set v{aset.version} of {aset.user_id}: encoder {aset.encoder!r}, items use "
                   f"{self.cache.encoder!r}" if outcome == "encoder_mismatch" else f"refused: {outcome}")
            anchor_dlq.send(m, ValueError(why), reason=outcome)  # counted dlq:<outcome> there

    # ------------------------------------------------------------------------------------ labeling

    def label(self, batches: list[Batch]) -> None:
        """Label ``batches`` MICRO_BATCH at a time (stage by stage, the same samples as one by one) and
        emit each one's outcome under its own message's DLQ guard."""
        io = self.io
        assert io is not None
        for i in range(0, len(batches), MICRO_BATCH):
            chunk = batches[i:i + MICRO_BATCH]
            for b, got in zip(chunk, label_many([b.batch for b in chunk], self.ctx), strict=True):
                with io.processing(b.source) if b.source is not None else nullcontext():
                    self._emit(b, got)

    def _emit(self, b: Batch, got: tuple[bytes, LabelStats] | Exception) -> None:
        """Produce a labeled batch's samples, or hold it while abstaining, or dead-letter it (a bug's exception)."""
        io = self.io
        assert io is not None
        if isinstance(got, Abstained):  # a passage: held uncommitted until a calibrator loads (or the bound)
            for old in self.engine.abstain(b):
                self._dead_letter(old, got, "abstained")
            return
        if isinstance(got, NoAnchors):  # a held batch whose user's anchors were withdrawn meanwhile
            self._dead_letter(b, got, "no_anchors")
            return
        if isinstance(got, Exception):  # a bug must not stop the stream: the batch goes to the DLQ, counted
            log.error("labeling %s failed", b.batch.request_id, exc_info=got)
            self._dead_letter(b, got, "label_error")
            return
        out, st = got
        io.producer.produce(SAMPLES.name, io.wire.encode_json(SAMPLES.name, out), key=b.user_id.encode(),
                            headers=[PSEUDO_HEADER])
        io.producer.poll(0)
        self._count_labeled(st)
        if self.ctx.calibrator is not None:
            self.recalibrator.remember(b.user_id, list(st.item_ids), np.asarray(st.labels))
        io.ledger.done((UNEXPOSED.name, b.partition), b.offset)

    def _dead_letter(self, b: Batch, err: Exception, reason: str) -> None:
        """``b`` to ``unexposed.dlq`` with its original bytes; its offset is done."""
        assert self.io is not None
        self.io.dlq.send_raw(UNEXPOSED.name, b.partition, b.offset, b.key, b.raw, err, reason=reason)
        self.accounting.add("candidates_dlq", b.candidates)
        self.io.ledger.done((UNEXPOSED.name, b.partition), b.offset)

    def _count_labeled(self, st: LabelStats) -> None:
        acc = self.accounting
        acc.add("labeled")
        acc.add("pseudo", st.labeled)
        acc.add("sampled_out", st.sampled_out)
        acc.add("duplicate", st.duplicate)
        acc.add("no_vector", st.no_vector)
        ANCHOR_AGE.observe(max(0, st.anchor_age_ms) / 1000)
        # event time to emission: meaningful when the batch's ts is recent (live traffic, not replay)
        LATENCY.labels(source="pseudo").observe(max(0.0, time.time() - st.ts / 1000))

    # --------------------------------------------------------------------- calibrator, closed loop

    def calibrator_due(self) -> bool:
        """Abstaining and the calibrator file changed since the last try (one ``stat``): load it again."""
        return self.ctx.label is None and file_signature(self.settings.calibrator_file) != self._cal_seen

    def load_calibrator(self) -> None:
        """Take the calibrator artifact, or abstain (no pseudo-labels, batches held) saying exactly why."""
        if self.cfg.label_source != "calibrator":
            ABSTAINING.set(0)
            return
        s = self.settings
        self._cal_seen = file_signature(s.calibrator_file)
        try:
            cal = load_calibrator(s.calibrator_file, encoder=s.encoder.model, catalogue=self.cfg.catalogue)
            unknown = set(cal.features) - set(FEATURES)
            if unknown:
                raise CalibratorError(f"calibrator {s.calibrator_file} uses features this labeler does not "
                                      f"compute: {sorted(unknown)}")
        except CalibratorError as e:
            if self.ctx.abstain_reason != str(e):
                log.error("labeler abstains (no pseudo-labels until this is fixed): %s",
                          missing_calibrator_hint(s) if self._cal_seen is None else e)
            self.ctx.use(None, str(e))
            ABSTAINING.set(1)
            return
        log.info("labeler: %s", cal.describe())
        self.ctx.use(cal)
        ABSTAINING.set(0)
        held = self.engine.relabel()
        if held:
            log.info("labeler: relabelling the %d batches held while it abstained", len(held))
        self.label(held)

    def on_samples(self, m: Message) -> None:
        """Real labels: count exposures and clicks (the calibrator's priors), join earlier pseudo-labels."""
        assert self.io is not None
        if PSEUDO_HEADER in (m.headers() or ()):  # our own pseudo-labels: nothing real to count
            self.accounting.add("own_pseudo_skipped")
            self.io.done(m)
            return
        try:
            batch = orjson.loads(self.io.wire.payload(SAMPLES.name, m.value()) or b"{}")
            real = [x for x in batch["samples"] if x["source"] != "pseudo"]
            user = str(batch["user_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, DecodeError):
            self.accounting.add("samples_unreadable")  # the trainer dead-letters it; here it only counts
            self.io.done(m)
            return
        if real:
            self._join_real(user, real)
        self.io.done(m)

    def _join_real(self, user: str, real: list[dict[str, Any]]) -> None:
        ids = np.asarray([int(x["item_id"]) for x in real], np.int64)
        labels = np.asarray([float(x["label"]) for x in real], np.float64)
        rows, missing = self.items.lookup(ids)
        self.ctx.stats.add_exposed(user, rows[~missing], labels[~missing])
        self.accounting.add("real_labels_seen", len(real))
        self.accounting.add("closed_loop_joins", self.recalibrator.observe(user, ids.tolist(), labels.tolist()))
        cal = self.ctx.calibrator
        if cal is not None and self.recalibrator.due():
            fresh = self.recalibrator.refit(cal)
            CALIBRATION_DRIFT.set(1 if self.recalibrator.drifting else 0)
            self.accounting.add("closed_loop_drift" if self.recalibrator.drifting else "closed_loop_calibrated")
            if fresh is not cal:
                log.info("labeler: calibrator %s refitted from %d closed-loop joins -> %s", cal.version,
                         fresh.info.get("refit_joins", 0), fresh.version)
                self.ctx.use(fresh)
                self.accounting.add("recalibrated")

    # ----------------------------------------------------------------------------------- reporting

    @property
    def deferred(self) -> int:
        """Batches waiting for anchors right now."""
        return self.engine.deferred

    def balance(self) -> dict[str, int]:
        """What the accounting identities leave over (all zero when every count is somewhere)."""
        a = self.accounting.snapshot()
        dlq = sum(v for k, v in a.items() if k.startswith("dlq:"))
        ends = ("labeled", "timed_out", "deferred_at_stop", "abstained_at_stop", "released")
        batches = a.get("in", 0) - dlq - sum(a.get(k, 0) for k in ends) - self.engine.waiting
        cand_out = ("pseudo", "sampled_out", "duplicate", "no_vector", "candidates_timed_out", "candidates_dlq",
                    "candidates_deferred_at_stop", "candidates_abstained_at_stop", "candidates_released")
        candidates = a.get("candidates", 0) - sum(a.get(k, 0) for k in cand_out) - self.engine.waiting_candidates
        b = self.anchor_accounting.snapshot()
        anchor_dlq = sum(v for k, v in b.items() if k.startswith("dlq:"))
        anchors = b.get("in", 0) - (b.get("accepted", 0) + b.get("stale", 0) + b.get("tombstone", 0) + anchor_dlq)
        return {"batches": batches, "candidates": candidates, "anchors": anchors}
