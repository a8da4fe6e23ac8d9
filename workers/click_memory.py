"""The trainer's memory of each user's recent clicks: what the pre-ranker's history input is built from.

Why a memory of its own: the pre-ranker's history input (:func:`workers.history.history_profile`) is the
user's last ``n`` distinct clicked items *before* the request, and the trainer is the one stage that sees
every real label in order. Clicks are kept with their event time, and a batch asks for the clicks strictly
before its own ``ts``: a pseudo-label batch that arrives after a later request's real labels still gets
the history its request had, so a training row never sees its own click or a later one (serving cannot).

Bounded: per user the last ``2n`` distinct clicked items (a late batch can look a little into the past),
and at most ``max_users`` users, least recently clicking first out. Saved in every checkpoint, so a
restart keeps the histories it had.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from workers.history import recent_distinct


class ClickMemory:
    """Per user: (ts, item) of the most recent clicks, distinct by item (an item's latest click kept)."""

    def __init__(self, n: int, max_users: int = 200_000) -> None:
        if n < 1:
            raise ValueError("a click memory needs n >= 1")
        self.n = n
        self.keep = 2 * n
        self.max_users = max_users
        self._users: OrderedDict[str, list[tuple[int, int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._users)

    def before(self, user_id: str, ts: int) -> list[int]:
        """The user's last ``n`` distinct items clicked strictly before ``ts`` (oldest first)."""
        clicks = self._users.get(user_id)
        if not clicks:
            return []
        return recent_distinct([i for t, i in clicks if t < ts], self.n)

    def add(self, user_id: str, ts: int, items: list[int]) -> None:
        """Remember ``items`` as clicked at ``ts`` (in any arrival order: kept sorted by time)."""
        if not items:
            return
        clicks = self._users.pop(user_id, [])
        latest = {i: t for t, i in clicks}
        for i in items:
            latest[int(i)] = max(latest.get(int(i), ts), ts)
        merged = sorted(((t, i) for i, t in latest.items()), key=lambda x: (x[0], x[1]))
        self._users[user_id] = merged[-self.keep:]
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)

    def state(self) -> dict[str, Any]:
        """Plain lists only (checkpoints are loaded with ``weights_only``)."""
        clicks = [[[t, i] for t, i in c] for c in self._users.values()]
        return {"n": self.n, "users": list(self._users), "clicks": clicks}

    def restore(self, state: dict[str, Any] | None) -> None:
        self._users.clear()
        if state:
            for u, c in zip(state["users"], state["clicks"], strict=True):
                self._users[str(u)] = [(int(t), int(i)) for t, i in c][-self.keep:]


__all__ = ["ClickMemory"]
