"""The labeler's rules as a pure engine: which batch is labeled now, which waits, which is held, which ends.

Why apart from the loop (workers/labeler/loop.py): these rules decide what a crash re-reads and how much
memory the stage may take, and inside the Kafka loop they could only be tested through a broker. Here they
hold plain state — the deferred queue, the abstention hold, the micro-batch being gathered — and return
their decisions as values, in the style of streams/join_engine.py; labeling, producing, dead-lettering and
marking offsets done are the caller's (workers/labeler/stage.py, workers/labeler/loop.py).

* :meth:`LabelerEngine.take` admits one decoded ``unexposed`` batch: its user has anchors → the micro-batch
  (:meth:`LabelerEngine.full_batch` hands it over at ``MICRO_BATCH``, :meth:`LabelerEngine.drain` before any
  other message and at the end of a poll, as anchors and real labels change what a batch would get);
  no anchors → *deferred* for at most ``labeler.wait_for_anchors_s``; no anchors and ``labeler.max_deferred``
  batches already waiting → refused (not taken, not counted, ``paused``): the loop rewinds the partition to
  it and pauses it until :meth:`LabelerEngine.has_room`.
* :meth:`LabelerEngine.release` hands over a user's deferred batches, in order, when their anchors arrive;
  :meth:`LabelerEngine.expire` those past their wait (``timed_out``: their offsets may be committed).
* :meth:`LabelerEngine.abstain` holds a batch labeled while no calibrator is usable (``abstained``), at most
  ``labeler.keep_abstained``: it returns the oldest pushed past the bound, for ``unexposed.dlq`` (reason
  ``abstained``); :meth:`LabelerEngine.relabel` hands the held batches back, oldest first, once one loads.
* Commit rule: a batch's offset is marked done only when the caller performed its end (samples produced,
  dead-lettered, timed out); a deferred or held batch never is, so the commit (the oldest open offset of
  the partition, runtime/offsets.py) stops at it and a crash re-reads it. :meth:`LabelerEngine.let_go`
  forgets the waiting batches of revoked partitions (``released``: the next owner re-reads them) and
  :meth:`LabelerEngine.stop` all of them (``deferred_at_stop``, ``abstained_at_stop``).

Counts (``accounting``): ``in`` and ``candidates`` at intake, the passages ``deferred``, ``abstained``,
``relabelled``, ``paused``, and the ends decided here with their ``candidates_<end>``. :attr:`waiting` and
:attr:`waiting_candidates` are the batches and candidates still deferred or held, the part of the
labeler's accounting identities (workers/labeler/loop.py ``balance``) that is no end yet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from runtime.kafka import Accounting
from runtime.settings import LabelerSettings
from schemas.fast_codec import Unexposed
from workers.labeler.assemble import MICRO_BATCH


@dataclass(frozen=True, slots=True)
class Batch:
    """One decoded ``unexposed`` batch and where it was read (raw bytes kept for a dead letter)."""

    batch: Unexposed
    key: bytes | None
    raw: bytes
    partition: int
    offset: int
    source: Any = None  # the caller's handle of the message (its DLQ guard); never read here

    @property
    def user_id(self) -> str:
        return self.batch.user_id

    @property
    def candidates(self) -> int:
        return int(self.batch.item_ids.shape[0])


@dataclass(slots=True)
class _Deferred:
    """A batch waiting for anchors; ``done`` once it stopped waiting (the queues are cleared lazily)."""

    item: Batch
    deadline: float  # on the engine's clock
    done: bool = field(default=False)


class AbstainedHold:
    """The batches held while the labeler abstains, oldest first, at most ``bound`` of them."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._q: deque[Batch] = deque()
        self.candidates = 0  # candidates of the held batches (the accounting's "waiting" part)

    def __len__(self) -> int:
        return len(self._q)

    def hold(self, b: Batch) -> list[Batch]:
        """Keep ``b``; returns the oldest batches pushed past the bound (the caller dead-letters them)."""
        self._q.append(b)
        self.candidates += b.candidates
        over: list[Batch] = []
        while len(self._q) > self.bound:
            h = self._q.popleft()
            self.candidates -= h.candidates
            over.append(h)
        return over

    def take(self, partitions: Iterable[int] | None = None) -> list[Batch]:
        """Remove and return the held batches (all, or those of ``partitions``), oldest first."""
        parts = None if partitions is None else set(partitions)
        out = [h for h in self._q if parts is None or h.partition in parts]
        self._q = deque(h for h in self._q if parts is not None and h.partition not in parts)
        self.candidates -= sum(h.candidates for h in out)
        return out


