"""``gpl dlq show`` and ``gpl dlq redrive`` on the suite's real broker (Apache Kafka; TEST_BROKER=embedded for Tansu).

Dead letters are written by the stages' own :class:`~runtime.kafka.DeadLetters` (the same bytes a
stage writes), then shown, filtered, redriven in a dry run (nothing sent, nothing committed), redriven
for real (original bytes and key back on the origin topic) and redriven again (nothing twice).
"""

from __future__ import annotations

import base64
import time

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from gpl.cli import main
from gpl.commands.dlq import preview, recent, redrive
from runtime.kafka import Accounting, DeadLetters, consumer, producer
from runtime.settings import Settings
from schemas.codec import DecodeError
from schemas.wire import frame


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings


pytestmark = pytest.mark.integration

BAD = [
    (b"u1", b'{"request_id": "r1", "user_id": "u1", "ts": 1, "candidates": [', "malformed_json"),
    (b"u2", b'{"request_id": "r2", "user_id": "u2", "ts": -1, "candidates": []}', "schema"),
    (b"u3", b'{"request_id": "r3", "user_id": "u3", "ts": 2, "candidates": [{"item_id": 77}]}', "unknown_items"),
    (b"u4", frame(9, b'{"request_id": "r4"}'), "schema_registry"),
]


def dead_letter_all(settings: Settings) -> None:
    p = producer(settings.kafka)
    dlq = DeadLetters(p, "streams", Accounting("test"))
    for i, (key, value, reason) in enumerate(BAD):
        dlq.send_raw("recall", i % 2, 100 + i, key, value, DecodeError(reason, f"bad input number {i}"))
    assert p.flush(10) == 0


def read_raw(settings: Settings, topic: str, expect: int, timeout: float = 20.0) -> list[tuple[bytes | None, bytes]]:
    c = consumer(settings.kafka, f"raw-{time.monotonic_ns()}")
    c.subscribe([topic])
    out: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(out) < expect:
            for m in c.consume(100, timeout=0.3):
                if m.error() is None:
                    out.append((m.key(), m.value() or b""))
        time.sleep(0.5)  # and nothing more arrives
        out.extend((m.key(), m.value() or b"") for m in c.consume(100, timeout=0.5) if m.error() is None)
    finally:
        c.close()
    return out


def end_offsets(settings: Settings, topic: str) -> int:
    c = consumer(settings.kafka, f"wm-{time.monotonic_ns()}")
    try:
        for _ in range(50):  # a partition's leader may still be loading it just after the topic was created
            try:
                return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                           for p in range(settings.kafka.partitions))
            except KafkaException as e:
                if e.args[0].code() != KafkaError.NOT_LEADER_FOR_PARTITION:
                    raise
                time.sleep(0.1)
        raise AssertionError(f"no leader for {topic} after 5 s")
    finally:
        c.close()


def cli(settings: Settings, *args: str) -> int:
    """``gpl dlq ARGS`` on the test's broker, its consumer groups under the test's prefix (the session's
    Kafka broker is shared: tests/fixtures/brokers.py)."""
    return main(["--set", f"kafka.bootstrap_servers={settings.kafka.bootstrap_servers}",
                 "--set", f"kafka.partitions={settings.kafka.partitions}",
                 "--set", f"kafka.group_prefix={settings.kafka.group_prefix}", "dlq", *args])


def test_show_lists_filters_and_previews(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    dead_letter_all(settings)
    letters = recent(settings, "recall.dlq")
    assert sorted(x.letter.reason for x in letters if x.letter) == sorted(r for _, _, r in BAD)
    assert [x.letter.reason for x in recent(settings, "recall.dlq", reason="schema") if x.letter] == ["schema"]
    assert len(recent(settings, "recall.dlq", limit=2)) == 2

    assert cli(settings, "show", "recall", "--json") == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(BAD)
    by_reason = {r["reason"]: r for r in rows}
    assert by_reason["unknown_items"]["offset"] == 102 and by_reason["unknown_items"]["topic"] == "recall"
    assert by_reason["unknown_items"]["partition"] == 0 and by_reason["unknown_items"]["error"] == "bad input number 2"
    assert base64.b64decode(by_reason["schema"]["value"]) == BAD[1][1]
    assert by_reason["schema_registry"]["preview"].startswith('[schema 9] {"request_id": "r4"}')

    assert cli(settings, "show", "recall.dlq", "--reason", "malformed_json") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["time", "(UTC)", "reason"] and len(table) == 2
    assert "malformed_json" in table[1] and "recall[0]@100" in table[1] and "bad input number 0" in table[1]
    assert preview(base64.b64encode(b"x" * 100).decode(), 10) == "x" * 9 + "…"
    assert cli(settings, "show", "nope") == 2
    assert main(["dlq", "show", "recall"]) == 2 and "bootstrap_servers" in capsys.readouterr().err


def test_redrive_dry_run_then_once(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    dead_letter_all(settings)
    before = end_offsets(settings, "recall")

    dry = redrive(settings, "recall.dlq", "schema")
    assert (dry["scanned"], dry["matched"], dry["redriven"]) == (4, 1, 0)
    assert end_offsets(settings, "recall") == before  # a dry run sends nothing ...
    assert redrive(settings, "recall.dlq", "schema")["matched"] == 1  # ... and commits nothing

    assert cli(settings, "redrive", "recall", "--reason", "schema", "--yes") == 0
    counts = orjson.loads(capsys.readouterr().out)
    assert counts["redriven"] == 1 and counts["dry_run"] is False and counts["reason:schema"] == 1
    assert read_raw(settings, "recall", 1) == [(b"u2", BAD[1][1])]  # the original bytes and key
    again = redrive(settings, "recall.dlq", "schema", yes=True)
    assert (again["scanned"], again["redriven"]) == (0, 0)  # its progress was committed: nothing twice

    # another filter is another group: the rest is still there to redrive, once; the schema letter the
    # first group sent is not sent twice (its committed position says so)
    rest = redrive(settings, "recall.dlq", yes=True)
    assert (rest["scanned"], rest["redriven"], rest["already_redriven"]) == (4, 3, 1)
    got = read_raw(settings, "recall", 4)
    assert sorted(got) == sorted([(k, v) for k, v, _ in BAD])
    assert redrive(settings, "recall.dlq", yes=True)["redriven"] == 0
    # a new dead letter after the commit is redriven by the next run
    dead_letter_all(settings)
    # the first unknown_items letter was sent by the unfiltered run above (its committed position says
    # so): only the new one goes
    late = redrive(settings, "recall.dlq", "unknown_items", yes=True)
    assert (late["redriven"], late["already_redriven"]) == (1, 1), late
