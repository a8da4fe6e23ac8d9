"""Samples whose item has no vector yet: held (bounded), released when the vector arrives.

Why: a one-shot replay of items + events races the indexer. The labeler only labels items it has
vectors for, but real labels (clicks, exposed negatives) reach the trainer straight from the
interest stream, often before the indexer has encoded their items. Dropping them (the old ``no_vector``
count) silently lost a third of the real labels of such a replay.

The trainer keeps each such sample here, per item, and asks the index again for the waiting items on
later polls (:meth:`VectorWait.items`); a sample whose vector arrived is released in arrival order
(:meth:`VectorWait.release`). The wait is bounded twice: at most ``max_samples`` wait (the oldest is
pushed out first) and none waits longer than ``max_age_s`` (:meth:`VectorWait.expired`). What leaves
by either bound is the trainer's to dead-letter (``samples.dlq``, reason ``no_vector``): nothing is
lost without a trace.

Each entry is self-contained: its ``value`` is the encoded one-sample :class:`~schemas.events.SampleBatch`
(the original request's fields, this sample only), so a dead letter's payload can be replayed into
``samples`` as it is, and the whole buffer is plain values, saved in every checkpoint
(:meth:`VectorWait.state`, weights-only loadable). Ages are wall-clock (``time.time()``), so they count
across a restart too. A dead letter is at least once: a crash after sending it but before the next
checkpoint restores the sample as waiting, and it is dead-lettered again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass
from typing import Any

from schemas.codec import decode, encode
from schemas.events import Sample, SampleBatch

VECTOR_WAIT_MAX = 20_000  # samples held at most (~0.5 kB each, in memory and in every checkpoint)
VECTOR_WAIT_S = 600.0  # the longest a sample waits for its item's vector (a replay's indexer catch-up)


@dataclass(frozen=True)
class Waiting:
    """One sample waiting for its item's vector."""

    item_id: int
    key: int  # its sample key (workers.model.sample_key): already in the trainer's seen-set while it waits
    since: float  # wall time it started waiting
    topic: str  # where it came from: the dead letter's origin
    partition: int
    offset: int
    value: bytes  # the encoded one-sample SampleBatch
    history: tuple[int, ...]  # the request's history items (clicks before it), for a history model


class VectorWait:
    """A bounded, ordered buffer of :class:`Waiting` samples, indexed by item."""

    def __init__(self, max_samples: int = VECTOR_WAIT_MAX, max_age_s: float = VECTOR_WAIT_S,
                 clock: Callable[[], float] = time.time) -> None:
        if max_samples < 0 or max_age_s < 0:
            raise ValueError("max_samples and max_age_s must be >= 0")
        self.max_samples = max_samples
        self.max_age_s = max_age_s
        self.clock = clock
        self._seq = 0
        self._entries: dict[int, Waiting] = {}  # seq -> entry, in arrival order (dicts keep insertion order)
        self._by_item: dict[int, list[int]] = {}  # item -> its seqs

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> set[int]:
        """The items some sample waits for."""
        return set(self._by_item)

    def add(self, w: Waiting) -> list[Waiting]:
        """Hold ``w``; returns what the size bound pushed out (oldest first; ``w`` itself when the bound is 0)."""
        self._entries[self._seq] = w
        self._by_item.setdefault(w.item_id, []).append(self._seq)
        self._seq += 1
        out = []
        while len(self._entries) > self.max_samples:
            out.append(self._pop(next(iter(self._entries))))
        return out

    def release(self, has_vector: Callable[[int], bool]) -> list[Waiting]:
        """Take out every sample whose item now has a vector, in arrival order."""
        ready = [i for i in self._by_item if has_vector(i)]
        seqs = sorted(s for i in ready for s in self._by_item[i])
        return [self._pop(s) for s in seqs]

    def expired(self, now: float | None = None) -> list[Waiting]:
        """Take out every sample that waited ``max_age_s`` or longer (oldest first)."""
        t = self.clock() if now is None else now
        out = []
        for s, w in list(self._entries.items()):
            if t - w.since < self.max_age_s:
                break  # arrival order is age order (a restored buffer keeps its order)
            out.append(self._pop(s))
        return out

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds the oldest waiting sample has waited (0 when none waits)."""
        if not self._entries:
            return 0.0
        return (self.clock() if now is None else now) - next(iter(self._entries.values())).since

    def _pop(self, seq: int) -> Waiting:
        w = self._entries.pop(seq)
        seqs = self._by_item[w.item_id]
        seqs.remove(seq)
        if not seqs:
            del self._by_item[w.item_id]
        return w

    # checkpoint ---------------------------------------------------------------------------------

    def state(self) -> list[list[Any]]:
        """Plain values (a list per entry, in arrival order) for the checkpoint."""
        return [[*astuple(w)[:6], w.value.decode(), list(w.history)] for w in self._entries.values()]

    def restore(self, state: Iterable[list[Any]] | None) -> int:
        """Load a :meth:`state` (replacing what is held); returns how many samples it holds."""
        self._entries.clear()
        self._by_item.clear()
        for item, key, since, topic, part, off, value, hist in state or ():  # unbounded: nothing is pushed out
            w = Waiting(int(item), int(key), float(since), str(topic), int(part), int(off), str(value).encode(),
                        tuple(int(i) for i in hist))
            self._entries[self._seq] = w
            self._by_item.setdefault(w.item_id, []).append(self._seq)
            self._seq += 1
        return len(self._entries)


def waiting_sample(b: SampleBatch, s: Sample, key: int, since: float, origin: tuple[str, int, int],
                   history: list[int]) -> Waiting:
    """The entry of one sample of ``b`` that waits: its own one-sample batch (replayable as a dead letter),
    its message's ``origin`` (topic, partition, offset) and its request's history items."""
    one = encode(b.model_copy(update={"samples": [s]}))
    return Waiting(s.item_id, key, since, *origin, one, tuple(history))


def by_request(released: Iterable[Waiting], next_group: int) -> tuple[list[tuple[Waiting, SampleBatch, int]], int]:
    """Released entries with their one-sample batch and a rank-term group per request (numbered from
    ``next_group``, so released rows of one request are compared with each other); and the next free group."""
    groups: dict[str, int] = {}
    out: list[tuple[Waiting, SampleBatch, int]] = []
    for w in released:
        b = decode(w.value, SampleBatch)
        if b.request_id not in groups:
            groups[b.request_id], next_group = next_group, next_group + 1
        out.append((w, b, groups[b.request_id]))
    return out, next_group
