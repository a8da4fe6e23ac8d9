"""Apache Kafka's lifecycle on the real broker (runtime/kafka_broker.py): format, start, produce and
consume with the product's defaults (batched), stop, restart on the same data directory with everything kept,
death with its parent on kill -9, and the one line a machine without Java or Maven gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, TopicPartition

from runtime.kafka import consumer, create_topics, producer
from runtime.kafka_broker import KafkaBroker
from runtime.kafka_dist import KafkaUnavailable, ensure
from runtime.settings import Settings
from tests.fixtures.settings import make_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _consume(s: Settings, group: str, n: int, timeout: float = 30.0) -> list[bytes]:
    c = consumer(s.kafka, group)
    c.subscribe(["recall"])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                v = m.value()
                if m.error() is None and v is not None:
                    got.append(v)
        c.commit(asynchronous=False)
    finally:
        c.close()
    return got


OLD_MS = 946_684_800_000  # 2000-01-01: replayed event files carry event times that old
# the broker's retention check every second from the start (default: after 30 s, then every 5 min)
EAGER_RETENTION = {"log.initial.task.delay.ms": 0, "log.retention.check.interval.ms": 1000}


def test_start_produce_consume_stop_restart_keeps_everything(tmp_path: Path, kafka_dist: Path) -> None:
    with KafkaBroker(tmp_path, dist_dir=kafka_dist, **EAGER_RETENTION) as b:
        assert b.formatted and len(b.pids) == 1
        first_start = b.started_s
        bootstrap = b.bootstrap
        s = make_settings(tmp_path, b, partitions=1)
        assert s.kafka.producer_batch_messages > 1  # the product's defaults: batched
        create_topics(s.kafka)
        p = producer(s.kafka)
        for i in range(200):
            p.produce("recall", f"m{i}".encode(), key=b"u", timestamp=OLD_MS + i)
        assert p.flush(10) == 0
        time.sleep(2.5)  # a few retention checks: records with old event times are kept all the same
        assert _consume(s, "reader", 150)[:150] == [f"m{i}".encode() for i in range(150)]
    assert b.pids == [] and (tmp_path / "kafka-broker" / "kafka.log").stat().st_size > 0

    with KafkaBroker(tmp_path, dist_dir=kafka_dist) as b2:  # the same data directory: no format, same address
        assert b2.bootstrap == bootstrap
        s = make_settings(tmp_path, b2, partitions=1)
        c = consumer(s.kafka, "reader")
        # exact high watermark for batched data (Tansu would report the last batch's base offset + 1)
        assert c.get_watermark_offsets(TopicPartition("recall", 0), timeout=10) == (0, 200)
        committed = -1
        deadline = time.monotonic() + 30
        while committed < 0 and time.monotonic() < deadline:  # the group coordinator loads after a restart
            try:
                committed = c.committed([TopicPartition("recall", 0)], timeout=10)[0].offset
            except KafkaException:
                time.sleep(0.2)
        c.close()
        assert committed >= 150  # the group's commit survived the restart
        p = producer(s.kafka)
        p.produce("recall", b"m200", key=b"u")
        assert p.flush(10) == 0
        got = _consume(s, "fresh-reader", 201)
        assert got == [f"m{i}".encode() for i in range(201)]  # appends continue after the kept records
    print(f"kafka broker: first start (format included) {first_start:.1f} s, restart {b2.started_s:.1f} s")


PARENT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from runtime.kafka_broker import KafkaBroker
    b = KafkaBroker(Path(sys.argv[1]), dist_dir=Path(sys.argv[2])).start()
    print(json.dumps({"pids": b.pids}), flush=True)
    time.sleep(3600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(") ", 1)[1].startswith("Z"))


def test_broker_dies_with_its_parent_on_kill_9(tmp_path: Path, kafka_dist: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), str(kafka_dist)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())["pids"]
        assert pids and all(_alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "the kafka broker outlived a kill -9 of its parent"


def test_without_java_or_maven_one_line_says_what_to_install(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither java nor mvn
    with pytest.raises(KafkaUnavailable, match="needs Java 17") as e:
        ensure(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "java").symlink_to(Path(subprocess.check_output(["sh", "-c", "command -v java"],
                                                                env={"PATH": os.defpath + ":/usr/bin"},
                                                                text=True).strip()))
    with pytest.raises(KafkaUnavailable, match="Maven") as e:
        ensure(tmp_path / "fresh")
    assert "\n" not in str(e.value)
    from gpl import cli

    assert cli.main(["--data-dir", str(tmp_path / "d"), "kafka", "fetch", "--if-available"]) == 0
