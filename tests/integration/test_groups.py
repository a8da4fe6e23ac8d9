"""``gpl groups lag`` and ``gpl groups reset`` on the session's Apache Kafka broker: lag per partition, a
reset that is a dry run until ``--yes``, to earliest, latest or a time, refused while the group has members."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import TopicPartition

from gpl.cli import main
from gpl.commands.groups import committed
from runtime.kafka import consumer, create_topics, producer
from runtime.settings import Settings
from tests.fixtures.brokers import KafkaSlot
from tests.fixtures.settings import make_settings
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
TOPIC = "recall"  # any registry topic; raw bytes are enough here


def _setup(tmp_path: Path, kafka: KafkaSlot) -> Settings:
    """One partition, ten records at event times 1000..10000 ms, and group ``<ns>-g1`` committed at 6."""
    s = make_settings(tmp_path, kafka, partitions=1)
    create_topics(s.kafka, [TOPIC])
    p = producer(s.kafka)
    for i in range(10):
        p.produce(TOPIC, b"x", key=b"u", timestamp=1000 * (i + 1))
    assert p.flush(10) == 0
    c = consumer(s.kafka, "g1")
    c.assign([TopicPartition(TOPIC, 0, 0)])
    got = 0
    deadline = time.monotonic() + 30
    while got < 6 and time.monotonic() < deadline:
        got += sum(m.error() is None for m in c.consume(6 - got, timeout=1))
    c.commit(offsets=[TopicPartition(TOPIC, 0, 6)], asynchronous=False)
    c.close()
    return s


def _cli(s: Settings, *argv: str) -> int:
    return main(["--set", f"kafka.group_prefix={s.kafka.group_prefix}", *argv, "--bootstrap",
                 s.kafka.bootstrap_servers])


def test_lag_and_a_reset_that_is_dry_until_yes(tmp_path: Path, kafka: KafkaSlot,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    s = _setup(tmp_path, kafka)
    group = f"{s.kafka.group_prefix}-g1"
    assert _cli(s, "groups", "lag", "--json") == 0  # the stack's groups: found by kafka.group_prefix
    rows = orjson.loads(capsys.readouterr().out)
    assert rows == [{"group": group, "topic": TOPIC, "partition": 0, "committed": 6, "end": 10, "lag": 4}]

    assert _cli(s, "groups", "reset", group, "--to", "earliest") == 0  # dry run: plan only
    out = capsys.readouterr().out
    assert "dry run" in out and committed(s.kafka, group) == {(TOPIC, 0): 6}

    assert _cli(s, "groups", "reset", group, "--to", "timestamp", "--ts", "3000", "--yes") == 0
    assert committed(s.kafka, group) == {(TOPIC, 0): 2}  # the first record at or after 3000 ms
    assert _cli(s, "groups", "reset", group, "--to", "latest", "--yes") == 0
    assert committed(s.kafka, group) == {(TOPIC, 0): 10}
    assert _cli(s, "groups", "reset", group, "--to", "earliest", "--topic", "recall", "--yes") == 0
    assert committed(s.kafka, group) == {(TOPIC, 0): 0}
    capsys.readouterr()
    assert _cli(s, "groups", "reset", group, "--to", "timestamp") == 2  # --ts missing: one line
    assert "--ts MS" in capsys.readouterr().err


def test_reset_is_refused_while_the_group_has_members(tmp_path: Path, kafka: KafkaSlot,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    s = _setup(tmp_path, kafka)
    group = f"{s.kafka.group_prefix}-g1"
    member = consumer(s.kafka, "g1")
    member.subscribe([TOPIC])
    try:
        wait_for(lambda: bool(member.consume(1, timeout=0.5) or member.assignment()), 60, "the member to join")
        assert _cli(s, "groups", "reset", group, "--to", "earliest", "--yes") == 2
        err = capsys.readouterr().err
        assert "active member" in err and len(err.strip().splitlines()) == 1, err
        assert committed(s.kafka, group) == {(TOPIC, 0): 6}
    finally:
        member.close()
