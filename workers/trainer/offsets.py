"""Where the trainer starts each partition and what it commits: its checkpoint decides, not the group.

Split out of ``workers/trainer/loop.py`` (the loop) because these are the rules a restart depends on, read
in one place: a partition the checkpoint knows starts at the checkpoint's offset; a start past the
partition's end (topic recreated, broker data lost) is reset to its beginning, loudly; and the commit
after a checkpoint covers only the checkpoint's offsets of the partitions still held. The group
client is whatever the stage's I/O hands the rebalance callbacks (confluent-kafka's, or the in-memory
twin's: runtime/stage_io_memory.py).
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from runtime.kafka import ask_broker
from runtime.offsets import TP
from runtime.stage_port import GroupClient
from workers.trainer.metrics import OFFSET_RESETS

log = logging.getLogger("workers.trainer")  # the stage's own logger name, as before the split
Reset = tuple[str, int, int, int]  # (topic, partition, from, to)


def start_at_checkpoint(partitions: list[TopicPartition], durable: dict[TP, int]) -> None:
    """Set every partition the checkpoint knows to start at the checkpoint's offset (not the committed one)."""
    for tp in partitions:
        off = durable.get((tp.topic, tp.partition))
        if off is not None:
            tp.offset = off


def reset_past_end(c: Any, partitions: list[TopicPartition], stage: str) -> list[Reset]:
    """Policy for a start offset past the partition's end: reset to its beginning, loudly.

    The checkpoint (or the group's commit) says "next is offset 500" but the partition ends at 206:
    the topic was deleted and recreated, or the broker lost its data (the embedded broker in memory
    mode, restarted). Kafka would wait at 500 forever and the trainer would silently train none of
    the new batches. Reading the partition from its beginning instead trains them; anything that
    was already trained is dropped by the seen-set (sample ids are deterministic). Logged as an
    ERROR and counted in ``gpl_offset_resets_total{stage,topic}``; the resets are returned (the
    caller moves its own offsets to them).

    Called in the rebalance callback, where a broker error would end the stage: a partition without a
    leader for a moment (a paused or restarting broker) is asked again (:func:`ask_broker`).
    """
    implicit = [TopicPartition(tp.topic, tp.partition) for tp in partitions if tp.offset < 0]
    committed = {}
    if implicit:
        answer = ask_broker(lambda: c.committed(implicit, timeout=10), f"{stage}: committed offsets")
        committed = {(tp.topic, tp.partition): tp.offset for tp in answer}
    resets: list[Reset] = []
    for tp in partitions:
        start = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
        if start < 0:
            continue  # nothing committed: auto.offset.reset decides
        where = TopicPartition(tp.topic, tp.partition)
        low, high = ask_broker(lambda: c.get_watermark_offsets(where, timeout=10),  # noqa: B023 - called at once
                               f"{stage}: end of {tp.topic}[{tp.partition}]")
        if start <= high:
            continue
        log.error("%s: %s[%d] starts at offset %d but the partition ends at %d (topic recreated or broker "
                  "data lost): resetting to its beginning (%d); already-trained samples are deduplicated",
                  stage, tp.topic, tp.partition, start, high, low)
        OFFSET_RESETS.labels(stage=stage, topic=tp.topic).inc()
        resets.append((tp.topic, tp.partition, start, low))
        tp.offset = low
    return resets


def commit_durable(c: GroupClient | None, durable: dict[TP, int], version: int) -> None:
    """Commit the durable offsets of the partitions held; a failure is only logged.

    The checkpoint, not the commit, decides where a restart resumes, so a lost commit costs nothing.
    """
    if c is None or not durable:
        return
    try:
        held = {(tp.topic, tp.partition) for tp in c.assignment()}
        tps = [TopicPartition(t, p, o) for (t, p), o in durable.items() if (t, p) in held]
        if tps:
            c.commit(offsets=tps, asynchronous=False)
    except KafkaException as e:
        log.warning("trainer: offset commit failed (checkpoint %d is durable): %s", version, e)
