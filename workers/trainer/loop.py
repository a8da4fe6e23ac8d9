"""Trainer: ``samples`` → incremental pre-ranker → versioned checkpoints, the Kafka loop.

Reads top to bottom: poll SampleBatches, dead-letter the bad ones, hand each batch to the engine (dedup by
a set of 64-bit hashes of sample ids, the bounded wait for an item's vector, holdout or train:
workers/trainer/engine.py), train in mini-batches on the GPL objective (workers/trainer/stage.py), and
every ``checkpoint_every`` samples, every ``checkpoint_every_s`` seconds (when anything changed), on a
partition revoke and on a clean stop: train what is buffered, write a numbered checkpoint atomically, and
only then commit the Kafka offsets. This module only performs what reaches the broker: the poll, the dead
letters, the commit, the rebalance.

The checkpoint is the source of truth, not the committed offsets: on start the trainer loads it and, when
the group assigns it partitions, seeks to its offsets (workers/trainer/offsets.py). Samples still waiting
for a vector are part of the checkpoint too, so its offsets may pass them. So a crash between checkpoint and
commit re-reads nothing the checkpoint covers, and a crash after training but before the checkpoint re-reads
(and trains, and counts) those samples exactly once more: model, seen-set, counts and offsets roll back
together. History (the users' recent clicks), the anchor cross feature and the publishing gate on held-out
real labels: workers/trainer/stage.py. One trainer per consumer group: it trains one model, so it must see
every partition.
"""

from __future__ import annotations

import threading
from typing import Any

from confluent_kafka import TopicPartition
from tqdm import tqdm

from runtime.offsets import TP
from runtime.stage_io import StageIO, tp_of
from runtime.stage_port import StagePort
from schemas.codec import DecodeError, decode
from schemas.events import SampleBatch
from schemas.topics import SAMPLES
from workers.trainer.engine import COUNT_KEYS, VECTOR_RETRY_S, NoVector
from workers.trainer.offsets import commit_durable, reset_past_end, start_at_checkpoint
from workers.trainer.stage import STAGE, TrainerStage, log, no_vector_error

__all__ = ["COUNT_KEYS", "STAGE", "VECTOR_RETRY_S", "Trainer"]


class Trainer(TrainerStage):
    """Consume ``samples``, train the pre-ranker incrementally, checkpoint, then commit (the state, the
    counts and the checkpoint: :class:`~workers.trainer.stage.TrainerStage`)."""

    io: StagePort | None = None  # the Kafka side (or its in-memory twin), while run() runs
    _closing = False

    def run(self, stop: threading.Event, *, poll: int = 256, io: StagePort | None = None) -> None:
        """Train until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        if io is None:
            # a transaction stays open from one checkpoint to the next (its dead letters): give it their interval
            tx_timeout = {"transaction.timeout.ms": min(900_000, max(60_000, int(3_000 * self.cfg.checkpoint_every_s)))}
            io = StageIO(self.settings.kafka, self.name, self.accounting, registry=self.settings.schema_registry,
                         transactional=self.settings.kafka.transactional,
                         producer_config=tx_timeout if self.settings.kafka.transactional else None)
        self.io = io
        self._closing = False
        io.subscribe([SAMPLES.name], on_assign=self._on_assign, on_revoke=self._on_revoke)
        bar = tqdm(desc="train samples", unit="sample", disable=not self.progress, leave=False)
        try:
            while not stop.is_set():
                msgs = io.poll(poll, 0.5)
                parsed: list[SampleBatch | DecodeError] = []
                for m in msgs:
                    try:
                        parsed.append(io.wire.decode(m.topic() or SAMPLES.name, m.value(), SampleBatch))
                    except DecodeError as e:
                        parsed.append(e)
                # one index round trip per poll, then message by message so a checkpoint can fall
                # between any two messages and cover exactly the ones before it
                self._fetch_vectors(self.engine.wanted(b for b in parsed if isinstance(b, SampleBatch)))
                self._release()
                for m, b in zip(msgs, parsed, strict=True):
                    self.engine.message(bad=isinstance(b, DecodeError))
                    if isinstance(b, DecodeError):
                        io.dead_letter(m, b)
                    else:
                        with io.processing(m):  # a failure of one batch's step: its DLQ, and go on
                            bar.update(self._admit(b, (*tp_of(m), m.offset() or 0)))
                            io.done(m)
                    tp = tp_of(m)
                    self.engine.consumed(tp, io.ledger.position(tp))
                    while self.engine.step_due():
                        self._train(self.cfg.batch_size)
                    if self.engine.checkpoint_due():
                        self.checkpoint()
                if self.engine.checkpoint_due(timed=True):
                    self.checkpoint()
            self.checkpoint()  # clean stop: nothing trained is left behind
        finally:
            self._closing = True  # close() revokes: no checkpoint from a failed or finished loop
            bar.close()
            io.close()
            self.io = None

    def _on_assign(self, c: Any, partitions: list[TopicPartition]) -> None:
        """Start every partition the checkpoint knows at the checkpoint's offset, not the committed one;
        one past its end at its beginning (workers/trainer/offsets.py)."""
        start_at_checkpoint(partitions, self.engine.durable_offsets)
        for t, p, start, low in reset_past_end(c, partitions, self.name):
            self.offset_resets.append((t, p, start, low))
            self.engine.durable_offsets[(t, p)] = self.engine.offsets[(t, p)] = low
        c.assign(partitions)
        log.info("trainer: assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def _on_revoke(self, c: Any, partitions: list[TopicPartition]) -> None:
        """Make everything read so far durable before another member may read those partitions."""
        if self._dirty and not self._closing:
            self.checkpoint()

    # what reaches the broker -------------------------------------------------------------------

    def _dead_letter(self, d: NoVector) -> None:
        """A sample's wait ended in vain: to ``samples.dlq`` (reason ``no_vector``) with its one-sample batch."""
        if self.io is None:  # outside run(): nowhere to send it, but still counted and logged
            return super()._dead_letter(d)
        w = d.waiting
        self.io.dlq.send_raw(w.topic, w.partition, w.offset, decode(w.value, SampleBatch).user_id.encode(), w.value,
                             no_vector_error(self.collection, d), "no_vector")

    def _flush(self) -> None:
        if self.io is not None:  # dead letters the offsets cover must be durable first
            self.io.producer.flush(30)

    def _commit(self, durable: dict[TP, int]) -> None:
        """Commit the checkpoint's offsets of the partitions held; a lost commit costs nothing. Transactional
        (``kafka.transactional``): with the dead letters sent since the last one, in one transaction."""
        if self.io is not None and self.settings.kafka.transactional:
            held = {(tp.topic, tp.partition) for tp in self.io.consumer.assignment()}
            self.io.commit(offsets={tp: o for tp, o in durable.items() if tp in held})
            return
        commit_durable(self.io.consumer if self.io is not None else None, durable, self.version)
