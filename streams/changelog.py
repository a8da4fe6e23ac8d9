"""A faust table whose changelog writes are coalesced per key: write-behind, as Kafka Streams' record cache.

faust sends one changelog record for every ``table[key] = value``. The join table writes each request two or
three times within a second or so (the recall waits with its 1,000 candidates, then the marker replaces it
when the exposure comes, later the marker is forgotten), and each write is a produce through the broker: on
the embedded broker, where every record is its own batch, those writes were most of the streams stage's
produce traffic and most of the bytes (a waiting recall is ~12 kB; its marker ~60 B). :class:`CoalescingTable`
keeps the table itself exact (the in-memory store is written at once) and sends only each key's *latest*
value when it flushes, so a request that joins within the window costs one small changelog record, not a
12 kB one and then a small one.

Why nothing is lost: faust flushes its producer and only then commits input offsets; the project's
transport (streams/transport.py) calls :meth:`StreamsProcessor.before_commit`, which flushes these tables,
first. So a committed input offset always has its table writes in the changelog before it. Writes not yet
flushed when a worker dies belong to inputs past the committed offset: those inputs are read again after the
restart and make the same writes (a re-read recognised by its offset is then still skipped as before, and
only where its record did reach the changelog). On a rebalance the revoked partitions' writes are flushed and
the producer drained before the partitions are given up, so the next owner recovers them. The agent also
flushes when the oldest pending write is ``coalesce_ms`` old or ``max_dirty`` keys wait, which bounds both
the window and the burst a commit sends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import faust


class CoalescingTable(faust.Table):
    """A table whose changelog gets each key's latest value at :meth:`flush_changelog`, not every write."""

    def __init__(self, app: Any, *, coalesce_ms: int = 0, max_dirty: int = 4096, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.coalesce_s = coalesce_ms / 1000
        self.max_dirty = max_dirty
        self._dirty: dict[Any, int] = {}  # key -> changelog partition (its event's), in order of first write
        self._dirty_since = 0.0  # monotonic time of the oldest write not yet sent

    @property
    def dirty(self) -> int:
        """Keys written since the last flush (their changelog record not sent yet)."""
        return len(self._dirty)

    def on_key_set(self, key: Any, value: Any) -> None:
        if self.coalesce_s <= 0:  # off: faust's own behaviour, one changelog record per write
            super().on_key_set(key, value)
        else:
            self._remember(key)

    def on_key_del(self, key: Any) -> None:
        if self.coalesce_s <= 0:
            super().on_key_del(key)
        else:
            self._remember(key)

    def _remember(self, key: Any) -> None:
        """Called before the store is written (faust's order): only the key and its partition are kept; the
        value is read from the store when the changelog record is sent."""
        partition = self.partition_for_key(key)  # the current event's partition: raises outside an agent
        assert partition is not None, "a coalescing table needs use_partitioner=False"
        if not self._dirty:
            self._dirty_since = time.monotonic()
        self._dirty[key] = partition

    def flush_due(self) -> bool:
        """Whether the agent should flush now: the window has passed or too many keys wait."""
        return bool(self._dirty) and (len(self._dirty) >= self.max_dirty
                                      or time.monotonic() - self._dirty_since >= self.coalesce_s)

    def flush_changelog(self, partitions: Iterable[int] | None = None) -> int:
        """Send the latest value (or a tombstone) of every key written since the last flush, or only of
        those of ``partitions``; returns how many records were handed to the producer."""
        only = None if partitions is None else set(partitions)
        sent = 0
        for key, partition in list(self._dirty.items()):
            if only is None or partition in only:
                del self._dirty[key]
                self._send(key, partition)
                sent += 1
        if self._dirty:
            self._dirty_since = time.monotonic()  # conservative: the rest waits at most one more window
        return sent

    def _send(self, key: Any, partition: int) -> None:
        value = self.data.get(key)
        if value is None:
            self.send_changelog(partition, key, value=None, value_serializer="raw")
            self._maybe_del_key_ttl(key, partition)
            self._sensor_on_del(self, key)
        else:
            self.send_changelog(partition, key, value)
            self._maybe_set_key_ttl(key, partition)
            self._sensor_on_set(self, key, value)
