"""Replay recorded events onto the broker: a JSONL event file, or a time range of an existing topic.

Why: every dataset (the MovieLens simulation, a production export, a hand-written DLQ test) enters
the system the same way a live producer's events would, and an incident can be reproduced by copying
a time window of a topic into another one. Both keep each record's event time as its Kafka timestamp.

Order. A replay is deterministic: a JSONL file is produced items first, then its other events in
event-time order (a file not in that order is sorted, or refused when too large to sort in memory), with
a bounded wait for the stack's indexer in between (gpl/replay_order.py); a topic range in a fixed merge
order (see :func:`replay_topic`). The producer runs with one request in flight per connection,
so a retried send cannot overtake the next one and per-key order survives transient errors (about
half the throughput of the default on the embedded broker: ~8k instead of ~17k msg/s, measured here).

Pacing. ``speed=0`` sends as fast as possible. ``speed=s > 0`` reproduces the original gaps between
consecutive records' timestamps divided by ``s`` (``speed=60``: an hour of events in a minute); a
record whose timestamp is not after the previous one is sent at once, never reordered, and a record
without a timestamp (``ts`` <= 0, e.g. catalogue items) is never waited for. ``max_wait_s`` caps any
single wait, for data with idle gaps of years (MovieLens). Pacing changes timing only, never order.

Topics must exist (``gpl topics create``): a replay never lets the broker auto-create a topic with
another partition count; a topic copy may create its target with the source's count (``create_target``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import orjson
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka import Consumer as KafkaConsumer
from tqdm import tqdm

from gpl.replay_order import MAX_SORT_BYTES, ordered_events, scan, wait_for_indexer
from runtime.kafka import consumer, create_topics, producer
from runtime.settings import KafkaSettings, Settings
from schemas.events import recall_as_v2
from schemas.jsonl import JsonlEvent
from schemas.topics import spec

log = logging.getLogger(__name__)
# One request in flight: a retry cannot reorder records of one partition (see the module docstring).
_ORDERED = {"max.in.flight.requests.per.connection": 1}


class _Pacer:
    """Sleeps so that records leave with their original timestamp gaps divided by ``speed``."""

    def __init__(self, speed: float, max_wait_s: float | None) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0 (0: as fast as possible)")
        self.speed = speed
        self.max_wait_s = max_wait_s
        self._last_ts: int | None = None
        self._deadline = 0.0

    def wait(self, ts: int) -> None:
        if self.speed == 0 or ts <= 0:
            return
        now = time.monotonic()
        if self._last_ts is None:
            self._deadline = now
        else:
            gap = max(0, ts - self._last_ts) / 1000.0 / self.speed
            if self.max_wait_s is not None:
                gap = min(gap, self.max_wait_s)
            # a schedule, not a sleep per record: time spent producing is not added to the gaps
            self._deadline += gap
        self._last_ts = max(ts, self._last_ts or ts)
        delay = self._deadline - now
        if delay > 0:
            time.sleep(delay)


class _Sink:
    """A producer that counts deliveries per topic and raises if any record failed."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.producer: Producer = producer(kafka, **_ORDERED)
        self.delivered: Counter[str] = Counter()
        self.failed = 0
        self.first_error: KafkaError | None = None

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed += 1
            self.first_error = self.first_error or err
        else:
            self.delivered[msg.topic() or "?"] += 1

    def send(self, topic: str, value: bytes | None, key: bytes | None, ts: int, partition: int | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        kwargs: dict[str, object] = {"key": key, "on_delivery": self._on_delivery}
        if ts > 0:
            kwargs["timestamp"] = ts
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, value, **kwargs)  # type: ignore[arg-type]
                break
            except BufferError:  # local queue full: let deliveries drain, then retry the same record
                self.producer.poll(0.05)
        self.producer.poll(0)

    def close(self, timeout: float) -> dict[str, int]:
        left = self.producer.flush(timeout)
        if left:
            raise TimeoutError(f"{left} records still undelivered after {timeout}s")
        if self.failed:
            raise KafkaException(self.first_error) if self.first_error else RuntimeError("delivery failed")
        return dict(self.delivered)


