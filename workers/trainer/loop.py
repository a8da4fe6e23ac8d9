"""Trainer: ``samples`` → incremental pre-ranker → versioned checkpoints.

Reads top to bottom: poll SampleBatches, dead-letter the bad ones, drop samples already seen (a set of
64-bit hashes of sample ids), look up each item's frozen content vector (cached; a sample whose item is not in the
index yet waits for it, bounded, and is dead-lettered as ``no_vector`` past the bound:
workers/trainer/vector_wait.py), and train in mini-batches on the GPL objective. Every ``checkpoint_every``
samples, every ``checkpoint_every_s`` seconds (when anything changed), on a partition revoke and on a
clean stop: train what is buffered, write a numbered checkpoint atomically, and only then commit the
Kafka offsets.

The checkpoint is the source of truth, not the committed offsets: it holds the model, the optimizer,
the seen-set, the counts *and* the next offset of every partition, written in one atomic file. On start
the trainer loads it and, when the group assigns it partitions, seeks to those offsets. Samples still
waiting for a vector are part of the checkpoint too, so its offsets may pass them: a restart resumes
their wait instead of re-reading their messages. So a crash
between checkpoint and commit re-reads nothing the checkpoint covers, and a crash after training but
before the checkpoint re-reads (and trains, and counts) those samples exactly once more, because the
model, seen-set and counts roll back together with the offsets.

History (``trainer.history_items`` > 0, or a checkpoint of such a model): the pre-ranker also reads the
user's recent clicks. The trainer keeps them (:class:`~workers.click_memory.ClickMemory`, saved in every
checkpoint) from the real labels it reads, and gives each batch the history its request had: the clicks
strictly before the batch's ``ts``. The anchor cross feature (``trainer.anchor_cross``): as a pseudo sample
carries it, else from the user's set in the anchors collection (workers/trainer/rows.py AnchorInput).

Serving: a deterministic share of real-label samples is held out, never trained, and after every
checkpoint a quality gate scores the checkpoint and the published model on it; only a checkpoint that
passes is published for serving (``workers/trainer/publish.py``).

One trainer per consumer group: it trains one model, so it must see every partition.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import TopicPartition
from tqdm import tqdm

from gpl.runtime.kafka import Accounting
from gpl.runtime.metrics import CHECKPOINT_TIME, CHECKPOINT_VERSION, TRAINER_LOSS
from gpl.runtime.settings import Settings
from gpl.runtime.stage_io import StageIO, tp_of
from gpl.runtime.stage_port import StagePort
from gpl.runtime.vectors.index import VectorIndex
from schemas.codec import DecodeError, decode
from schemas.events import Sample, SampleBatch
from schemas.ids import sample_id
from schemas.topics import SAMPLES
from workers.click_memory import ClickMemory
from workers.model import ModelConfig, PreRanker, RankTerm, sample_key
from workers.trainer.checkpoints import latest_checkpoint, read_checkpoint, save_checkpoint
from workers.trainer.offsets import commit_durable, reset_past_end, start_at_checkpoint
from workers.trainer.publish import Holdout, Publisher, is_holdout
from workers.trainer.rows import AnchorInput, Pending, pending, step
from workers.trainer.state import build, restore_memory, restore_model
from workers.trainer.state import payload as checkpoint_payload
from workers.trainer.vector_wait import VECTOR_WAIT_MAX, VECTOR_WAIT_S, VectorWait, Waiting, by_request, waiting_sample
from workers.trainer.vectors import VectorCache

log = logging.getLogger("workers.trainer")  # the stage's logger: the package's name, as before it was one
STAGE = "trainer"
VECTOR_RETRY_S = 1.0  # how often the index is asked again for the items samples wait for
# no_vector: samples dead-lettered after waiting for a vector in vain; vector_waits: samples that had to wait
COUNT_KEYS = ("messages", "dlq", "samples", "real", "clicks", "pseudo", "pseudo_skipped", "duplicates", "no_vector",
              "vector_waits", "steps", "holdout")


class Trainer:
    """Consume ``samples``, train the pre-ranker incrementally, checkpoint, then commit.

    ``counts`` are cumulative over the model's whole life (restored from the checkpoint);
    ``accounting`` counts what this process saw (Prometheus ``gpl_messages_total``): per message ``in``,
    per sample ``samples = trained + holdout + duplicate + pseudo_skipped + dlq:no_vector + waiting``
    (plus ``resumed_waiting``, the waiting samples a checkpoint handed over, on the left): :meth:`balance`.
    ``vector_wait_max``/``vector_wait_s`` bound the wait for an item's vector (workers/trainer/vector_wait.py).
    ``dim`` is the content-vector size; without it (and without a checkpoint) it is read from the
    first vectors fetched.
    """

    def __init__(
        self, settings: Settings, index: VectorIndex, *, dim: int | None = None, progress: bool = True,
        name: str = STAGE, directory: Path | None = None, vector_wait_max: int = VECTOR_WAIT_MAX,
        vector_wait_s: float = VECTOR_WAIT_S,
    ) -> None:
        self.settings = settings
        self.cfg = settings.trainer
        self.index = index
        self.collection = settings.encoder.collection
        self.name = name  # consumer group and metrics label: a second trainer (a baseline) gets its own
        self.directory = directory if directory is not None else settings.checkpoints_dir
        self.accounting = Accounting(name)
        self.progress = progress
        self.counts: dict[str, int] = dict.fromkeys(COUNT_KEYS, 0)
        self.offsets: dict[tuple[str, int], int] = {}  # next offset per partition, as far as consumed
        self.durable_offsets: dict[tuple[str, int], int] = {}  # as of the last checkpoint
        self.offset_resets: list[tuple[str, int, int, int]] = []  # (topic, partition, from, to): past the end
        self.seen: set[int] = set()
        self.version = 0
        self.checkpointed = threading.Event()  # set after every durable checkpoint (tests, demo)
        self.vectors = VectorCache(index, self.collection)  # the frozen item vectors asked for so far
        self._pending: list[Pending] = []
        self.waiting = VectorWait(vector_wait_max, vector_wait_s)  # samples whose item has no vector yet
        self._retry_at = 0.0  # monotonic time of the next index lookup for the waiting items
        self._ckpt_at = time.monotonic()  # of the last checkpoint: the time bound counts from it
        self._batches = 0  # SampleBatches admitted: a row's request group for the rank term
        self._since_ckpt = 0  # inputs (samples, bad messages) handled since the last checkpoint
        self._dirty = False
        self._closing = False
        self.io: StagePort | None = None  # the Kafka side (or its in-memory twin), while run() runs
        self.model: PreRanker | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.holdout = Holdout(self.cfg.holdout_max)  # real labels never trained: the publishing gate's slice
        self.publisher = Publisher(self.directory, self.cfg)
        self.rank = RankTerm.from_settings(self.cfg)
        self.memory: ClickMemory | None = None  # the users' recent clicks: for a model that reads history
        self.anchor_input = AnchorInput(settings, index)  # each row's anchor cross feature (trainer.anchor_cross)
        found = latest_checkpoint(self.directory)
        if found is not None:
            self._restore(read_checkpoint(found))
        elif dim is not None:
            self._build(ModelConfig.from_settings(self.cfg, dim))
        n = self.model.cfg.history_items if self.model is not None else self.cfg.history_items
        if n and self.memory is None:
            self.memory = ClickMemory(n)

    # model and state ---------------------------------------------------------------------------

    def _build(self, mc: ModelConfig) -> None:
        self.model, self.opt = build(mc, self.cfg.lr)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Take the checkpoint's model, offsets, seen-set, counts and held state (workers/trainer/state.py)."""
        restored = restore_model(ckpt, self.collection, self.cfg.lr)
        if restored is not None:
            self.model, self.opt = restored
        self.version = int(ckpt["version"])
        self.counts.update({k: int(v) for k, v in ckpt["counts"].items()})
        self.offsets = {(str(t), int(p)): int(o) for t, p, o in ckpt["offsets"]}
        self.durable_offsets = dict(self.offsets)
        self.seen = set(ckpt["seen"].tolist())
        self.holdout.restore(ckpt.get("holdout"))
        self.accounting.add("resumed_waiting", self.waiting.restore(ckpt.get("vector_wait")))
        self.memory = restore_memory(ckpt)
        CHECKPOINT_VERSION.set(self.version)
        log.info("trainer: resumed from %s (version %d, %d samples)", ckpt["path"], self.version,
                 self.counts["samples"])

    # the loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, poll: int = 256, io: StagePort | None = None) -> None:
        """Train until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        if io is None:
            io = StageIO(self.settings.kafka, self.name, self.accounting, registry=self.settings.schema_registry)
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
                wanted = {s.item_id for b in parsed if isinstance(b, SampleBatch) for s in b.samples}
                if self.waiting and time.monotonic() >= self._retry_at:  # the waiting items, now and then
                    wanted |= self.waiting.items()
                    self._retry_at = time.monotonic() + VECTOR_RETRY_S
                self._fetch_vectors(wanted)
                self._release()
                for m, b in zip(msgs, parsed, strict=True):
                    self.counts["messages"] += 1
                    self._dirty = True
                    self.accounting.add("in")
                    if isinstance(b, DecodeError):
                        io.dead_letter(m, b)
                        self.counts["dlq"] += 1
                        self._since_ckpt += 1
                    else:
                        with io.processing(m):  # a failure of one batch's step: its DLQ, and go on
                            bar.update(self._admit(b, (*tp_of(m), m.offset() or 0)))
                            io.done(m)
                    # in order: a checkpoint between two messages covers exactly the ones before it
                    tp = tp_of(m)
                    self.offsets[tp] = io.ledger.position(tp)
                    while len(self._pending) >= self.cfg.batch_size:
                        self._train(self.cfg.batch_size)
                    if self._since_ckpt >= self.cfg.checkpoint_every:
                        self.checkpoint()
                if time.monotonic() - self._ckpt_at >= self.cfg.checkpoint_every_s:  # a no-op when clean
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
        start_at_checkpoint(partitions, self.durable_offsets)
        for t, p, start, low in reset_past_end(c, partitions, self.name):
            self.offset_resets.append((t, p, start, low))
            self.durable_offsets[(t, p)] = self.offsets[(t, p)] = low
        c.assign(partitions)
        log.info("trainer: assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def _on_revoke(self, c: Any, partitions: list[TopicPartition]) -> None:
        """Make everything read so far durable before another member may read those partitions."""
        if self._dirty and not self._closing:
            self.checkpoint()

    def _profile(self, items: list[int]) -> np.ndarray | None:
        """The history profile of ``items`` (None while neither a model nor a vector tells its size)."""
        return self.vectors.profile(items, self.model.cfg.content_dim if self.model is not None else None)

    def _admit(self, b: SampleBatch, origin: tuple[str, int, int] = (SAMPLES.name, -1, -1)) -> int:
        """Dedup, attach vectors and buffer the samples of one batch; returns how many were handled.

        A sample whose item has no vector yet waits (:meth:`_wait`); ``origin`` (topic, partition, offset)
        is its message's, for the dead letter should the wait end in vain.
        """
        # the request's history: the user's clicks strictly before the batch's ts, and their profile
        hist_items = self.memory.before(b.user_id, b.ts) if self.memory is not None else []
        hist = self._profile(hist_items) if self.memory is not None else None
        self.accounting.add("samples", len(b.samples))
        for s in b.samples:
            # one key per (request, item), whatever anchor set labeled it: a request relabeled after a restart
            # with newer anchors is the same example, trained at most once (real labels use this id already)
            key = sample_key(sample_id(b.request_id, s.item_id))
            if key in self.seen:
                self.counts["duplicates"] += 1
                self.accounting.add("duplicate")
                continue
            if s.source == "pseudo" and not self.cfg.pseudo_labels:
                self.counts["pseudo_skipped"] += 1
                self.accounting.add("pseudo_skipped")
                continue
            self.seen.add(key)  # also while it waits: a re-sent copy is a duplicate, not a second wait
            vec = self.vectors.get(s.item_id)
            if vec is None:
                self._wait(b, s, key, hist_items, origin)
                continue
            self._take(b.user_id, s, key, vec, hist_items, hist, self._batches)
        if self.memory is not None:  # after the batch's own rows: a row never sees its own click
            self.memory.add(b.user_id, b.ts, [s.item_id for s in b.samples if s.source == "click"])
        self._since_ckpt += len(b.samples)
        self._batches += 1
        return len(b.samples)

    def _take(self, user_id: str, s: Sample, key: int, vec: np.ndarray, hist_items: list[int],
              hist: np.ndarray | None, group: int) -> None:
        """Count a sample with its vector and hold it out or buffer it for the next step."""
        pseudo = s.source == "pseudo"
        self.counts["samples"] += 1
        self.counts["pseudo" if pseudo else "real"] += 1
        self.counts["clicks"] += int(s.source == "click")
        anchor = self.anchor_input.of(self.model.cfg if self.model is not None else None, user_id, s, vec)
        if not pseudo and is_holdout(key, self.cfg.holdout_fraction):  # never trained, in any run
            self.holdout.add(user_id, s.item_id, s.label, hist_items if self.memory is not None else None, anchor)
            self.counts["holdout"] += 1
            self.accounting.add("holdout")
            return
        self._pending.append(pending(user_id, s, vec, pseudo, hist, group, anchor))
        self.accounting.add("trained")  # buffered: trained by the next step, at the latest before the checkpoint

    def _wait(self, b: SampleBatch, s: Sample, key: int, hist_items: list[int], origin: tuple[str, int, int]) -> None:
        """Hold a sample until its item's vector is in the index (bounded: workers/trainer/vector_wait.py)."""
        self.counts["vector_waits"] += 1  # a passage, not an outcome: it ends trained, held out or dead-lettered
        for w in self.waiting.add(waiting_sample(b, s, key, self.waiting.clock(), origin, hist_items)):
            self._no_vector(w, f"{self.waiting.max_samples} samples were already waiting for vectors")

    def _release(self) -> None:
        """Take the waiting samples whose vectors arrived; dead-letter the ones that waited too long."""
        released, self._batches = by_request(self.waiting.release(lambda i: i in self.vectors), self._batches)
        for w, b, group in released:
            hist = self._profile(list(w.history)) if self.memory is not None else None
            self._take(b.user_id, b.samples[0], w.key, self.vectors[w.item_id], list(w.history), hist, group)
            self._dirty = True
        for w in self.waiting.expired():
            self._no_vector(w, f"not in the index after waiting {self.waiting.max_age_s:.0f}s")

    def _no_vector(self, w: Waiting, why: str) -> None:
        """A sample's wait ended in vain: to ``samples.dlq`` (reason ``no_vector``), counted, out of the seen-set
        (so a replay of the dead letter, once its item is indexed, trains it)."""
        self.seen.discard(w.key)
        self.counts["no_vector"] += 1
        self._dirty = True
        err = LookupError(f"item {w.item_id} has no vector in {self.collection!r}: {why}")
        if self.io is None:  # outside run(): nowhere to send it, but still counted and logged
            self.accounting.add("dlq:no_vector")
            return log.warning("%s: sample dropped (no DLQ outside run): %s", self.name, err)
        self.io.dlq.send_raw(w.topic, w.partition, w.offset, decode(w.value, SampleBatch).user_id.encode(), w.value,
                             err, "no_vector")

    def balance(self) -> int:
        """What the per-sample accounting identity leaves over (0 when every sample is somewhere)."""
        a = self.accounting.snapshot()
        out = ("trained", "holdout", "duplicate", "pseudo_skipped", "dlq:no_vector")
        return a.get("samples", 0) + a.get("resumed_waiting", 0) - sum(a.get(k, 0) for k in out) - len(self.waiting)

    def _fetch_vectors(self, item_ids: set[int]) -> None:
        """Fill the vector cache with the vectors of ``item_ids`` (never recomputed under one encoder)."""
        self.vectors.fetch(item_ids)

    def _train(self, n: int) -> None:
        """One optimizer step on the first ``n`` buffered samples."""
        rows, self._pending = self._pending[:n], self._pending[n:]
        if not rows:
            return
        vectors = np.stack([r.vector for r in rows])
        if self.model is None:
            self._build(ModelConfig.from_settings(self.cfg, int(vectors.shape[1])))
        assert self.model is not None and self.opt is not None
        parts = step(self.model, self.opt, rows, vectors, self.cfg.pseudo_lambda, self.rank)
        self.counts["steps"] += 1
        for k, v in parts.items():
            if v == v:  # NaN: that part was absent from the batch
                TRAINER_LOSS.labels(part=k).set(v)

    # checkpoint + commit -----------------------------------------------------------------------

    def checkpoint(self) -> Path | None:
        """Train the buffer, write the next version durably, then commit the offsets it covers.

        No-op when nothing was read since the last checkpoint (a restart writes no empty versions).
        Samples waiting for a vector are saved in it (``vector_wait``), so the offsets may pass their messages
        (holding the commit before the oldest one instead would re-read all after it on a restart).
        """
        if not self._dirty and not self._pending:
            return None
        if self.io is not None:  # dead letters the offsets cover must be durable first
            self.io.producer.flush(30)
        while self._pending:
            self._train(self.cfg.batch_size)
        self.version += 1
        payload = checkpoint_payload(self.settings, version=self.version, model=self.model, opt=self.opt,
                                     offsets=self.offsets, counts=self.counts, seen=self.seen, holdout=self.holdout,
                                     memory=self.memory, waiting=self.waiting)  # what it holds: state.py
        path = save_checkpoint(self.directory, payload, self.cfg.keep_checkpoints)
        self.durable_offsets = dict(self.offsets)
        self._ckpt_at = time.monotonic()
        self._since_ckpt = 0
        self._dirty = False
        CHECKPOINT_VERSION.set(self.version)
        CHECKPOINT_TIME.set(time.time())
        self.accounting.add("checkpoints")
        log.info("trainer: checkpoint %s (%d samples)", path.name, self.counts["samples"])
        # the checkpoint, not the commit, decides where a restart resumes: a lost commit costs nothing
        commit_durable(self.io.consumer if self.io is not None else None, self.durable_offsets, self.version)
        if self.cfg.publish and self.model is not None:  # for serving if it passes (workers/trainer/publish.py)
            self._fetch_vectors(self.holdout.item_ids())
            self.publisher.gate_holdout(payload, self.model, self.holdout, self.vectors.vectors)
        self.checkpointed.set()
        return path
