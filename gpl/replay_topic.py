"""``gpl replay --topic SRC --to DST``: copy a time range of one topic into another, in a fixed merge order.

Why: an incident is reproduced by copying a time window of a topic into another one, which the stages
(or a test) then read as if it were live; each record keeps its key, value, headers, timestamp and,
where the partition counts agree, its partition. Kept apart from the file replay (gpl/replay.py)
because it is the reading half that differs: finding where a time range starts in each partition
(the broker's time lookup, checked where the broker is known to answer wrongly) and merging the
partitions by timestamp with bounded memory. Sending is shared (gpl/replay_producer.py).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka import Consumer as KafkaConsumer
from tqdm import tqdm

from gpl.replay_producer import Pacer, Sink, existing_topics
from runtime.kafka import consumer, create_topics
from runtime.settings import Settings


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
    existing = existing_topics(kafka, timeout_s)
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
    pacer = Pacer(speed, max_wait_s)

    c = consumer(kafka, f"replay-{uuid.uuid4().hex}", **{"enable.partition.eof": False})
    sink = Sink(kafka)
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
