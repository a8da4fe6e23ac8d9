"""Which of a user's positives an anchor generator reads: the last ``n`` distinct ones, most recent last.

One rule for the streaming anchors worker and for ``gpl eval``, so the offline anchors are made from the
same kind of history the stream would use. Distinct because a re-clicked item says nothing new and
would crowd others out of a short prompt; most recent last because that is how the prompt lists them.
"""

from __future__ import annotations

from collections.abc import Iterable


def recent_distinct(items: Iterable[int], n: int) -> list[int]:
    """The last ``n`` distinct items of ``items`` (oldest first), keeping each item's latest position."""
    newest_first = list(dict.fromkeys(reversed(list(items))))[:n]
    return newest_first[::-1]
