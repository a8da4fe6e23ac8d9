"""The trainer's rules as a pure engine: what a polled record does to the seen-set, the vector wait and the
train buffer, when a step and a checkpoint are due, and which offsets a commit may cover.

Why apart from the loop (workers/trainer/loop.py): these are the rules a restart and a replay depend on,
and inside the Kafka loop they could only be tested through a broker. Here they hold plain state (the
counts, the seen-set of sample keys, the consumed and durable offsets, the :class:`VectorWait`, the buffer
of rows) and return their decisions as values, in the style of streams/join_engine.py:

* :meth:`TrainEngine.admit` takes one decoded batch and the vectors known so far; it drops samples already
  seen and (``trainer.pseudo_labels`` false) pseudo labels, holds a sample whose item has no vector yet,
  and returns a :class:`Take` per sample to hold out or to train, plus a :class:`NoVector` per sample the
  wait's size bound pushed out (the caller's to dead-letter);
* :meth:`TrainEngine.release` takes the waiting samples whose vectors arrived and returns the ones that
  waited too long;
* rows the caller built from the takes go into :meth:`TrainEngine.buffer`; :meth:`TrainEngine.step_due` and
  :meth:`TrainEngine.rows` say when and on what a step runs; :meth:`TrainEngine.checkpoint_due` when a
  checkpoint is (``checkpoint_every`` inputs or ``checkpoint_every_s`` seconds since the last one);
* :meth:`TrainEngine.durable` moves the commit position to the consumed offsets, and refuses while rows are
  untrained: an offset is never committed past a record whose rows no checkpoint holds. Samples still
  waiting for a vector are part of the checkpoint (its ``vector_wait``), so the offsets may pass them.

The model, the index, the checkpoint files and the broker are the callers' (workers/trainer/stage.py,
workers/trainer/loop.py); the engine never touches them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from runtime.kafka import Accounting
from runtime.offsets import TP
from runtime.settings import TrainerSettings
from schemas.events import Sample, SampleBatch
from schemas.ids import sample_id
from workers.click_memory import ClickMemory
from workers.model import sample_key
from workers.trainer.holdout import is_holdout
from workers.trainer.vector_wait import VectorWait, Waiting, by_request, waiting_sample

VECTOR_RETRY_S = 1.0  # how often the index is asked again for the items samples wait for
# no_vector: samples dead-lettered after waiting for a vector in vain; vector_waits: samples that had to wait
COUNT_KEYS = ("messages", "dlq", "samples", "real", "clicks", "pseudo", "pseudo_skipped", "duplicates", "no_vector",
              "vector_waits", "steps", "holdout")
Row = TypeVar("Row")


class Vectors(Protocol):
    """The item vectors known so far (workers/trainer/vectors.py VectorCache, or a dict in the unit tests)."""

    def __contains__(self, item_id: int) -> bool: ...

    def __getitem__(self, item_id: int) -> np.ndarray: ...

    def get(self, item_id: int) -> np.ndarray | None: ...


@dataclass(frozen=True)
class Take:
    """A sample with its vector, counted: held out (never trained) or to be built into a row and buffered."""

    user_id: str
    sample: Sample
    key: int  # its sample key, in the seen-set
    vector: np.ndarray
    history: list[int]  # the request's history items (the user's clicks before it)
    group: int  # the rank term's request group
    holdout: bool


@dataclass(frozen=True)
class NoVector:
    """A sample whose wait for its item's vector ended in vain: the caller dead-letters it (``no_vector``)."""

    waiting: Waiting
    why: str


