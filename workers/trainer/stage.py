"""The trainer without its Kafka loop: the engine's decisions performed on the model, the index and the files.

Why apart: workers/trainer/engine.py decides (dedup, the vector wait, holdout or train, when a step and a
checkpoint are due); workers/trainer/loop.py polls and performs what reaches the broker (dead letters, the
commit, the rebalance). Between them sits what needs the model and the index but no broker: the
item vectors (:class:`~workers.trainer.vectors.VectorCache`), each taken sample's row (its history profile
and anchor cross feature, workers/trainer/rows.py), the optimizer step, the checkpoint written atomically
(workers/trainer/state.py) and the publishing gate (workers/trainer/publish.py). The unit tests drive it
directly (``_admit``, ``_train``, ``checkpoint``) with no I/O at all.

The checkpoint is the source of truth, not the committed offsets: it holds the model, the optimizer, the
seen-set, the counts, the samples waiting for a vector *and* the next offset of every partition, in one
atomic file, so they roll back together.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.kafka import Accounting
from runtime.offsets import TP
from runtime.settings import Settings
from runtime.vectors.index import VectorIndex
from schemas.events import SampleBatch
from schemas.topics import SAMPLES
from workers.click_memory import ClickMemory
from workers.model import ModelConfig, PreRanker, RankTerm
from workers.trainer.checkpoints import latest_checkpoint, read_checkpoint, save_checkpoint
from workers.trainer.engine import NoVector, Take, TrainEngine
from workers.trainer.holdout import Holdout
from workers.trainer.metrics import CHECKPOINT_TIME, CHECKPOINT_VERSION, TRAINER_LOSS
from workers.trainer.publish import Publisher
from workers.trainer.rows import AnchorInput, Pending, pending, step
from workers.trainer.state import build, restore_memory, restore_model
from workers.trainer.state import payload as checkpoint_payload
from workers.trainer.vector_wait import VECTOR_WAIT_MAX, VECTOR_WAIT_S, VectorWait
from workers.trainer.vectors import VectorCache

log = logging.getLogger("workers.trainer")  # the stage's logger: the package's name, as before it was one
STAGE = "trainer"


def no_vector_error(collection: str, d: NoVector) -> LookupError:
    """The error a ``no_vector`` dead letter carries."""
    return LookupError(f"item {d.waiting.item_id} has no vector in {collection!r}: {d.why}")


class TrainerStage:
    """Train the pre-ranker on admitted batches, checkpoint; the broker side is :class:`~workers.trainer.Trainer`.

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
        self.engine: TrainEngine[Pending] = TrainEngine(self.cfg, self.accounting,
                                                        VectorWait(vector_wait_max, vector_wait_s))
        self.offset_resets: list[tuple[str, int, int, int]] = []  # (topic, partition, from, to): past the end
        self.version = 0
        self.checkpointed = threading.Event()  # set after every durable checkpoint (tests, demo)
        self.vectors = VectorCache(index, self.collection)  # the frozen item vectors asked for so far
        self.model: PreRanker | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.holdout = Holdout(self.cfg.holdout_max)  # real labels never trained: the publishing gate's slice
        self.publisher = Publisher(self.directory, self.cfg)
        self.rank = RankTerm.from_settings(self.cfg)
        self.anchor_input = AnchorInput(settings, index)  # each row's anchor cross feature (trainer.anchor_cross)
        found = latest_checkpoint(self.directory)
        if found is not None:
            self._restore(read_checkpoint(found))
        elif dim is not None:
            self._build(ModelConfig.from_settings(self.cfg, dim))
        n = self.model.cfg.history_items if self.model is not None else self.cfg.history_items
        if n and self.engine.memory is None:
            self.engine.memory = ClickMemory(n)

    # the engine's state, under the names the stage always had ---------------------------------

    @property
    def counts(self) -> dict[str, int]:
        return self.engine.counts

    @property
    def seen(self) -> set[int]:
        return self.engine.seen

    @property
    def waiting(self) -> VectorWait:
        return self.engine.waiting

    @property
    def memory(self) -> ClickMemory | None:
        return self.engine.memory

    @property
    def _pending(self) -> list[Pending]:
        return self.engine.pending

    @property
    def _dirty(self) -> bool:
        return self.engine.dirty

    @_dirty.setter
    def _dirty(self, value: bool) -> None:
        self.engine.dirty = value

    # model and state ---------------------------------------------------------------------------

    def _build(self, mc: ModelConfig) -> None:
        self.model, self.opt = build(mc, self.cfg.lr)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Take the checkpoint's model, offsets, seen-set, counts and held state (workers/trainer/state.py)."""
        restored = restore_model(ckpt, self.collection, self.cfg.lr)
        if restored is not None:
            self.model, self.opt = restored
        self.version = int(ckpt["version"])
        self.engine.restore({k: int(v) for k, v in ckpt["counts"].items()},
                            {(str(t), int(p)): int(o) for t, p, o in ckpt["offsets"]}, ckpt["seen"].tolist())
        self.holdout.restore(ckpt.get("holdout"))
        self.accounting.add("resumed_waiting", self.waiting.restore(ckpt.get("vector_wait")))
        self.engine.memory = restore_memory(ckpt)
        CHECKPOINT_VERSION.set(self.version)
        log.info("trainer: resumed from %s (version %d, %d samples)", ckpt["path"], self.version,
                 self.counts["samples"])

    # what the engine decided, performed --------------------------------------------------------

    def _profile(self, items: list[int]) -> np.ndarray | None:
        """The history profile of ``items`` (None while neither a model nor a vector tells its size)."""
        return self.vectors.profile(items, self.model.cfg.content_dim if self.model is not None else None)

    def _admit(self, b: SampleBatch, origin: tuple[str, int, int] = (SAMPLES.name, -1, -1)) -> int:
        """Dedup, attach vectors and buffer the samples of one batch (the engine's rules); returns how many
        were handled. ``origin`` (topic, partition, offset) is its message's, for a dead letter."""
        # the request's history profile, before its samples are looked up (as the engine will read it)
        hist = self._profile(self.memory.before(b.user_id, b.ts)) if self.memory is not None else None
        takes, dead = self.engine.admit(b, origin, self.vectors)
        for t in takes:
            self._take(t, hist)
        for d in dead:
            self._dead_letter(d)
        return len(b.samples)

    def _release(self) -> None:
        """Take the waiting samples whose vectors arrived; dead-letter the ones that waited too long."""
        takes, dead = self.engine.release(self.vectors)
        for t in takes:
            self._take(t, self._profile(t.history) if self.memory is not None else None)
        for d in dead:
            self._dead_letter(d)

    def _take(self, t: Take, hist: np.ndarray | None) -> None:
        """Hold a taken sample out (the gate's slice) or buffer its row for the next step."""
        anchor = self.anchor_input.of(self.model.cfg if self.model is not None else None, t.user_id, t.sample,
                                      t.vector)
        if t.holdout:
            self.holdout.add(t.user_id, t.sample.item_id, t.sample.label,
                             t.history if self.memory is not None else None, anchor)
        else:
            self.engine.buffer(pending(t.user_id, t.sample, t.vector, t.sample.source == "pseudo", hist, t.group,
                                       anchor))

    def _dead_letter(self, d: NoVector) -> None:
        """Outside the loop there is nowhere to send a dead letter: counted and logged (the loop sends it)."""
        self.accounting.add("dlq:no_vector")
        log.warning("%s: sample dropped (no DLQ outside run): %s", self.name, no_vector_error(self.collection, d))

    def balance(self) -> int:
        """What the per-sample accounting identity leaves over (0 when every sample is somewhere)."""
        return self.engine.balance()

    def _fetch_vectors(self, item_ids: set[int]) -> None:
        """Fill the vector cache with the vectors of ``item_ids`` (never recomputed under one encoder)."""
        self.vectors.fetch(item_ids)

    def _train(self, n: int) -> None:
        """One optimizer step on the first ``n`` buffered samples."""
        rows = self.engine.rows(n)
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
        if not self.engine.changed():
            return None
        self._flush()  # dead letters the offsets cover must be durable first
        while self._pending:
            self._train(self.cfg.batch_size)
        self.version += 1
        payload = checkpoint_payload(self.settings, version=self.version, model=self.model, opt=self.opt,
                                     offsets=self.engine.offsets, counts=self.counts, seen=self.seen,
                                     holdout=self.holdout, memory=self.memory, waiting=self.waiting)  # see state.py
        path = save_checkpoint(self.directory, payload, self.cfg.keep_checkpoints)
        durable = self.engine.durable()
        CHECKPOINT_VERSION.set(self.version)
        CHECKPOINT_TIME.set(time.time())
        self.accounting.add("checkpoints")
        log.info("trainer: checkpoint %s (%d samples)", path.name, self.counts["samples"])
        self._commit(durable)  # the checkpoint, not the commit, decides where a restart resumes
        if self.cfg.publish and self.model is not None:  # for serving if it passes (workers/trainer/publish.py)
            self._fetch_vectors(self.holdout.item_ids())
            self.publisher.gate_holdout(payload, self.model, self.holdout, self.vectors.vectors)
        self.checkpointed.set()
        return path

    def _flush(self) -> None:
        """Make the dead letters sent so far durable (the loop's producer; nothing to flush outside it)."""

    def _commit(self, durable: dict[TP, int]) -> None:
        """Commit the checkpoint's offsets to the group (the loop's consumer; no group outside it)."""
