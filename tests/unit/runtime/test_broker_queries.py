"""Broker queries in rebalance callbacks ride out a partition without a leader (issue 21, the broker stop).

The chaos suite's broker stop on Apache Kafka: as the broker came back its partitions had no leader for a
moment; the trainer's group rebalanced then, its ``on_assign`` asked for a partition's end, got
NOT_LEADER_FOR_PARTITION, and the exception left librdkafka's poll and ended the stage. The fault is a race
on a real broker, so here the group client is the in-memory twin's (runtime/stage_io_memory.py), told
to answer "no leader" to its next queries.
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from runtime.kafka import ask_broker
from runtime.stage_io_memory import MemoryConsumer, MemoryTopics
from workers.trainer.offsets import reset_past_end


def _client(leaderless: int) -> MemoryConsumer:
    topics = MemoryTopics()
    for _ in range(5):
        topics.append("samples", b"{}", key=b"u", partition=0)
    c = MemoryConsumer(topics, "gpl-trainer")
    c.leaderless = leaderless
    return c


def test_a_start_past_the_end_is_found_through_a_moment_without_leader() -> None:
    c = _client(leaderless=2)
    at_checkpoint = [TopicPartition("samples", 0, 9)]  # the checkpoint says 9; the partition ends at 5
    assert reset_past_end(c, at_checkpoint, "trainer") == [("samples", 0, 9, 0)]
    assert c.leaderless == 0 and at_checkpoint[0].offset == 0


def test_only_not_now_is_asked_again_and_only_for_a_while() -> None:
    calls: list[int] = []

    def refused() -> int:
        calls.append(1)
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    with pytest.raises(KafkaException):
        ask_broker(refused, "test", every_s=0)
    assert len(calls) == 1  # not a transient answer: raised at once

    def leaderless() -> int:
        calls.append(1)
        raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))

    with pytest.raises(KafkaException):
        ask_broker(leaderless, "test", for_s=0.05, every_s=0.01)
    assert len(calls) > 2  # asked again until for_s, then raised
