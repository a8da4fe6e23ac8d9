"""The one memory of pseudo-labels awaiting their real outcome, shared by the labeler and the monitor.

A pseudo-label is a claim about a (user, item) pair that was recalled but not shown. The stream
checks some claims later: the same item shown to the same user gets a real label. Two consumers
join claims with outcomes — the labeler's online recalibration (workers/labeler/recalibration.py,
which keeps each claim's logit) and the calibration monitor (workers/calibration.py, which keeps
p, weight, anchor group and version) — so the bookkeeping lives here once: a bounded LRU keyed by
(user, item), a newer claim replacing an older one, one outcome per claim (a join takes the claim
out), the oldest claims forgotten first when full. What a claim carries is the caller's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

Claim = TypeVar("Claim")


class OutcomeMemory(Generic[Claim]):
    """(user, item) → the latest claim, at most ``capacity`` of them; not thread-safe (callers lock)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._claims: OrderedDict[tuple[str, int], Claim] = OrderedDict()
        self.replaced = 0  # claims overwritten by a newer one for the same pair
        self.evicted = 0  # claims forgotten unjoined because the memory was full

    def __len__(self) -> int:
        return len(self._claims)

    def remember(self, user_id: str, item_id: int, claim: Claim) -> None:
        """Keep ``claim`` for the pair; a pair already held takes the newer claim and becomes the newest."""
        key = (user_id, int(item_id))
        claims = self._claims
        if key in claims:
            self.replaced += 1
            claims.move_to_end(key)
        claims[key] = claim
        while len(claims) > self.capacity:
            claims.popitem(last=False)
            self.evicted += 1

    def take(self, user_id: str, item_id: int) -> Claim | None:
        """The pair's claim, removed (one outcome per claim), or None when none is held."""
        return self._claims.pop((user_id, int(item_id)), None)