class LabelerEngine:
    """The deferred queue, the abstention hold and the micro-batch; ``has_anchors`` asks the anchor cache."""

    def __init__(self, cfg: LabelerSettings, accounting: Accounting, has_anchors: Callable[[str], bool], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.accounting = accounting
        self.has_anchors = has_anchors
        self.clock = clock
        self.held = AbstainedHold(cfg.keep_abstained)
        self._pending: list[Batch] = []
        # deferred batches, two views of the same entries: by user (released together), by deadline (expiry)
        self._by_user: dict[str, deque[_Deferred]] = {}
        self._by_deadline: deque[_Deferred] = deque()  # arrival order = deadline order (one wait for all)
        self.deferred = 0
        self.deferred_candidates = 0

    # ------------------------------------------------------------------------------------- intake

    def take(self, b: Batch) -> bool:
        """Admit ``b``; False (not taken, not counted) when it must wait and ``max_deferred`` already do."""
        if not self.has_anchors(b.user_id):
            if not self.has_room():
                self.accounting.add("paused")
                return False
            self._count_in(b)
            d = _Deferred(b, self.clock() + self.cfg.wait_for_anchors_s)
            self._by_user.setdefault(b.user_id, deque()).append(d)
            self._by_deadline.append(d)
            self.deferred += 1
            self.deferred_candidates += b.candidates
            self.accounting.add("deferred")  # a passage: every deferral ends in another outcome
            return True
        self._count_in(b)
        self._pending.append(b)
        return True

    def full_batch(self) -> list[Batch]:
        """The gathered batches once ``MICRO_BATCH`` of them wait to be labeled together, else nothing."""
        return self.drain() if len(self._pending) >= MICRO_BATCH else []

    def drain(self) -> list[Batch]:
        """Every gathered batch, to be labeled now (before another message changes what they would get)."""
        out, self._pending = self._pending, []
        return out

    def has_room(self) -> bool:
        """Whether another batch may wait for anchors (a paused partition may be resumed)."""
        return self.deferred < self.cfg.max_deferred

    # ----------------------------------------------------------------------------------- deferral

    def release(self, user_id: str) -> list[Batch]:
        """The user's deferred batches, oldest first, to be labeled now: their anchors arrived."""
        out = []
        for d in self._by_user.pop(user_id, ()):
            if not d.done:
                self._end(d)
                out.append(d.item)
        return out

    def expire(self, now: float | None = None) -> list[Batch]:
        """The deferred batches past their wait, oldest first, counted ``timed_out`` (their offsets end)."""
        now = self.clock() if now is None else now
        q, out = self._by_deadline, []
        while q and (q[0].done or q[0].deadline <= now):
            d = q.popleft()
            if d.done:
                continue
            self._end(d)
            self.accounting.add("timed_out")
            self.accounting.add("candidates_timed_out", d.item.candidates)
            out.append(d.item)
            waiting = self._by_user.get(d.item.user_id)
            while waiting and waiting[0].done:  # per-user order is deadline order too
                waiting.popleft()
            if waiting is not None and not waiting:
                del self._by_user[d.item.user_id]
        return out

    def _end(self, d: _Deferred) -> None:
        d.done = True
        self.deferred -= 1
        self.deferred_candidates -= d.item.candidates

    # --------------------------------------------------------------------------------- abstention

    def abstain(self, b: Batch) -> list[Batch]:
        """Hold ``b`` for a calibrator; returns the oldest held batches pushed past ``keep_abstained``."""
        self.accounting.add("abstained")  # a passage: held, then relabelled, dead-lettered or given up
        self.accounting.add("candidates_abstained", b.candidates)
        return self.held.hold(b)

    def relabel(self) -> list[Batch]:
        """Every held batch, oldest first, to be labeled again (a calibrator loaded)."""
        out = self.held.take()
        self.accounting.add("relabelled", len(out))
        return out

    # --------------------------------------------------------------------------- giving work back

    def let_go(self, partitions: set[int]) -> int:
        """Forget the deferred and held batches of revoked ``partitions`` (``released``); how many."""
        gone = self._drop_deferred(partitions)
        gone += self.held.take(partitions)
        self._count_given_up("released", gone)
        return len(gone)

    def stop(self) -> int:
        """Forget every deferred and held batch (``deferred_at_stop``, ``abstained_at_stop``); how many."""
        deferred, held = self._drop_deferred(None), self.held.take()
        self._count_given_up("deferred_at_stop", deferred)
        self._count_given_up("abstained_at_stop", held)
        return len(deferred) + len(held)

    def _drop_deferred(self, partitions: set[int] | None) -> list[Batch]:
        gone = []
        for d in self._by_deadline:
            if not d.done and (partitions is None or d.item.partition in partitions):
                self._end(d)
                gone.append(d.item)
        self._by_deadline = deque(d for d in self._by_deadline if not d.done)
        by_user = ((u, deque(d for d in q if not d.done)) for u, q in self._by_user.items())
        self._by_user = {u: q for u, q in by_user if q}
        return gone

    def _count_given_up(self, outcome: str, gone: list[Batch]) -> None:
        """Batches given up uncommitted under ``outcome``: the next reader re-reads them."""
        self.accounting.add(outcome, len(gone))
        self.accounting.add(f"candidates_{outcome}", sum(b.candidates for b in gone))

    # ---------------------------------------------------------------------------------- reporting

    @property
    def waiting(self) -> int:
        """Batches deferred or held right now: read, counted ``in``, no end yet."""
        return self.deferred + len(self.held)

    @property
    def waiting_candidates(self) -> int:
        return self.deferred_candidates + self.held.candidates

    def _count_in(self, b: Batch) -> None:
        self.accounting.add("in")
        self.accounting.add("candidates", b.candidates)