class TrainEngine(Generic[Row]):
    """The trainer's plain state and rules (see the module docstring); ``Row`` is what the caller buffers."""

    def __init__(self, cfg: TrainerSettings, accounting: Accounting, waiting: VectorWait,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.accounting = accounting
        self.waiting = waiting  # samples whose item has no vector yet
        self.clock = clock  # monotonic: the checkpoint's time bound and the index retries count on it
        self.memory: ClickMemory | None = None  # the users' recent clicks: for a model that reads history
        self.counts: dict[str, int] = dict.fromkeys(COUNT_KEYS, 0)
        self.seen: set[int] = set()
        self.offsets: dict[TP, int] = {}  # next offset per partition, as far as consumed
        self.durable_offsets: dict[TP, int] = {}  # as of the last checkpoint: what a commit may cover
        self.pending: list[Row] = []  # rows buffered for the next step
        self.dirty = False  # anything read since the last checkpoint
        self.since_ckpt = 0  # inputs (samples, bad messages) handled since the last checkpoint
        self.batches = 0  # SampleBatches admitted: a row's request group for the rank term
        self.ckpt_at = clock()  # of the last checkpoint: the time bound counts from it
        self.retry_at = 0.0  # of the next index lookup for the waiting items

    def restore(self, counts: dict[str, int], offsets: dict[TP, int], seen: Iterable[int]) -> None:
        """Take a checkpoint's counts, offsets and seen-set (its durable position)."""
        self.counts.update(counts)
        self.offsets = dict(offsets)
        self.durable_offsets = dict(offsets)
        self.seen = set(seen)

    # one poll ----------------------------------------------------------------------------------

    def wanted(self, batches: Iterable[SampleBatch]) -> set[int]:
        """The items whose vectors a poll asks the index for: its batches', and now and then the waiting ones."""
        wanted = {s.item_id for b in batches for s in b.samples}
        if self.waiting and self.clock() >= self.retry_at:
            wanted |= self.waiting.items()
            self.retry_at = self.clock() + VECTOR_RETRY_S
        return wanted

    def message(self, *, bad: bool = False) -> None:
        """Count one polled message (``bad``: undecodable, dead-lettered by the caller)."""
        self.counts["messages"] += 1
        self.dirty = True
        self.accounting.add("in")
        if bad:
            self.counts["dlq"] += 1
            self.since_ckpt += 1

    def consumed(self, tp: TP, position: int) -> None:
        """The partition's next offset after a message was handled (in order: a checkpoint between two
        messages covers exactly the ones before it)."""
        self.offsets[tp] = position

    def admit(self, b: SampleBatch, origin: tuple[str, int, int], vectors: Vectors
              ) -> tuple[list[Take], list[NoVector]]:
        """Dedup one batch's samples, take the ones with vectors, hold the others; ``origin`` (topic, partition,
        offset) is its message's, the dead letter's should a wait end in vain."""
        hist = self.memory.before(b.user_id, b.ts) if self.memory is not None else []
        self.accounting.add("samples", len(b.samples))
        takes: list[Take] = []
        dead: list[NoVector] = []
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
            vec = vectors.get(s.item_id)
            if vec is None:
                self.counts["vector_waits"] += 1  # a passage, not an outcome: trained, held out or dead-lettered
                for w in self.waiting.add(waiting_sample(b, s, key, self.waiting.clock(), origin, hist)):
                    dead.append(self._no_vector(w, f"{self.waiting.max_samples} samples were already waiting "
                                                   "for vectors"))
                continue
            takes.append(self._take(b.user_id, s, key, vec, hist, self.batches))
        if self.memory is not None:  # after the batch's own rows: a row never sees its own click
            self.memory.add(b.user_id, b.ts, [s.item_id for s in b.samples if s.source == "click"])
        self.since_ckpt += len(b.samples)
        self.batches += 1
        return takes, dead

    def release(self, vectors: Vectors) -> tuple[list[Take], list[NoVector]]:
        """Take the waiting samples whose vectors arrived (a request group each); expire the ones that waited
        too long."""
        released, self.batches = by_request(self.waiting.release(lambda i: i in vectors), self.batches)
        takes = []
        for w, b, group in released:
            takes.append(self._take(b.user_id, b.samples[0], w.key, vectors[w.item_id], list(w.history), group))
            self.dirty = True
        dead = [self._no_vector(w, f"not in the index after waiting {self.waiting.max_age_s:.0f}s")
                for w in self.waiting.expired()]
        return takes, dead

    def _take(self, user_id: str, s: Sample, key: int, vec: np.ndarray, hist: list[int], group: int) -> Take:
        """Count a sample with its vector and decide: held out (a deterministic share of real labels, never
        trained in any run) or trained."""
        pseudo = s.source == "pseudo"
        self.counts["samples"] += 1
        self.counts["pseudo" if pseudo else "real"] += 1
        self.counts["clicks"] += int(s.source == "click")
        held = not pseudo and is_holdout(key, self.cfg.holdout_fraction)
        if held:
            self.counts["holdout"] += 1
            self.accounting.add("holdout")
        else:
            self.accounting.add("trained")  # buffered: trained by the next step, at the latest before the checkpoint
        return Take(user_id, s, key, vec, hist, group, held)

    def _no_vector(self, w: Waiting, why: str) -> NoVector:
        """A wait ended in vain: counted, out of the seen-set (so a replay of the dead letter, once its item is
        indexed, trains it)."""
        self.seen.discard(w.key)
        self.counts["no_vector"] += 1
        self.dirty = True
        return NoVector(w, why)

    # steps and checkpoints ---------------------------------------------------------------------

    def buffer(self, row: Row) -> None:
        """Buffer a taken sample's row for the next step."""
        self.pending.append(row)

    def step_due(self) -> bool:
        """A full mini-batch is buffered."""
        return len(self.pending) >= self.cfg.batch_size

    def rows(self, n: int) -> list[Row]:
        """Take the first ``n`` buffered rows for a step (the caller counts ``steps`` once it ran)."""
        rows, self.pending = self.pending[:n], self.pending[n:]
        return rows

    def checkpoint_due(self, *, timed: bool = False) -> bool:
        """``checkpoint_every`` inputs since the last checkpoint (``timed``: or ``checkpoint_every_s`` seconds
        with anything changed)."""
        if self.since_ckpt >= self.cfg.checkpoint_every:
            return True
        return timed and self.changed() and self.clock() - self.ckpt_at >= self.cfg.checkpoint_every_s

    def changed(self) -> bool:
        """Anything read or buffered since the last checkpoint: an unchanged state writes no new version."""
        return self.dirty or bool(self.pending)

    def durable(self) -> dict[TP, int]:
        """Once the checkpoint holding everything consumed is written: its offsets become the commit position.

        Refuses while rows are untrained: the commit would pass records no checkpoint holds.
        """
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} rows are untrained: train them before the checkpoint")
        self.durable_offsets = dict(self.offsets)
        self.ckpt_at = self.clock()
        self.since_ckpt = 0
        self.dirty = False
        return self.durable_offsets

    def balance(self) -> int:
        """What the per-sample accounting identity leaves over (0 when every sample is somewhere)."""
        a = self.accounting.snapshot()
        out = ("trained", "holdout", "duplicate", "pseudo_skipped", "dlq:no_vector")
        return a.get("samples", 0) + a.get("resumed_waiting", 0) - sum(a.get(k, 0) for k in out) - len(self.waiting)
