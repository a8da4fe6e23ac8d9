"""The one offset ledger every stage commits through.

Stages finish messages out of order (read-ahead, priorities, deferral): committing "last finished + 1"
would skip unfinished ones on a restart. The ledger commits, per partition, up to the oldest offset
that is read but not finished.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition)


class OffsetLedger:
    """Per partition: offsets read but not finished; commits up to the oldest unfinished one.

    Read-ahead and priorities finish requests out of order; committing "last finished + 1" would skip
    the unfinished ones on a restart. ``position`` is the smallest open offset, or one past the largest
    read when nothing is open.
    """

    def __init__(self) -> None:
        self._open: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}
        self._dirty: set[TP] = set()

    def read(self, tp: TP, offset: int) -> None:
        self._open.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TP, offset: int) -> None:
        self._open.get(tp, set()).discard(offset)
        self._dirty.add(tp)

    def position(self, tp: TP) -> int:
        open_ = self._open.get(tp)
        return min(open_) if open_ else self._next.get(tp, 0)

    def committable(self, tps: Iterable[TP] | None = None) -> dict[TP, int]:
        """Positions of the partitions with finished work since the last call (or of ``tps``)."""
        chosen = set(self._dirty if tps is None else tps) & set(self._next)
        self._dirty -= chosen
        return {tp: self.position(tp) for tp in chosen}

    def forget(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._open.pop(tp, None)
            self._next.pop(tp, None)
            self._dirty.discard(tp)
