"""Trainer: ``samples`` → incremental pre-ranker → versioned checkpoints.

Reads top to bottom: poll SampleBatches, dead-letter the bad ones, drop samples already seen (a set of
64-bit hashes of sample ids), look up each item's frozen content vector (cached; an item not in the
index is counted ``no_vector`` and skipped), and train in mini-batches on the GPL objective. Every
``checkpoint_every`` samples, on a partition revoke and on a clean stop: train what is buffered, write a
numbered checkpoint atomically, and only then commit the Kafka offsets.

The checkpoint is the source of truth, not the committed offsets: it holds the model, the optimizer,
the seen-set, the counts *and* the next offset of every partition, written in one atomic file. On start
the trainer loads it and, when the group assigns it partitions, seeks to those offsets. So a crash
between checkpoint and commit re-reads nothing the checkpoint covers, and a crash after training but
before the checkpoint re-reads (and trains, and counts) those samples exactly once more, because the
model, seen-set and counts roll back together with the offsets.

History (``trainer.history_items`` > 0, or a checkpoint of such a model): the pre-ranker also reads the
user's recent clicks. The trainer keeps them (:class:`~workers.click_memory.ClickMemory`, saved in every
checkpoint) from the real labels it reads, and gives each batch the history its request had: the clicks
strictly before the batch's ``ts``.

Serving: a deterministic share of real-label samples is held out, never trained, and after every
checkpoint a quality gate scores the checkpoint and the published model on it; only a checkpoint that
passes is published for serving (``workers/publish.py``).

One trainer per consumer group: it trains one model, so it must see every partition.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from confluent_kafka import Consumer, KafkaException, TopicPartition
from tqdm import tqdm

from gpl.runtime.kafka import Accounting
from gpl.runtime.metrics import CHECKPOINT_VERSION, OFFSET_RESETS, TRAINER_LOSS
from gpl.runtime.settings import Settings
from gpl.runtime.stage_io import StageIO, tp_of
from gpl.runtime.vectors.index import VectorIndex
from schemas.codec import DecodeError
from schemas.events import SampleBatch
from schemas.ids import sample_id
from schemas.topics import SAMPLES
from workers.checkpoints import (
    FORMAT,
    LATEST,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from workers.click_memory import ClickMemory
from workers.history import profile_of
from workers.model import (
    Batch,
    ModelConfig,
    PreRanker,
    RankTerm,
    make_optimizer,
    sample_key,
    train_step,
    whole_logit,
)
from workers.publish import Holdout, Publisher, is_holdout

# the checkpoint files moved to workers/checkpoints.py; callers still import them from here
__all__ = ["FORMAT", "LATEST", "Trainer", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "read_checkpoint", "save_checkpoint"]
log = logging.getLogger(__name__)
STAGE = "trainer"
VECTOR_CACHE_MAX = 200_000  # item vectors kept in memory (~300 MB at 384 dims); cleared when full
COUNT_KEYS = ("messages", "dlq", "samples", "real", "clicks", "pseudo", "pseudo_skipped", "duplicates", "no_vector",
              "steps", "holdout")


# --- the worker ------------------------------------------------------------------------------------


class Pending(NamedTuple):
    """A sample buffered for the next optimizer step."""

    user_id: str
    item_id: int
    vector: np.ndarray
    label: float
    weight: float
    pseudo: bool
    history: np.ndarray | None  # the request's history profile (model with history_items), else None
    group: int  # the SampleBatch (request) it came in: the rank term compares a request's rows
    prior_logit: float  # the label's prior part (its whole logit when the labeler sent none): residual rank term


class Trainer:
    """Consume ``samples``, train the pre-ranker incrementally, checkpoint, then commit.

    ``counts`` are cumulative over the model's whole life (restored from the checkpoint);
    ``accounting`` counts what this process saw (Prometheus ``gpl_messages_total``).
    ``dim`` is the content-vector size; without it (and without a checkpoint) it is read from the
    first vectors fetched.
    """

    def __init__(
        self, settings: Settings, index: VectorIndex, *, dim: int | None = None, progress: bool = True,
        name: str = STAGE, directory: Path | None = None,
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
        self._vectors: dict[int, np.ndarray] = {}
        self._pending: list[Pending] = []
        self._batches = 0  # SampleBatches admitted: a row's request group for the rank term
        self._since_ckpt = 0  # inputs (samples, bad messages) handled since the last checkpoint
        self._dirty = False
        self._closing = False
        self.io: StageIO | None = None  # the Kafka side, while run() runs
        self.model: PreRanker | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.holdout = Holdout(self.cfg.holdout_max)  # real labels never trained: the publishing gate's slice
        self.publisher = Publisher(self.directory, self.cfg)
        self.rank = RankTerm.from_settings(self.cfg)
        self.memory: ClickMemory | None = None  # the users' recent clicks: for a model that reads history
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
        self.model = PreRanker(mc)
        self.opt = make_optimizer(self.model.parameters(), self.cfg.lr)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt["collection"] != self.collection:
            raise ValueError(
                f"checkpoint {ckpt['path']} was trained on {ckpt['collection']!r}, settings say "
                f"{self.collection!r}: a new encoder needs a new model (another data_dir)"
            )
        if ckpt["model_config"] is not None:  # None: checkpointed before the first sample trained
            self._build(ModelConfig.from_dict(ckpt["model_config"]))
            assert self.model is not None and self.opt is not None
            self.model.load_state_dict(ckpt["model_state"])
            self.opt.load_state_dict(ckpt["optimizer_state"])
            for g in self.opt.param_groups:  # the operator may change lr between runs
                g["lr"] = self.cfg.lr
        self.version = int(ckpt["version"])
        self.counts.update({k: int(v) for k, v in ckpt["counts"].items()})
        self.offsets = {(str(t), int(p)): int(o) for t, p, o in ckpt["offsets"]}
        self.durable_offsets = dict(self.offsets)
        self.seen = set(ckpt["seen"].tolist())
        self.holdout.restore(ckpt.get("holdout"))
        memory = ckpt.get("click_memory")
        if memory:
            self.memory = ClickMemory(int(memory["n"]))
            self.memory.restore(memory)
        CHECKPOINT_VERSION.set(self.version)
        log.info(
            "trainer: resumed from %s (version %d, %d samples)",
            ckpt["path"],
            self.version,
            self.counts["samples"],
        )

    # the loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, poll: int = 256) -> None:
        io = self.io = StageIO(self.settings.kafka, self.name, self.accounting, registry=self.settings.schema_registry)
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
                self._fetch_vectors(
                    {s.item_id for b in parsed if isinstance(b, SampleBatch) for s in b.samples}
                )
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
                            bar.update(self._admit(b))
                            io.done(m)
                    # in order: a checkpoint between two messages covers exactly the ones before it
                    tp = tp_of(m)
                    self.offsets[tp] = io.ledger.position(tp)
                    while len(self._pending) >= self.cfg.batch_size:
                        self._train(self.cfg.batch_size)
                    if self._since_ckpt >= self.cfg.checkpoint_every:
                        self.checkpoint()
            self.checkpoint()  # clean stop: nothing trained is left behind
        finally:
            self._closing = True  # close() revokes: no checkpoint from a failed or finished loop
            bar.close()
            io.close()
            self.io = None

    def _on_assign(self, c: Consumer, partitions: list[TopicPartition]) -> None:
        """Start every partition the checkpoint knows at the checkpoint's offset, not the committed one."""
        for tp in partitions:
            off = self.durable_offsets.get((tp.topic, tp.partition))
            if off is not None:
                tp.offset = off
        self._reset_past_end(c, partitions)
        c.assign(partitions)
        log.info("trainer: assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def _reset_past_end(self, c: Consumer, partitions: list[TopicPartition]) -> None:
        """Policy for a start offset past the partition's end: reset to its beginning, loudly.

        The checkpoint (or the group's commit) says "next is offset 500" but the partition ends at 206:
        the topic was deleted and recreated, or the broker lost its data (the embedded broker in memory
        mode, restarted). Kafka would wait at 500 forever and the trainer would silently train none of
        the new batches. Reading the partition from its beginning instead trains them; anything that
        was already trained is dropped by the seen-set (sample ids are deterministic). Logged as an
        ERROR and counted in ``gpl_offset_resets_total{stage,topic}`` (and :attr:`offset_resets`).
        """
        implicit = [TopicPartition(tp.topic, tp.partition) for tp in partitions if tp.offset < 0]
        committed = {}
        if implicit:
            committed = {(tp.topic, tp.partition): tp.offset for tp in c.committed(implicit, timeout=10)}
        for tp in partitions:
            start = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            if start < 0:
                continue  # nothing committed: auto.offset.reset decides
            low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            if start <= high:
                continue
            log.error("%s: %s[%d] starts at offset %d but the partition ends at %d (topic recreated or broker "
                      "data lost): resetting to its beginning (%d); already-trained samples are deduplicated",
                      self.name, tp.topic, tp.partition, start, high, low)
            OFFSET_RESETS.labels(stage=self.name, topic=tp.topic).inc()
            self.offset_resets.append((tp.topic, tp.partition, start, low))
            tp.offset = low
            self.durable_offsets[(tp.topic, tp.partition)] = low
            self.offsets[(tp.topic, tp.partition)] = low

    def _on_revoke(self, c: Consumer, partitions: list[TopicPartition]) -> None:
        """Make everything read so far durable before another member may read those partitions."""
        if self._dirty and not self._closing:
            self.checkpoint()

    def _history(self, b: SampleBatch) -> tuple[list[int], np.ndarray | None]:
        """(history items, profile) of the batch's request: the user's clicks before its ``ts``."""
        if self.memory is None:
            return [], None
        items = self.memory.before(b.user_id, b.ts)
        if any(i not in self._vectors for i in items):
            self._fetch_vectors(set(items))
        known = [i for i in items if i in self._vectors]
        dim = self.model.cfg.content_dim if self.model is not None else (len(self._vectors[known[0]]) if known else 0)
        if not dim:  # no model and no vector yet: the profile's size is not known, and it would be zeros
            return items, None
        return items, profile_of(items, self._vectors, dim)

    def _admit(self, b: SampleBatch) -> int:
        """Dedup, attach vectors and buffer the samples of one batch; returns how many were handled."""
        hist_items, hist = self._history(b)
        for s in b.samples:
            # one key per (request, item), whatever anchor set labeled it: a request relabeled after a restart
            # with newer anchors is the same example, trained at most once (real labels use this id already)
            key = sample_key(sample_id(b.request_id, s.item_id))
            if key in self.seen:
                self.counts["duplicates"] += 1
                self.accounting.add("duplicate")
                continue
            vec = self._vectors.get(s.item_id)
            if vec is None:
                self.counts["no_vector"] += 1
                self.accounting.add("no_vector")
                continue
            pseudo = s.source == "pseudo"
            if pseudo and not self.cfg.pseudo_labels:
                self.counts["pseudo_skipped"] += 1
                self.accounting.add("pseudo_skipped")
                continue
            self.seen.add(key)
            self.counts["samples"] += 1
            self.counts["pseudo" if pseudo else "real"] += 1
            self.counts["clicks"] += int(s.source == "click")
            if not pseudo and is_holdout(key, self.cfg.holdout_fraction):  # never trained, in any run
                self.holdout.add(b.user_id, s.item_id, s.label, hist_items if self.memory is not None else None)
                self.counts["holdout"] += 1
                continue
            # no prior part sent (priors-only labels, a label map): the whole label is prior, no residual to rank
            prior = s.prior_logit if s.prior_logit is not None else float(whole_logit(s.label))
            self._pending.append(Pending(b.user_id, s.item_id, vec, s.label, s.weight, pseudo, hist, self._batches,
                                         prior))
        if self.memory is not None:  # after the batch's own rows: a row never sees its own click
            self.memory.add(b.user_id, b.ts, [s.item_id for s in b.samples if s.source == "click"])
        self._since_ckpt += len(b.samples)
        self._batches += 1
        return len(b.samples)

    def _fetch_vectors(self, item_ids: set[int]) -> None:
        """Fill the cache with the vectors of ``item_ids`` (never recomputed under one encoder)."""
        missing = [i for i in item_ids if i not in self._vectors]
        if not missing:
            return
        if len(self._vectors) + len(missing) > VECTOR_CACHE_MAX:  # start over, keeping this poll's items
            self._vectors.clear()
            missing = list(item_ids)
        pts = self.index.retrieve(self.collection, np.asarray(missing, np.int64))
        for i, v in zip(pts.ids.tolist(), pts.vectors, strict=True):
            self._vectors[int(i)] = np.asarray(v, np.float32)

    def _train(self, n: int) -> None:
        """One optimizer step on the first ``n`` buffered samples."""
        rows, self._pending = self._pending[:n], self._pending[n:]
        if not rows:
            return
        vectors = np.stack([r.vector for r in rows])
        if self.model is None:
            self._build(ModelConfig.from_settings(self.cfg, int(vectors.shape[1])))
        assert self.model is not None and self.opt is not None
        if vectors.shape[1] != self.model.cfg.content_dim:
            raise ValueError(
                f"content vectors have dim {vectors.shape[1]}, the model expects "
                f"{self.model.cfg.content_dim}: the collection changed under the model"
            )
        batch = Batch(
            user_ids=[r.user_id for r in rows],
            item_ids=np.asarray([r.item_id for r in rows], np.int64),
            vectors=vectors,
            labels=np.asarray([r.label for r in rows], np.float32),
            weight=np.asarray([r.weight for r in rows], np.float32),
            is_pseudo=np.asarray([r.pseudo for r in rows], bool),
            history=self._history_matrix(rows) if self.model.cfg.history_items else None,
            group=np.asarray([r.group for r in rows], np.int64),
            offset=np.asarray([r.prior_logit for r in rows], np.float32),
        )
        parts = train_step(self.model, self.opt, batch, self.cfg.pseudo_lambda, self.rank)
        self.counts["steps"] += 1
        for k, v in parts.items():
            if v == v:  # NaN: that part was absent from the batch
                TRAINER_LOSS.labels(part=k).set(v)

    def _history_matrix(self, rows: list[Pending]) -> np.ndarray:
        """(n, dim) history profiles of buffered rows (zeros for a row buffered before the size was known)."""
        assert self.model is not None
        dim = self.model.cfg.content_dim
        zero = np.zeros(dim, np.float32)
        return np.stack([r.history if r.history is not None and len(r.history) == dim else zero for r in rows])

    # checkpoint + commit -----------------------------------------------------------------------

    def checkpoint(self) -> Path | None:
        """Train the buffer, write the next version durably, then commit the offsets it covers.

        No-op when nothing was read since the last checkpoint (a restart writes no empty versions).
        """
        if not self._dirty and not self._pending:
            return None
        if self.io is not None:  # dead letters the offsets cover must be durable first
            self.io.producer.flush(30)
        while self._pending:
            self._train(self.cfg.batch_size)
        self.version += 1
        payload = self._payload()
        path = save_checkpoint(self.directory, payload, self.cfg.keep_checkpoints)
        self.durable_offsets = dict(self.offsets)
        self._since_ckpt = 0
        self._dirty = False
        CHECKPOINT_VERSION.set(self.version)
        self.accounting.add("checkpoints")
        log.info("trainer: checkpoint %s (%d samples)", path.name, self.counts["samples"])
        self._commit()
        if self.cfg.publish and self.model is not None:
            self._gate(payload)
        self.checkpointed.set()
        return path

    def _gate(self, payload: dict[str, Any]) -> None:
        """Publish the checkpoint for serving if it passes the gate (workers/publish.py).

        After the commit: the checkpoint is durable whatever the gate says, and a failing gate (a
        corrupt published file, a full disk) is logged and retried at the next checkpoint, never fatal.
        """
        assert self.model is not None
        self._fetch_vectors(self.holdout.item_ids())
        rows = self.holdout.with_vectors(self._vectors, self.model.cfg.content_dim,
                                         history=bool(self.model.cfg.history_items))
        try:
            self.publisher.gate(payload, self.model, rows)
        except (OSError, ValueError, RuntimeError):
            log.exception("trainer: publishing gate failed for checkpoint %d; it stays unpublished", self.version)

    def _payload(self) -> dict[str, Any]:
        m = self.model
        return {
            "format": FORMAT,
            "version": self.version,
            "wall_time": time.time(),
            "model_config": m.cfg.to_dict() if m is not None else None,
            "model_state": m.state_dict() if m is not None else {},
            "optimizer_state": self.opt.state_dict() if self.opt is not None else {},
            "trainer_settings": self.cfg.model_dump(mode="json"),
            "encoder": self.settings.encoder.model,
            "collection": self.collection,
            "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
            "counts": dict(self.counts),
            "seen": torch.tensor(sorted(self.seen), dtype=torch.int64),
            "holdout": self.holdout.state(),
            "click_memory": self.memory.state() if self.memory is not None else None,
        }

    def _commit(self) -> None:
        """Commit the durable offsets of the partitions we hold; a failure is only logged.

        The checkpoint, not the commit, decides where a restart resumes, so a lost commit costs nothing.
        """
        c = self.io.consumer if self.io is not None else None
        if c is None or not self.durable_offsets:
            return
        try:
            held = {(tp.topic, tp.partition) for tp in c.assignment()}
            tps = [TopicPartition(t, p, o) for (t, p), o in self.durable_offsets.items() if (t, p) in held]
            if tps:
                c.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            log.warning("trainer: offset commit failed (checkpoint %d is durable): %s", self.version, e)
