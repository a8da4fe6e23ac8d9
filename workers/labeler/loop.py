"""Labeler: ``unexposed`` + ``anchors`` → match in the frozen space → ``samples`` (pseudo-labels).

The Kafka loop, and only that: poll, hand each message to the engine (workers/labeler/engine.py: defer,
hold, micro-batch, time out) and perform what it decides on the stage (workers/labeler/stage.py: label,
produce, dead-letter), then flush and commit. One consumer subscribes to both topics (co-partitioned by
user, range assignment, so a user's batches and anchors come to the same member); the item matrix is
loaded from the vector index once at start.

Bounded memory: at most ``labeler.max_deferred`` batches wait for anchors. A batch that would exceed the
bound is not taken: its partition is paused and rewound to it (``seek``), and resumed when the queue has
room (timeouts and arriving anchors drain it). Batches of other partitions keep flowing.

Offsets: ``unexposed`` commits stop at the oldest batch still deferred (or held) on each partition, so a
crash re-reads that work (sample ids are deterministic, the trainer drops repeats). ``anchors`` is a
compacted table, not a queue: it is read from the beginning on every assignment and never committed,
so a restarted labeler rebuilds its cache. The accounting identities: workers/labeler/stage.py.
"""

from __future__ import annotations

import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from tqdm import tqdm

from runtime.kafka import DeadLetters
from runtime.stage_io import StageIO
from runtime.stage_port import StagePort
from schemas.codec import DecodeError
from schemas.fast_codec import decode_unexposed
from schemas.topics import ANCHORS, SAMPLES, UNEXPOSED
from workers.labeler.engine import Batch
from workers.labeler.metrics import DEFERRED
from workers.labeler.stage import STAGE, LabelerStage, log

__all__ = ["STAGE", "Labeler"]


class Labeler(LabelerStage):
    """One consumer-group member of the labeler; several may run (both topics are keyed by user)."""

    _stopping = False

    def run(self, stop: threading.Event, *, batch: int = 256, io: StagePort | None = None) -> None:
        """Label until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        if io is None:
            io = StageIO(self.settings.kafka, STAGE, self.accounting,
                         consumer_config={"partition.assignment.strategy": "range"},
                         registry=self.settings.schema_registry, transactional=self.settings.kafka.transactional)
        self.io = io
        anchor_dlq = DeadLetters(io.producer, STAGE, self.anchor_accounting, io.wire)
        log.info("labeler: %d item vectors loaded from %s", self.items.load(), self.items.collection)
        self.load_calibrator()
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
                            self.label(self.engine.drain())  # anchors and real labels change what they get
                        with io.processing(m):  # a failure of one message's step: its DLQ, and go on
                            if m.topic() == ANCHORS.name:
                                self.on_anchors(m, anchor_dlq)
                            elif m.topic() == SAMPLES.name:
                                self.on_samples(m)
                            elif (part := m.partition() or 0) not in rewound and not self._on_unexposed(m):
                                self._pause_at(m)  # deferred queue full: re-read it later
                                rewound.add(part)
                        self.label(self.engine.full_batch())
                    self.label(self.engine.drain())
                    self._expire()
                    if self.calibrator_due():
                        self.load_calibrator()  # just written (`gpl calibrate`)? then relabel
                    if io.paused and self.engine.has_room():
                        log.info("deferred queue has room (%d): partitions %s resumed", self.engine.deferred,
                                 sorted(p for _, p in io.paused))
                        io.resume()
                    DEFERRED.set(self.engine.deferred)
                    if not io.commit(stop, what="samples"):
                        break
                    bar.update(len(msgs))
            finally:
                bar.close()
                # before close: close() revokes the partitions, and what still waits is counted here, once
                self._stopping = True
                io.commit()
                self._gave_back("at stop", self.engine.stop())
                self.io = None

    def _on_unexposed(self, m: Message) -> bool:
        """Decode one batch (bad → ``unexposed.dlq``) for the engine; False when the deferred queue is full."""
        assert self.io is not None
        try:
            b = decode_unexposed(self.io.wire.payload(UNEXPOSED.name, m.value()))  # either wire format
        except DecodeError as e:
            self.accounting.add("in")
            self.io.dead_letter(m, e)
            return True
        taken = self.engine.take(Batch(b, m.key(), m.value() or b"", m.partition() or 0, m.offset() or 0, m))
        DEFERRED.set(self.engine.deferred)
        return taken

    def _expire(self) -> None:
        """Deferred batches past their wait: timed out, their offsets done."""
        assert self.io is not None
        for b in self.engine.expire(time.monotonic()):
            log.info("batch %s of %s timed out waiting for anchors", b.batch.request_id, b.user_id)
            self.io.ledger.done((UNEXPOSED.name, b.partition), b.offset)

    def _pause_at(self, m: Message) -> None:
        """Stop fetching the message's partition and rewind it to the batch that did not fit."""
        assert self.io is not None
        if (UNEXPOSED.name, m.partition() or 0) not in self.io.paused:
            log.info("deferred queue full (%d): partition %d paused at offset %d", self.engine.deferred,
                     m.partition() or 0, m.offset() or 0)
        self.io.rewind(m)

    def _gave_back(self, outcome: str, n: int) -> None:
        """Say so when waiting work is left uncommitted (at stop, on a revoke): the next reader re-reads it."""
        if n:
            log.info("%s: %d batches still waiting (for anchors or a calibrator) are left uncommitted (re-read "
                     "later)", outcome, n)
        DEFERRED.set(self.engine.deferred)

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
        self._gave_back("released", self.engine.let_go(lost))  # StageIO then forgets their ledger
