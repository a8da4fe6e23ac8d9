"""A stage in a child process (gpl/stage_process.py) is seen by its parent: health, metrics, its death.

The default embedded layout (``stack.processes``) runs the reader stages in children; the parent serves
``/healthz``, ``/readyz`` and ``/metrics``. Checked with the real endpoints of a real ``gpl up`` (in both
layouts: the stage in a child, and in ``gpl up`` itself), the real broker and a real child: ready while the
child works, live while it idles past ``health.stall_s``, stalled (503) within ``health.stall_s`` when the
child stops answering, crashed when it dies. And an item
catalogue that does not exist yet (no snapshot, no Qdrant collection) is the unknown-items case.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

from gpl.stack import Stack, Stages
from gpl.stage_build import build_stage
from gpl.stage_process import ProcessStage
from runtime.broker import Broker
from runtime.health import HEALTH
from runtime.kafka import create_topics
from runtime.metrics_relay import RELAYED, metrics_route
from runtime.vectors.server import ServerIndex
from schemas.events import Candidate, ExposedItem, ExposureEvent, RecallEvent
from tests.fixtures.settings import make_settings
from tests.helpers import produce, wait_for
from tests.integration.test_health import _get

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STALL_S = 3.0
LAG = re.compile(r'^gpl_consumer_lag_messages\{[^}]*stage="labeler"', re.M)  # the child's own gauge


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing children of ``pid`` (the stage processes; not the broker, not a tracker)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(d.name))
    return out


def _labeler(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict), body
    return dict(body["stages"]["labeler"])


@pytest.mark.parametrize("processes", [True, False], ids=["child-process", "in-process"])
def test_gpl_up_answers_for_its_stage_in_either_layout(tmp_path: Path, processes: bool) -> None:
    """Both layouts (stack.processes): the same endpoints, the same answers. In the child layout it fails
    without the relay: /readyz stays "starting" with 0 beats, the metrics never appear, and the stall time is
    the 600 s constant (a stopped child would look live for 10 minutes)."""
    metrics_port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")} | {
        "PYTHONPATH": str(ROOT), "GPL_DATA_DIR": str(tmp_path / "data"), "GPL_METRICS_PORT": str(metrics_port),
        "GPL_METRICS_HOST": "127.0.0.1", "GPL_HEALTH__STALL_S": str(STALL_S), "GPL_KAFKA__LAG_INTERVAL_S": "0.5",
        "GPL_LABELER__LABEL_SOURCE": "map", "GPL_STACK__PROCESSES": str(processes).lower()}
    proc = subprocess.Popen([sys.executable, "-m", "gpl.cli", "up", "--stages", "labeler"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{metrics_port}"
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(ln.strip() for ln in proc.stdout or ()), daemon=True).start()
    stopped: list[int] = []
    try:
        wait_for(lambda: any(ln.startswith("ready") for ln in lines) or proc.poll() is not None, 120, "the ready line")
        assert proc.poll() is None, (lines, proc.stderr.read() if proc.stderr else "")
        bootstrap = next(ln for ln in lines if ln.startswith("ready")).split()[1].split("=", 1)[1]

        # ready: the child beats and holds the partitions, and the parent says so
        wait_for(lambda: _get(base + "/readyz")[0] == 200, 120, lambda: f"/readyz 200: {_get(base + '/readyz')}")
        st = _labeler(_get(base + "/readyz")[1])
        assert st["state"] == "running" and st["beats"] > 0 and st["partitions"] > 0

        # its metrics: what it consumed and its lag, on the parent's port
        produce(make_settings(tmp_path, bootstrap), "unexposed", [b"not a batch"])

        def scraped() -> str:
            code, text = _get(base + "/metrics")
            assert code == 200 and isinstance(text, str)
            return text

        def has_labeler_metrics(text: str) -> bool:
            lag = LAG.search(text)
            msgs = re.search(r'^gpl_messages_total\{(?=[^}]*stage="labeler")(?=[^}]*outcome="in")', text, re.M)
            return bool(lag and msgs)

        wait_for(lambda: has_labeler_metrics(scraped()), 60, lambda: f"labeler metrics relayed:\n{scraped()}")
        assert len(re.findall(r"^# TYPE gpl_messages_total counter", scraped(), re.M)) <= 1  # one family

        # idle past the stall time: its loop still comes round, so it is live
        time.sleep(STALL_S + 1.5)
        code, body = _get(base + "/healthz")
        assert code == 200 and _labeler(body)["state"] == "running", body

        children = _spawned_children(proc.pid)
        assert len(children) == (1 if processes else 0), children  # in-process: the labeler runs in gpl up
        if processes:
            # a child that stops answering is stalled after health.stall_s (not after 600 s) ...
            os.kill(children[0], signal.SIGSTOP)
            stopped.append(children[0])
            wait_for(lambda: _get(base + "/healthz")[0] == 503, STALL_S + 10, "/healthz 503 for a stopped child")
            assert _labeler(_get(base + "/healthz")[1])["state"] == "stalled"
            # ... and live again once it does
            os.kill(children[0], signal.SIGCONT)
            stopped.clear()
            wait_for(lambda: _get(base + "/healthz")[0] == 200, 30, "/healthz 200 again")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_a_child_that_dies_takes_its_stage_down(tmp_path: Path, broker: Broker) -> None:
    """Live and ready while the child works; killed, the stage is crashed (not live, not ready) and its
    relayed metrics are gone with it."""
    s = make_settings(tmp_path, broker, kafka={"lag_interval_s": 0.5})
    create_topics(s.kafka)
    labeler = ProcessStage("labeler", s)
    try:
        with Stages({"labeler": labeler}) as stages:
            wait_for(lambda: HEALTH.report()["labeler"]["state"] == "running"
                     and HEALTH.report()["labeler"]["partitions"] > 0, 120,
                     lambda: f"the child's beats and partitions relayed: {HEALTH.report().get('labeler')}")
            wait_for(lambda: LAG.search(metrics_route()[2].decode()) is not None, 60, "the child's metrics relayed")
            assert labeler.pid is not None and labeler.pid != os.getpid()
            assert RELAYED.children() == [f"labeler[{labeler.pid}]"]
            os.kill(labeler.pid, signal.SIGKILL)
            wait_for(lambda: "labeler" in stages.errors, 60, "the parent to see the child die")
        ok, body = HEALTH.live()
        assert not ok and body["stages"]["labeler"]["state"] == "crashed", body
        assert not HEALTH.ready()[0]
        assert "exited with code -9" in body["stages"]["labeler"]["error"]
        text = metrics_route()[2].decode()
        assert RELAYED.children() == [] and LAG.search(text) is None
        assert re.search(r'^gpl_stage_up\{stage="labeler"\} 0\.0$', text, re.M), text
    finally:
        HEALTH.forget("labeler")


def _recall_before_items(s: Any, proc: Any) -> dict[str, int]:
    """A valid recall and its exposure (with a click) before any item vector exists."""
    produce(s, "recall", [RecallEvent(request_id="r1", user_id="u1", ts=10, candidates=[
        Candidate(item_id=i, score=1.0 / i, source="t") for i in (1, 2, 3)])])
    produce(s, "exposure", [ExposureEvent(request_id="r1", user_id="u1", ts=11,
                                          items=[ExposedItem(item_id=1, position=0, clicked=True)])])
    wait_for(lambda: proc.accounting["joined"] == 2 or any(k.startswith("dlq:") for k in proc.accounting.snapshot()),
             120, lambda: f"the join: {proc.accounting.snapshot()}")
    return dict(proc.accounting.snapshot())


@pytest.mark.parametrize("catalogue", ["snapshot", "qdrant"])
def test_no_item_catalogue_yet_is_the_unknown_items_case(tmp_path: Path, broker: Broker,
                                                          catalogue: str) -> None:
    """Streams started before the indexer: no item snapshot (the child-process layout), or no collection
    on the Qdrant server (qdrant-client's local mode standing in). Without the fix the recall and the
    exposure are dead-lettered as ``processing_error`` (a KeyError: "no snapshot of collection ...")."""
    s = make_settings(tmp_path, broker, partitions=1, streams={"join_wait_s": 30.0})
    create_topics(s.kafka)
    if catalogue == "snapshot":
        with Stack(s) as stack:
            proc = stack.make("streams")
            assert isinstance(proc, ProcessStage)  # the default layout: a child over the item snapshot
            with Stages({"streams": proc}) as stages:
                acc = _recall_before_items(s, proc)
    else:
        index = ServerIndex("", client=QdrantClient(":memory:"))
        proc = build_stage("streams", s, index, lambda: None)  # type: ignore[arg-type,return-value]
        with Stages({"streams": proc}) as stages:
            acc = _recall_before_items(s, proc)
    HEALTH.forget("streams")
    assert not stages.errors
    assert not any(k.startswith("dlq:") for k in acc), acc
    assert acc["joined"] == 2 and acc["unknown_candidates_dropped"] == 3 and acc["recalls_with_unknown"] == 1


def test_relayed_samples_are_summed_into_one_family() -> None:
    """Two children count the same series: one family, their sum (a counter's ``_created``: the earliest)."""
    from prometheus_client import generate_latest

    from runtime.metrics_relay import Merged, Relayed

    relayed = Relayed()
    for child, n, created in (("a[1]", 2.0, 20.0), ("b[2]", 3.0, 10.0)):
        relayed.put(child, [("gpl_messages", "counter", "Messages", "", [
            ("gpl_messages_total", {"stage": "relay_test", "outcome": "in"}, n),
            ("gpl_messages_created", {"stage": "relay_test", "outcome": "in"}, created)])])
    text = generate_latest(Merged(relayed)).decode()  # type: ignore[arg-type]
    assert len(re.findall(r"^# TYPE gpl_messages_total counter$", text, re.M)) == 1
    assert 'gpl_messages_total{outcome="in",stage="relay_test"} 5.0' in text
    assert 'gpl_messages_created{outcome="in",stage="relay_test"} 10.0' in text
    relayed.drop("a[1]")
    assert 'gpl_messages_total{outcome="in",stage="relay_test"} 3.0' in generate_latest(Merged(relayed)).decode()  # type: ignore[arg-type]