def _existing_topics(kafka: KafkaSettings, timeout: float) -> dict[str, int]:
    """Topic -> partition count, from a metadata request that names no topic (so creates none)."""
    from confluent_kafka.admin import AdminClient

    md = AdminClient(kafka.client_config()).list_topics(timeout=timeout)
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def replay_jsonl(
    settings: Settings,
    path: Path | str,
    *,
    speed: float = 0.0,
    topics: set[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    max_wait_s: float | None = None,
    timeout_s: float = 60.0,
    index_wait_s: float = 300.0,
    max_sort_bytes: int = MAX_SORT_BYTES,
) -> dict[str, int]:
    """Produce every event of a JSONL file (schemas/jsonl.py) to its topic; return records per topic.

    Keys and timestamps come from schemas/jsonl (the topic's key field, ``value.ts``). ``topics``
    keeps only those topics. ``seed`` is accepted so callers can pass one seed to every stage; a
    replay uses no randomness (the order is fixed by the file), so it changes nothing.

    Order (gpl/replay_order.py): the file's ``items`` first, then its other events by ``value.ts``; a file
    not in that order is sorted in memory (logged) when it is at most ``max_sort_bytes``, else refused
    (ValueError, one line). When the file has both items and events, the replay waits up to
    ``index_wait_s`` (0: not at all) after the items until the stack's indexer has indexed them.
    """
    del seed  # nothing random here, see the docstring
    order = scan(path, topics)
    order.check(max_sort_bytes)
    existing = _existing_topics(settings.kafka, timeout_s)
    missing = sorted(spec(t).name for t in order.topics if spec(t).name not in existing)  # file: logical names
    if missing:  # before anything is sent
        raise ValueError(f"topic {missing[0]!r} does not exist; create it first (create_topics)")
    if order.disorder is not None:
        line, ts, before, later = order.disorder
        log.warning("replay: %s is not in event-time order (line %d: ts %d after ts %d on line %d); replaying its "
                    "events sorted by value.ts", path, line, ts, later, before)
    pacer = _Pacer(speed, max_wait_s)
    sink = _Sink(settings.kafka)
    items, rest = ordered_events(order, topics)

    def send(ev: JsonlEvent) -> None:
        pacer.wait(ev.ts)
        sink.send(spec(ev.topic).name, _recall_v2(ev.value) if ev.topic == "recall" else ev.value, ev.key, ev.ts)
        bar.update(1)

    with tqdm(total=order.items + order.events, desc=f"replay {Path(path).name}", unit="ev",
              disable=not progress) as bar:
        for ev in items:
            send(ev)
        if order.items and order.events and index_wait_s > 0:
            if sink.producer.flush(timeout_s):  # the items are on the broker before their end is measured
                raise TimeoutError(f"items still undelivered after {timeout_s}s")
            wait_for_indexer(settings.kafka, index_wait_s)
        for ev in rest:
            send(ev)
    return sink.close(timeout_s)


def _recall_v2(value: bytes) -> bytes:
    """Recall events go out as schema_version 2 (columns): a version 1 value is rewritten when that is
    exact (``schemas.events.recall_as_v2``); anything else is forwarded as it is, for the DLQ to judge."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    v2 = recall_as_v2(obj) if isinstance(obj, dict) else None
    return value if v2 is None else orjson.dumps(v2)


@dataclass
class _Record:
    partition: int
    offset: int
    ts: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None


def _timestamp(m: Message) -> int:
    kind, ts = m.timestamp()
    return -1 if kind == TIMESTAMP_NOT_AVAILABLE else int(ts)


def _read_one(c: KafkaConsumer, topic: str, partition: int, offset: int, timeout: float) -> Message | None:
    """The record at one offset (None if it cannot be read in time)."""
    c.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None or m.error() is not None:
                continue
            if m.partition() == partition and m.offset() == offset:
                return m
            if m.partition() == partition and (m.offset() or 0) > offset:
                return None  # the offset no longer exists (compaction, deletion)
        return None
    finally:
        c.unassign()


def _start_offset(c: KafkaConsumer, topic: str, partition: int, start_ms: int, low: int, high: int,
                  answer: int, timeout: float, check: bool = False) -> tuple[int, bool]:
    """Where a scan of one partition must begin for records at or after ``start_ms``; True if trusted.

    Kafka's contract: ``offsets_for_times`` names the *earliest* offset whose timestamp is at or after
    ``start_ms``, -1 when there is none. Without ``check`` (``kafka.check_time_lookup``) that answer is
    taken as it is. With it (the embedded profile: Tansu 0.6 answers 0 whatever the time, docs/design.md
    §5) the answer is trusted only if the record it names is at or after ``start_ms`` and the record before
    it is earlier; an answer that fails the check, or -1 (which cannot be checked without a scan), falls
    back to scanning from the low watermark.
    """
    if not check:
        return (min(max(answer, low), high) if answer >= 0 else high), True
    if answer < low or answer >= high:
        return low, False
    at = _read_one(c, topic, partition, answer, timeout)
    if at is None or _timestamp(at) < start_ms:
        return low, False
    if answer > low:
        before = _read_one(c, topic, partition, answer - 1, timeout)
        if before is None or _timestamp(before) >= start_ms:
            return low, False
    return answer, True


def replay_topic(
    settings: Settings,
    source_topic: str,
    target_topic: str,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    speed: float = 0.0,
    max_wait_s: float | None = None,
    progress: bool = True,
    max_buffered: int = 1000,
    timeout_s: float = 30.0,
    create_target: bool = False,
) -> dict[str, int]:
    """Copy the records of ``source_topic`` whose timestamp is in ``[start_ms, end_ms)`` to ``target_topic``.

    Key, value, headers and timestamp are copied; the partition too when both topics have the same
    partition count (else the target's partitioner places records by key). The source is read by a
    non-committing consumer with a unique group id that ``assign``s every partition, so no consumer
    group is disturbed and nothing is committed.

    Where: each partition starts at the broker's ``offsets_for_times`` answer when it passes a sanity
    check, else at its beginning (:func:`_start_offset`). Records whose timestamps are out of order
    (an exposure before its recall) can sit anywhere, so a partition is always read to its high
    watermark as it was when the replay began (records appended later are not part of the range).
    (A broker whose high watermark is inexact is the embedded profile's business: see
    ``EMBEDDED_PROFILE`` in runtime/broker.py.)

    Order: a k-way merge that always sends the earliest-timestamped head among the partitions, each
    partition's own order kept (so a user's events keep theirs); ties go to the lower partition. Every
    partition still being read must have a buffered head before one is sent, and a partition holding
    more than ``max_buffered`` records is paused, which bounds memory.

    ``create_target`` creates a missing target with the source's partition count (so partitions, and
    with them per-key order, are kept); without it a missing target is an error.

    Returns ``scanned`` (records read), ``copied``, ``partitions``, ``fallback_scans`` (partitions
    whose time lookup was not trusted) and ``created_target`` (1 when the target was created).
    """
    kafka = settings.kafka
    lo_ms = -1 if start_ms is None else start_ms
    hi_ms = None if end_ms is None else end_ms
    if hi_ms is not None and hi_ms <= lo_ms:
        raise ValueError("end_ms must be after start_ms")
    if source_topic == target_topic:
        raise ValueError("source and target must differ (the copy would land in the range it reads)")
    existing = _existing_topics(kafka, timeout_s)
    created = 0
    if create_target and source_topic in existing and target_topic not in existing:
        created = len(create_topics(kafka.model_copy(update={"partitions": existing[source_topic]}),
                                    [target_topic], timeout=timeout_s))
        existing[target_topic] = existing[source_topic]
    for t in (source_topic, target_topic):
        if t not in existing:
            raise ValueError(f"topic {t!r} does not exist; create it first (`gpl topics create {t}`)")
    n_parts = existing[source_topic]
    keep_partition = existing[target_topic] == n_parts
    pacer = _Pacer(speed, max_wait_s)

    c = consumer(kafka, f"replay-{uuid.uuid4().hex}", **{"enable.partition.eof": False})
    sink = _Sink(kafka)
    stats = Counter[str](partitions=n_parts)
    try:
        marks = {p: c.get_watermark_offsets(TopicPartition(source_topic, p), timeout=timeout_s)
                 for p in range(n_parts)}
        if any(m is None for m in marks.values()):
            raise TimeoutError(f"no watermarks for {source_topic!r} within {timeout_s}s")
        low = {p: int(m[0]) for p, m in marks.items() if m is not None}
        high = {p: int(m[1]) for p, m in marks.items() if m is not None}
        start = dict(low)
        if start_ms is not None:
            answers = c.offsets_for_times(
                [TopicPartition(source_topic, p, start_ms) for p in range(n_parts)], timeout=timeout_s)
            for tp in answers:
                if tp.error is not None:  # no answer for this partition: scan it
                    stats["fallback_scans"] += 1
                    continue
                start[tp.partition], trusted = _start_offset(
                    c, source_topic, tp.partition, start_ms, low[tp.partition], high[tp.partition],
                    tp.offset, timeout_s, kafka.check_time_lookup)
                stats["fallback_scans"] += not trusted

        live = {p for p in range(n_parts) if start[p] < high[p]}
        position = dict(start)
        buffers: dict[int, deque[_Record]] = {p: deque() for p in range(n_parts)}
        paused: set[int] = set()
        c.assign([TopicPartition(source_topic, p, start[p]) for p in sorted(live)])
        total = sum(high[p] - start[p] for p in live)
        with tqdm(total=total, desc=f"replay {source_topic}->{target_topic}", unit="rec",
                  disable=not progress) as bar:
            while True:
                _fill(c, source_topic, live, buffers, position, high, paused, lo_ms, hi_ms, max_buffered,
                      stats, bar, timeout_s)
                heads = [p for p in range(n_parts) if buffers[p]]
                if not heads:
                    break
                p = min(heads, key=lambda q: (buffers[q][0].ts, q))
                rec = buffers[p].popleft()
                pacer.wait(rec.ts)
                sink.send(target_topic, rec.value, rec.key, rec.ts,
                          partition=rec.partition if keep_partition else None, headers=rec.headers)
                stats["copied"] += 1
        delivered = sink.close(timeout_s)
        if delivered.get(target_topic, 0) != stats["copied"]:
            raise RuntimeError(f"copied {stats['copied']} but {delivered.get(target_topic, 0)} delivered")
    finally:
        c.close()
    return {"scanned": stats["scanned"], "copied": stats["copied"], "partitions": n_parts,
            "fallback_scans": stats["fallback_scans"], "created_target": created}


def _fill(
    c: KafkaConsumer,
    topic: str,
    live: set[int],
    buffers: dict[int, deque[_Record]],
    position: dict[int, int],
    high: dict[int, int],
    paused: set[int],
    lo_ms: int,
    hi_ms: int | None,
    max_buffered: int,
    stats: Counter[str],
    bar: tqdm,
    timeout_s: float,
) -> None:
    """Consume until every partition still being read has a buffered in-range head (or is finished)."""
    last_progress = time.monotonic()
    while True:
        starving = [p for p in live if not buffers[p]]
        if not starving:
            return
        resume = [p for p in starving if p in paused]
        if resume:
            c.resume([TopicPartition(topic, p) for p in resume])
            paused.difference_update(resume)
        msgs = c.consume(500, timeout=0.2)
        if not msgs:
            if time.monotonic() - last_progress > timeout_s:
                raise TimeoutError(
                    f"{topic}: no records for {timeout_s}s while partitions {sorted(live)} are below their "
                    f"high watermarks (positions {position}, watermarks {high})")
            continue
        last_progress = time.monotonic()
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            p, off = m.partition(), m.offset()
            if p is None or off is None or p not in live or off < position[p]:
                continue  # a partition already finished, or a record seen before
            position[p] = off + 1
            stats["scanned"] += 1
            bar.update(1)
            ts = _timestamp(m)
            if ts >= lo_ms and (hi_ms is None or ts < hi_ms):
                buffers[p].append(_Record(p, off, ts, m.key(), m.value(), _headers(m)))
            if position[p] >= high[p]:
                live.discard(p)
        full = [p for p in live if len(buffers[p]) >= max_buffered and p not in paused]
        if full:
            c.pause([TopicPartition(topic, p) for p in full])
            paused.update(full)


def _headers(m: Message) -> list[tuple[str, bytes]] | None:
    h = m.headers()
    if not h:
        return None
    pairs = list(h.items()) if isinstance(h, dict) else h  # consumed records carry a list of pairs
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in pairs]
