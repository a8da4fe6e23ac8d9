"""Labeler: ``unexposed`` + ``anchors`` → match in the frozen space → ``samples`` (pseudo-labels).

Reads top to bottom: one consumer subscribes to both topics (co-partitioned by user, range
assignment, so a user's batches and anchors come to the same member); the item matrix is loaded from
the vector index once at start. Then, per polled batch of messages:

* an ``anchors`` message updates the user's anchor set in the cache (bad → ``anchors.dlq``; a set
  from another encoder → ``anchors.dlq`` with reason ``encoder_mismatch``, counted
  ``anchors_refused``) and releases that user's deferred batches, which are labeled at once;
* an ``unexposed`` message is decoded (bad → ``unexposed.dlq``) and labeled (workers/labeler/assemble.py:
  score, pseudo-label, weigh, sample, one SampleBatch to ``samples`` keyed by user) when its user has
  anchors; otherwise it is *deferred*: it waits at most ``labeler.wait_for_anchors_s`` for them and is
  then dropped and counted ``timed_out``;
* without a usable calibrator the labeler abstains: a batch is *held*, uncommitted, and relabelled when
  one loads (at most ``labeler.keep_abstained``; the oldest past it goes to ``unexposed.dlq``, reason
  ``abstained``): workers/labeler/abstention.py. The gauge ``gpl_labeler_abstaining`` is 1 meanwhile;
* expired deferrals are dropped, paused partitions resumed once the deferred queue has room, the
  producer flushed, and only then offsets committed.

Bounded memory: at most ``labeler.max_deferred`` batches wait. A batch that would exceed the bound is
not taken: its partition is paused and rewound to it (``seek``), and resumed when the queue has room
(timeouts and arriving anchors drain it). Batches of other partitions keep flowing.

Offsets: ``unexposed`` commits stop at the oldest batch still deferred (or held) on each partition, so a
crash re-reads that work (sample ids are deterministic, the trainer drops repeats). ``anchors`` is a
compacted table, not a queue: it is read from the beginning on every assignment and never committed,
so a restarted labeler rebuilds its cache.

Accounting. ``accounting`` counts unexposed batches and their candidates; for batches
``in = labeled + timed_out + dlq:<reason> + deferred and held (still waiting) + deferred_at_stop +
abstained_at_stop + released`` (``released``: deferred or held batches handed back on a rebalance; the
new owner re-reads them). For candidates of decoded batches ``candidates = pseudo + sampled_out +
duplicate + no_vector + candidates_timed_out + candidates_dlq + candidates_deferred_at_stop +
candidates_abstained_at_stop + candidates_released + (waiting)``. :meth:`Labeler.balance` checks both.
``anchor_accounting`` counts anchor sets: ``in = accepted + stale + tombstone + dlq:<reason>``;
``anchors_refused`` counts the refusals among the dead letters (``dlq:encoder_mismatch``,
``dlq:dim_mismatch``, ``dlq:bad_vectors``). Passages, not outcomes: ``deferred`` (batches that had to
wait), ``abstained`` (batches held for a calibrator; then ``relabelled``, or dead-lettered past the
bound) and ``paused`` (times a partition was paused).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from tqdm import tqdm

from gpl.runtime.kafka import Accounting, DeadLetters
from gpl.runtime.metrics import ABSTAINING, ANCHOR_AGE, CALIBRATION_DRIFT, DEFERRED, LATENCY
from gpl.runtime.settings import Settings
from gpl.runtime.stage_io import StageIO
from gpl.runtime.stage_port import StagePort
from gpl.runtime.vectors.index import VectorIndex
from schemas.codec import DecodeError
from schemas.events import AnchorSet
from schemas.fast_codec import Unexposed, decode_unexposed
from schemas.topics import ANCHORS, PSEUDO_HEADER, SAMPLES, UNEXPOSED
from workers.labeler.abstention import AbstainedHold, Held, file_signature, missing_calibrator_hint
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.assemble import MICRO_BATCH, Abstained, Labeling, LabelStats, NoAnchors, label_many
from workers.labeler.calibrator import CalibratorError, load_calibrator
from workers.labeler.features import FEATURES
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.recalibration import Recalibrator

log = logging.getLogger("workers.labeler")  # the stage's name, as before the package (log filters, tests)
STAGE = "labeler"
_DROPPED = Unexposed("", "", 0, np.zeros(0, np.int64))  # the payload of a batch that stopped waiting


@dataclass
class Deferred:
    """A decoded batch waiting for its user's anchors (raw bytes kept for a dead letter).

    When it stops waiting (``done``), the payload is dropped: the entry may linger, payload-free, in the
    partition and deadline queues (they are cleared from the head) behind an older batch still waiting.
    """

    batch: Unexposed
    key: bytes | None
    raw: bytes
    partition: int
    offset: int
    deadline: float  # time.monotonic()
    user_id: str = ""
    candidates: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        self.user_id = self.batch.user_id
        self.candidates = int(self.batch.item_ids.shape[0])


class Labeler:
    """One consumer-group member of the labeler; several may run (both topics are keyed by user)."""

    def __init__(self, settings: Settings, index: VectorIndex, *, progress: bool = False) -> None:
        self.settings = settings
        self.cfg = settings.labeler
        self.items = ItemMatrix(index, settings.encoder.collection, settings.encoder.model,
                                retry_s=self.cfg.item_retry_s, dtype=self.cfg.matrix_dtype)
        self.cache = AnchorBook(settings.encoder.model, self.items)
        self.ctx = Labeling(self.cache, self.items, self.cfg, settings.encoder.collection)
        self.recalibrator = Recalibrator(self.cfg.recalibrate_every, self.cfg.ece_alert)
        self._cal_seen: tuple[int, int] | None = None  # the calibrator file as last loaded (stat)
        self.held = AbstainedHold(self.cfg.keep_abstained)  # batches abstained on (workers/labeler/abstention.py)
        self.accounting = Accounting(STAGE)
        self.anchor_accounting = Accounting(f"{STAGE}-anchors")
        self.progress = progress
        # deferred batches, three views of the same entries (removal is lazy: ``done``)
        self._by_user: dict[str, deque[Deferred]] = {}  # released when the user's anchors arrive
        self._by_deadline: deque[Deferred] = deque()  # arrival order = deadline order: expiry
        self._deferred = 0
        self._deferred_candidates = 0
        self._stopping = False
        self.io: StagePort | None = None  # the Kafka side (or its in-memory twin), while run() runs
        # consecutive unexposed batches whose users have anchors, labeled together (label_many) before any
        # other message is handled, at MICRO_BATCH of them, and at the end of every polled batch
        self._pending: list[tuple[Message, Unexposed]] = []

    # ------------------------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, *, batch: int = 256, io: StagePort | None = None) -> None:
        """Label until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        if io is None:
            io = StageIO(self.settings.kafka, STAGE, self.accounting,
                         consumer_config={"partition.assignment.strategy": "range"},
                         registry=self.settings.schema_registry, transactional=self.settings.kafka.transactional)
        self.io = io
        anchor_dlq = DeadLetters(io.producer, STAGE, self.anchor_accounting, io.wire)
        loaded = self.items.load()
        log.info("labeler: %d item vectors loaded from %s", loaded, self.items.collection)
        self._load_calibrator()
        # anchors is state, read whole on every assignment and never committed; samples bring the real
        # labels the calibrator's priors count and the closed loop joins
        io.subscribe([UNEXPOSED.name, ANCHORS.name, SAMPLES.name], tracked=[UNEXPOSED.name, SAMPLES.name],
                     on_assign=self._on_assign, on_revoke=self._on_revoke)
        bar = tqdm(desc="label requests", unit="req", disable=not self.progress, leave=False)
        with io:
            try:
                while not stop.is_set():
                    msgs = io.poll(batch, 0.2)
                    rewound: set[int] = set()  # partitions paused mid-batch: skip the rest of their messages
                    for m in msgs:
                        if m.topic() != UNEXPOSED.name:
                            self._flush()  # anchors and real labels change what the pending batches would get
                        with io.processing(m):  # a failure of one message's step: its DLQ, and go on
                            if m.topic() == ANCHORS.name:
                                self._on_anchors(m, anchor_dlq)
                            elif m.topic() == SAMPLES.name:
                                self._on_samples(m)
                            elif (part := m.partition() or 0) not in rewound and not self._on_unexposed(m):
                                self._pause_at(m)  # deferred queue full: re-read it later
                                rewound.add(part)
                        if len(self._pending) >= MICRO_BATCH:
                            self._flush()
                    self._flush()
                    self._expire(time.monotonic())
                    if self.ctx.label is None and file_signature(self.settings.calibrator_file) != self._cal_seen:
                        self._load_calibrator()  # just written (`gpl calibrate`)? then relabel
                    self._resume_if_room()
                    DEFERRED.set(self._deferred)
                    if not io.commit(stop, what="samples"):
                        break
                    bar.update(len(msgs))
            finally:
                bar.close()
                # before close: close() revokes the partitions, and what still waits is counted here, once
                self._stopping = True
                io.commit()
                self._drop_all("deferred_at_stop")
                self._count_held(self.held.take(), "abstained_at_stop")
                self.io = None

    # ------------------------------------------------------------------------------------- anchors

    def _on_anchors(self, m: Message, anchor_dlq: DeadLetters) -> None:
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
            self._release(aset.user_id)
        elif outcome == AnchorBook.STALE:
            acc.add("stale")
        else:  # another encoder's space (or unusable vectors): never score against it
            acc.add("anchors_refused")
            why = (f"anchor set v{aset.version} of {aset.user_id}: encoder {aset.encoder!r}, items use "
                   f"{self.cache.encoder!r}" if outcome == "encoder_mismatch" else f"refused: {outcome}")
            anchor_dlq.send(m, ValueError(why), reason=outcome)  # counted dlq:<outcome> there

    def _release(self, user_id: str) -> None:
        waiting = self._by_user.pop(user_id, None)
        for d in waiting or ():
            if not d.done:
                batch, raw = d.batch, d.raw
                self._undefer(d)
                self._label(batch, d.key, raw, d.partition, d.offset)

    # ----------------------------------------------------------------------------------- unexposed

    def _on_unexposed(self, m: Message) -> bool:
        """Handle one batch; False (nothing done, not counted) when it must wait but the queue is full."""
        assert self.io is not None
        part, off, raw = m.partition() or 0, m.offset() or 0, m.value()
        try:
            b = decode_unexposed(self.io.wire.payload(UNEXPOSED.name, raw))  # either wire format
        except DecodeError as e:
            self.accounting.add("in")
            self.io.dead_letter(m, e)
            return True
        if self.cache.get(b.user_id) is None:
            if self._deferred >= self.cfg.max_deferred:
                return False
            self._count_in(b)
            self._defer(Deferred(b, m.key(), raw or b"", part, off,
                                 time.monotonic() + self.cfg.wait_for_anchors_s))
        else:
            self._count_in(b)
            self._pending.append((m, b))  # labeled by the next _flush, before any other message
        return True

    def _flush(self) -> None:
        """Label the pending batches together (stage by stage, the same samples as one by one) and emit
        each one's outcome under its own message's DLQ guard."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        assert self.io is not None
        for (m, b), got in zip(pending, label_many([b for _, b in pending], self.ctx), strict=True):
            with self.io.processing(m):
                self._emit(b, m.key(), m.value() or b"", m.partition() or 0, m.offset() or 0, got)

    def _count_in(self, b: Unexposed) -> None:
        self.accounting.add("in")
        self.accounting.add("candidates", int(b.item_ids.shape[0]))

    def _label(self, b: Unexposed, key: bytes | None, raw: bytes, part: int, off: int) -> None:
        self._emit(b, key, raw, part, off, label_many([b], self.ctx)[0])

    def _emit(self, b: Unexposed, key: bytes | None, raw: bytes, part: int, off: int,
              got: tuple[bytes, LabelStats] | Exception) -> None:
        """Produce a labeled batch's samples, or hold it while abstaining, or dead-letter it (a bug's exception)."""
        io = self.io
        assert io is not None
        if isinstance(got, Abstained):  # a passage: held uncommitted until a calibrator loads (or the bound)
            self.accounting.add("abstained")
            self.accounting.add("candidates_abstained", int(b.item_ids.shape[0]))
            for old in self.held.hold(Held(b, key, raw, part, off)):
                io.dlq.send_raw(UNEXPOSED.name, old.partition, old.offset, old.key, old.raw, got, reason="abstained")
                self.accounting.add("candidates_dlq", old.candidates)
                io.ledger.done((UNEXPOSED.name, old.partition), old.offset)
            return
        if isinstance(got, NoAnchors):  # a held batch whose user's anchors were withdrawn meanwhile
            io.dlq.send_raw(UNEXPOSED.name, part, off, key, raw, got, reason="no_anchors")
            self.accounting.add("candidates_dlq", int(b.item_ids.shape[0]))
        elif isinstance(got, Exception):  # a bug must not stop the stream: the batch goes to the DLQ, counted
            log.error("labeling %s failed", b.request_id, exc_info=got)
            io.dlq.send_raw(UNEXPOSED.name, part, off, key, raw, got, reason="label_error")
            self.accounting.add("candidates_dlq", int(b.item_ids.shape[0]))
        else:
            out, st = got
            io.producer.produce(SAMPLES.name, io.wire.encode_json(SAMPLES.name, out), key=b.user_id.encode(),
                                headers=[PSEUDO_HEADER])
            io.producer.poll(0)
            self._count_labeled(st)
            if self.ctx.calibrator is not None:
                self.recalibrator.remember(b.user_id, list(st.item_ids), np.asarray(st.labels))
        io.ledger.done((UNEXPOSED.name, part), off)

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

    def _load_calibrator(self) -> None:
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
        self._relabel()

    def _relabel(self) -> None:
        """Label the batches held while abstaining, oldest first, micro-batch by micro-batch."""
        held = self.held.take()
        if held:
            log.info("labeler: relabelling the %d batches held while it abstained", len(held))
        for i in range(0, len(held), MICRO_BATCH):
            chunk = held[i:i + MICRO_BATCH]
            for h, got in zip(chunk, label_many([h.batch for h in chunk], self.ctx), strict=True):
                self.accounting.add("relabelled")
                self._emit(h.batch, h.key, h.raw, h.partition, h.offset, got)

    def _count_held(self, held: list[Held], outcome: str) -> None:
        """Held batches given up uncommitted (at stop, on a rebalance): the next reader re-reads them."""
        self.accounting.add(outcome, len(held))
        self.accounting.add(f"candidates_{outcome}", sum(h.candidates for h in held))

    def _on_samples(self, m: Message) -> None:
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
        self.io.done(m)

    # ------------------------------------------------------------------------------------ deferral

    def _defer(self, d: Deferred) -> None:
        self._by_user.setdefault(d.user_id, deque()).append(d)
        self._by_deadline.append(d)
        self._deferred += 1
        self._deferred_candidates += d.candidates
        self.accounting.add("deferred")  # a passage, not an end: every deferral ends in another outcome
        DEFERRED.set(self._deferred)

    def _undefer(self, d: Deferred) -> None:
        d.done = True
        d.batch, d.raw = _DROPPED, b""
        self._deferred -= 1
        self._deferred_candidates -= d.candidates

    def _expire(self, now: float) -> None:
        """Drop deferred batches past their deadline, oldest first, counting them and their candidates."""
        q = self._by_deadline
        while q and (q[0].done or q[0].deadline <= now):
            d = q.popleft()
            if d.done:
                continue
            log.info("batch %s of %s timed out waiting for anchors", d.batch.request_id, d.user_id)
            self._undefer(d)
            self.accounting.add("timed_out")
            self.accounting.add("candidates_timed_out", d.candidates)
            if self.io is not None:
                self.io.ledger.done((UNEXPOSED.name, d.partition), d.offset)
            waiting = self._by_user.get(d.user_id)
            while waiting and waiting[0].done:  # per-user order is deadline order too
                waiting.popleft()
            if waiting is not None and not waiting:
                del self._by_user[d.user_id]

    def _drop_all(self, outcome: str, partitions: set[int] | None = None) -> None:
        """Give up on deferred batches (all, or those of ``partitions``): counted, not committed past."""
        if self._deferred:
            log.info("%s: %d batches still waiting for anchors are left uncommitted (re-read later)",
                     outcome, self._deferred if partitions is None else
                     sum(1 for d in self._by_deadline if not d.done and d.partition in partitions))
        for d in self._by_deadline:
            if not d.done and (partitions is None or d.partition in partitions):
                self._undefer(d)
                self.accounting.add(outcome)
                self.accounting.add(f"candidates_{outcome}", d.candidates)
        self._by_deadline = deque(d for d in self._by_deadline if not d.done)
        by_user = ((u, deque(d for d in q if not d.done)) for u, q in self._by_user.items())
        self._by_user = {u: q for u, q in by_user if q}
        DEFERRED.set(self._deferred)

    # ------------------------------------------------------------------------------- backpressure

    def _pause_at(self, m: Message) -> None:
        """Stop fetching the message's partition and rewind it to the batch that did not fit."""
        assert self.io is not None
        part = m.partition() or 0
        if (UNEXPOSED.name, part) not in self.io.paused:
            log.info("deferred queue full (%d): partition %d paused at offset %d", self._deferred, part,
                     m.offset() or 0)
        self.io.rewind(m)
        self.accounting.add("paused")

    def _resume_if_room(self) -> None:
        assert self.io is not None
        if self.io.paused and self._deferred < self.cfg.max_deferred:
            log.info("deferred queue has room (%d): partitions %s resumed", self._deferred,
                     sorted(p for _, p in self.io.paused))
            self.io.resume()

    # ---------------------------------------------------------------------------------- rebalance

    def _on_assign(self, c: Consumer, partitions: list[TopicPartition]) -> None:
        """``anchors`` is state: read it whole on every assignment (its offsets are never committed)."""
        for tp in partitions:
            if tp.topic == ANCHORS.name:
                tp.offset = OFFSET_BEGINNING
        c.assign(partitions)

    def _on_revoke(self, c: Consumer, partitions: list[TopicPartition]) -> None:
        """Hand partitions back: commit what is done, forget what waits (the next owner re-reads it)."""
        if self._stopping or self.io is None:
            return
        lost = {tp.partition for tp in partitions if tp.topic == UNEXPOSED.name}
        if not lost:
            return
        self.io.commit(offsets=self.io.ledger.committable({(UNEXPOSED.name, part) for part in lost}))
        self._drop_all("released", lost)  # StageIO forgets the partitions' ledger entries after this
        self._count_held(self.held.take(lost), "released")

    # ----------------------------------------------------------------------------------- reporting

    @property
    def deferred(self) -> int:
        """Batches waiting for anchors right now."""
        return self._deferred

    def balance(self) -> dict[str, int]:
        """What the accounting identities leave over (all zero when every count is somewhere)."""
        a = self.accounting.snapshot()
        dlq = sum(v for k, v in a.items() if k.startswith("dlq:"))
        batches = a.get("in", 0) - (a.get("labeled", 0) + a.get("timed_out", 0) + dlq + self._deferred + len(self.held)
                                    + a.get("deferred_at_stop", 0) + a.get("abstained_at_stop", 0)
                                    + a.get("released", 0))
        cand_out = ("pseudo", "sampled_out", "duplicate", "no_vector", "candidates_timed_out", "candidates_dlq",
                    "candidates_deferred_at_stop", "candidates_abstained_at_stop", "candidates_released")
        candidates = (a.get("candidates", 0) - sum(a.get(k, 0) for k in cand_out) - self._deferred_candidates
                      - self.held.candidates)
        b = self.anchor_accounting.snapshot()
        anchor_dlq = sum(v for k, v in b.items() if k.startswith("dlq:"))
        anchors = b.get("in", 0) - (b.get("accepted", 0) + b.get("stale", 0) + b.get("tombstone", 0)
                                    + anchor_dlq)
        return {"batches": batches, "candidates": candidates, "anchors": anchors}
