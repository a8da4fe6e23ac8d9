"""The one offset ledger every stage commits through.

Stages finish messages out of order (read-ahead and priorities in the anchors worker, deferral in the
labeler, checkpoints in the trainer): committing "last finished + 1" would skip unfinished ones on a
restart. The ledger keeps, per partition, the offsets read but not finished, and its commit point is
the oldest of them — or one past the newest read when nothing is open.
"""

from __future__ import annotations

from collections.abc import Iterable

TP = tuple[str, int]  # (topic, partition)


class OffsetLedger:
    """Per partition: offsets read but not finished; the commit point is the oldest unfinished one."""

    def __init__(self) -> None:
        self._open: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}
        self._dirty: set[TP] = set()

    def read(self, tp: TP, offset: int) -> None:
        """A message was taken from the partition; it stays open until :meth:`done`."""
        self._open.setdefault(tp, set()).add(offset)
        if offset + 1 > self._next.get(tp, 0):
            self._next[tp] = offset + 1

    def done(self, tp: TP, offset: int) -> None:
        """The message's work is finished (its outputs may still need a flush before the commit)."""
        self._open.get(tp, set()).discard(offset)
        self._dirty.add(tp)

    def rewind(self, tp: TP, offset: int) -> None:
        """The partition was sought back to ``offset``: what was read from there on will be read again."""
        open_ = self._open.get(tp)
        if open_:
            open_.difference_update([o for o in open_ if o >= offset])
        if tp in self._next and self._next[tp] > offset:
            self._next[tp] = offset
        self._dirty.add(tp)

    def position(self, tp: TP) -> int:
        """Where a restart must resume this partition: the oldest open offset, else the next to read."""
        open_ = self._open.get(tp)
        return min(open_) if open_ else self._next.get(tp, 0)

    def pending(self, tp: TP | None = None) -> int:
        """Offsets read but not finished (of one partition, or of all)."""
        if tp is not None:
            return len(self._open.get(tp, ()))
        return sum(len(v) for v in self._open.values())

    def positions(self) -> dict[TP, int]:
        """The resume position of every partition the ledger has seen (what a checkpoint records)."""
        return {tp: self.position(tp) for tp in self._next}

    def committable(self, tps: Iterable[TP] | None = None) -> dict[TP, int]:
        """Positions of the partitions with finished work since the last call (or of ``tps``)."""
        chosen = set(self._dirty if tps is None else tps) & set(self._next)
        self._dirty -= chosen
        return {tp: self.position(tp) for tp in chosen}

    def forget(self, tps: Iterable[TP]) -> None:
        """Partitions handed to another consumer: their open work is the next owner's."""
        for tp in tps:
            self._open.pop(tp, None)
            self._next.pop(tp, None)
            self._dirty.discard(tp)
