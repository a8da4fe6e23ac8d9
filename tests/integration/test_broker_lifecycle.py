"""The embedded broker's lifecycle, on the real Tansu binary (and the real local S3 server).

* its processes die with the process that started them, even on kill -9 (PDEATHSIG from the main
  thread; the pipe watchdog alone when started from another thread);
* durable storage: topics, records and the port survive a kill -9 of everything and a restart.
"""

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
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from runtime.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[2]

PARENT = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from runtime.broker import EmbeddedBroker

    data_dir, storage, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    holder = {}

    def start():
        holder["b"] = EmbeddedBroker(log_file=data_dir / "tansu.log", storage=storage, data_dir=data_dir).start()

    if where == "thread":  # spawned from a thread that has ended: only the watchdog can help
        t = threading.Thread(target=start)
        t.start()
        t.join()
    else:
        start()
    b = holder["b"]
    admin = AdminClient({"bootstrap.servers": b.bootstrap})
    for f in admin.create_topics([NewTopic("kept", 1, 1)]).values():
        f.result()
    p = Producer({"bootstrap.servers": b.bootstrap, "batch.num.messages": 1})
    for i in range(5):
        p.produce("kept", f"m{i}".encode(), partition=0)
    assert p.flush(10) == 0
    print(json.dumps({"pids": b.pids, "bootstrap": b.bootstrap,
                      "pdeathsig": [c.pdeathsig for c in (b._tansu, b._s3) if c is not None]}), flush=True)
    time.sleep(3600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: only its parent (gone) could reap it
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _start_parent(tmp_path: Path, storage: str, where: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), storage, where], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the parent died before the broker was up (exit {proc.wait()})"
    return proc, json.loads(line)


def _wait_dead(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.integration
@pytest.mark.parametrize("where", ["main", "thread"])
def test_broker_dies_with_its_parent_on_kill_9(tmp_path: Path, where: str) -> None:
    proc, info = _start_parent(tmp_path, "memory", where)
    pids = [int(p) for p in info["pids"]]  # type: ignore[attr-defined]
    assert info["pdeathsig"] == [where == "main"]
    assert all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _wait_dead(pids) == [], "tansu outlived a kill -9 of its parent"


def _read_all(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list[bytes]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{time.monotonic_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            for m in c.consume(10, timeout=0.5):
                v = m.value()
                if m.error() is None and v is not None:
                    got.append(v)
    finally:
        c.close()
    return got


@pytest.mark.integration
def test_durable_storage_keeps_topics_records_and_port_across_kill_9(tmp_path: Path) -> None:
    pytest.importorskip("alocals3")
    proc, info = _start_parent(tmp_path, "s3", "main")
    pids = [int(p) for p in info["pids"]]  # type: ignore[attr-defined]
    assert len(pids) == 2  # tansu and the S3 server
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _wait_dead(pids) == [], "a broker process outlived a kill -9 of its parent"

    with EmbeddedBroker(log_file=tmp_path / "tansu.log", storage="s3", data_dir=tmp_path) as b:
        assert b.bootstrap == info["bootstrap"]  # same address: clients and configs keep working
        assert "kept" in AdminClient({"bootstrap.servers": b.bootstrap}).list_topics(timeout=10).topics
        assert _read_all(b.bootstrap, "kept", 5) == [f"m{i}".encode() for i in range(5)]
        p = Producer({"bootstrap.servers": b.bootstrap, "batch.num.messages": 1})
        p.produce("kept", b"m5", partition=0)
        assert p.flush(10) == 0
        c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "wm"})
        assert c.get_watermark_offsets(TopicPartition("kept", 0), timeout=10) == (0, 6)  # appends continue
        c.close()


def test_memory_storage_is_the_default_and_needs_no_data_dir(tmp_path: Path) -> None:
    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        for f in admin.create_topics([NewTopic("t", 1, 1)]).values():
            f.result()
        assert len(b.pids) == 1
    assert not (tmp_path / "broker").exists()
    with pytest.raises(ValueError, match="data directory"):
        EmbeddedBroker(storage="s3")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gpl_up(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")}
    proc = subprocess.Popen([sys.executable, "-m", "gpl.cli", "--data-dir", str(data_dir), "--set",
                             "broker.storage=s3", "up"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("broker"), f"gpl up did not start (exit {proc.poll()}): {line!r}"
    return proc, line.split()[1]


@pytest.mark.integration
def test_gpl_up_kill_9_leaves_no_broker_and_a_restart_keeps_the_topics(tmp_path: Path) -> None:
    pytest.importorskip("alocals3")
    up, bootstrap = _gpl_up(tmp_path / "data")
    kids = _children(up.pid)
    assert len(kids) >= 2  # tansu and the S3 server (and their watchdogs)
    p = Producer({"bootstrap.servers": bootstrap, "batch.num.messages": 1})
    p.produce("items", b'{"item_id": 1, "text": "kept"}', key=b"1", partition=0)
    assert p.flush(10) == 0
    up.send_signal(signal.SIGKILL)
    up.wait(10)
    assert _wait_dead(kids) == [], "children of gpl up outlived its kill -9"

    again, bootstrap2 = _gpl_up(tmp_path / "data")
    try:
        assert bootstrap2 == bootstrap
        assert _read_all(bootstrap2, "items", 1) == [b'{"item_id": 1, "text": "kept"}']
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
