"""The order a JSONL file is replayed in: its ``items`` first, then its events in event-time order.

Why: a foreign file (a public data set converted to the event format) is often ordered by user, not
time. Replayed in file order, each user's later requests advance the streams' watermark past every
other user's earlier ones, which then expire unjoined, silently. And items interleaved with (or
after) the events race the indexer: the events' samples reach the trainer before their items have
vectors.

So :func:`ordered_events` yields the file's ``items`` events first (file order; they carry no event
time), then every other event stably sorted by ``value.ts``. A line without a timestamp (``ts`` <= 0:
a raw payload kept for a DLQ test) sorts with the timed line before it, so it keeps its place. A file
already in event-time order is streamed as it is, twice (items, then the rest); one that is not is
held in memory to sort it, up to ``max_sort_bytes`` of file, else refused with a one-line hint
(:class:`FileOrder.check`).

Between the two parts the replay waits (bounded) until the stack's indexer has indexed the items
(:func:`wait_for_indexer`): it watches the indexer's consumer group, which commits an ``items`` offset
only after the items before it are upserted, so a committed offset at the topic's end means "indexed".
That needs only the broker the replay writes to, whatever vector index the stack uses.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import TopicPartition

from runtime.kafka import consumer
from runtime.settings import KafkaSettings
from schemas.jsonl import JsonlEvent, read_events
from schemas.topics import ITEMS

log = logging.getLogger(__name__)
MAX_SORT_BYTES = 1 << 30  # a file not in event-time order is sorted in memory up to this size
INDEXER_GROUP = "indexer"  # the indexer's consumer group (workers/indexer.py STAGE), under kafka.group_prefix


@dataclass
class FileOrder:
    """What one pass over the file found: how many events of each part, and the first line out of order."""

    path: Path
    items: int = 0
    events: int = 0
    topics: set[str] = field(default_factory=set)
    disorder: tuple[int, int, int, int] | None = None  # (line, ts, earlier line, its later ts)

    @property
    def sorted(self) -> bool:
        return self.disorder is None

    def check(self, max_sort_bytes: int = MAX_SORT_BYTES) -> None:
        """Raise (one line, with the remedy) if the file must be sorted but is too large to sort in memory."""
        size = os.path.getsize(self.path)
        if self.disorder is not None and size > max_sort_bytes:
            line, ts, before, later = self.disorder
            raise ValueError(
                f"{self.path} is not in event-time order (line {line}: ts {ts} after ts {later} on line {before}) "
                f"and too large to sort in memory ({size} bytes > {max_sort_bytes}): sort its lines by value.ts "
                f"(items first) and replay the sorted file")


def scan(path: Path | str, topics: set[str] | None = None) -> FileOrder:
    """One pass: count the ``items`` and other events (of ``topics``) and find the first event out of order."""
    order = FileOrder(Path(path))
    last_ts, last_line = 0, 0
    for ev in _kept(path, topics):
        order.topics.add(ev.topic)
        if ev.topic == ITEMS.logical:
            order.items += 1
            continue
        order.events += 1
        if ev.ts <= 0:
            continue
        if ev.ts < last_ts and order.disorder is None:
            order.disorder = (ev.line, ev.ts, last_line, last_ts)
        if ev.ts >= last_ts:
            last_ts, last_line = ev.ts, ev.line
    return order


def ordered_events(order: FileOrder, topics: set[str] | None = None
                   ) -> tuple[Iterator[JsonlEvent], Iterator[JsonlEvent]]:
    """(the items, the other events in event-time order) of a scanned file; see the module docstring."""
    items = (ev for ev in _kept(order.path, topics) if ev.topic == ITEMS.logical)
    rest = (ev for ev in _kept(order.path, topics) if ev.topic != ITEMS.logical)
    if order.sorted:
        return items, rest
    keyed: list[tuple[int, int, JsonlEvent]] = []
    last = 0
    for n, ev in enumerate(rest):
        last = ev.ts if ev.ts > 0 else last  # an untimed line sorts with the timed line before it
        keyed.append((last, n, ev))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return items, (ev for _, _, ev in keyed)


def _kept(path: Path | str, topics: set[str] | None) -> Iterator[JsonlEvent]:
    return (ev for ev in read_events(path) if topics is None or ev.topic in topics)


def wait_for_indexer(kafka: KafkaSettings, timeout_s: float, *, poll_s: float = 0.5) -> bool:
    """Wait until the indexer's group has committed every ``items`` partition to its current end; False
    (and a warning that says what it means) if ``timeout_s`` passed first.

    Reads the group's committed offsets (an OffsetFetch) with a consumer that never subscribes, so it
    never joins or rebalances the group.
    """
    c = consumer(kafka, INDEXER_GROUP)
    group = f"{kafka.group_prefix}-{INDEXER_GROUP}"
    try:
        meta = c.list_topics(ITEMS.name, timeout=10).topics[ITEMS.name]
        tps = [TopicPartition(ITEMS.name, p) for p in sorted(meta.partitions)]
        high = {tp.partition: int(c.get_watermark_offsets(tp, timeout=10)[1]) for tp in tps}
        total = sum(high.values())
        deadline = time.monotonic() + timeout_s
        log.info("replay: waiting up to %.0fs for the indexer (group %s) to index the items before the events",
                 timeout_s, group)
        while True:
            done = {tp.partition: max(int(tp.offset), 0) for tp in c.committed(tps, timeout=10)}
            left = sum(max(0, high[p] - done.get(p, 0)) for p in high)
            if left == 0:
                return True
            if time.monotonic() >= deadline:
                log.warning(
                    "replay: the indexer (group %s) has not indexed %d of the %d item records after %.0fs; replaying "
                    "the events anyway: their samples wait in the trainer for the vectors (bounded, then samples.dlq "
                    "no_vector). Is the indexer stage running (gpl up --stages all)?", group, left, total, timeout_s)
                return False
            time.sleep(poll_s)
    finally:
        c.close()
