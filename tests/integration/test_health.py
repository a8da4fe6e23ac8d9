"""Honest liveness: /healthz and /readyz answer the stages' real state, and a dead stage ends its process.

The registry is pure logic (tested directly); the HTTP server is the real one on a free port; the
crash is checked in a subprocess running the real stage runner of ``gpl run`` (gpl/commands/up.py), with
stages whose loop raises or hangs: what is tested is the runner's reaction, not a stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from runtime.health import Health, serve_http

ROOT = Path(__file__).resolve().parents[2]


def test_live_and_ready_follow_the_stage_state(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Health(stall_s=5.0)
    assert h.live()[0] and not h.ready()[0]  # nothing registered: alive, nothing to serve
    h.register("labeler")
    assert h.live()[0] and not h.ready()[0]  # starting: no loop round yet
    h.beat("labeler")
    assert h.live()[0] and not h.ready()[0]  # running, but no partition
    h.assigned("labeler", 3)
    ok, body = h.ready()
    assert ok and body["stages"]["labeler"]["state"] == "running" and body["stages"]["labeler"]["partitions"] == 3
    h.assigned("labeler", 0)  # revoked
    assert h.live()[0] and not h.ready()[0]

    h.assigned("labeler", 1)
    now = time.monotonic()
    monkeypatch.setattr("runtime.health.time.monotonic", lambda: now + 6.0)  # no beat for 6 s > stall_s
    ok, body = h.live()
    assert not ok and body["stages"]["labeler"]["state"] == "stalled"
    assert not h.ready()[0]
    monkeypatch.undo()

    h.beat("labeler")
    h.register("trainer")
    h.beat("trainer")
    h.crashed("trainer", ValueError("boom"))
    ok, body = h.live()
    assert not ok and body["stages"]["trainer"] == {**body["stages"]["trainer"], "state": "crashed",
                                                     "error": "ValueError: boom"}
    h.stopped("trainer")  # a crash stays a crash
    assert h.report()["trainer"]["state"] == "crashed"


def _get(url: str) -> tuple[int, dict[str, Any] | str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            code, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        code, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    return code, json.loads(body) if "json" in ctype else body.decode()


def test_endpoints_answer_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Health(stall_s=60.0)
    monkeypatch.setattr("runtime.health.HEALTH", h)
    server = serve_http(0, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        h.register("indexer")
        h.beat("indexer")
        code, body = _get(base + "/healthz")
        assert code == 200 and isinstance(body, dict) and body["live"] is True
        code, body = _get(base + "/readyz")
        assert code == 503 and isinstance(body, dict) and body["ready"] is False
        h.assigned("indexer", 2)
        code, body = _get(base + "/readyz")
        assert code == 200 and isinstance(body, dict) and body["stages"]["indexer"]["partitions"] == 2
        h.crashed("indexer", "RuntimeError: loop died")
        code, body = _get(base + "/healthz")
        assert code == 503 and isinstance(body, dict)
        assert body["stages"]["indexer"]["state"] == "crashed" and "loop died" in body["stages"]["indexer"]["error"]
        code, text = _get(base + "/metrics")
        assert code == 200 and isinstance(text, str) and "gpl_messages_total" in text
        assert _get(base + "/nope")[0] == 404
    finally:
        server.shutdown()


RUNNER = textwrap.dedent("""
    import sys, threading, time
    from gpl.commands.up import _run_stages
    from runtime.kafka import Accounting
    from runtime.settings import load

    class Raises:
        accounting = Accounting("raises")
        def run(self, stop):
            time.sleep(0.3)
            raise RuntimeError("the loop raised")

    class Loops:  # a healthy stage; with HANG it ignores the stop request
        accounting = Accounting("loops")
        def run(self, stop):
            while not stop.wait(0.05):
                pass
            if "hang" in sys.argv:
                time.sleep(3600)

    class FakeStack:
        settings = load(env={}, health={"exit_grace_s": 2})
        def make(self, name):
            return {"raises": Raises, "loops": Loops}[name]()

    code = _run_stages(FakeStack(), ["loops", "raises"])
    print("returned", code, flush=True)
    sys.exit(code)
""")


@pytest.mark.parametrize("mode", ["clean", "hang"])
def test_a_stage_whose_loop_raises_ends_the_process_non_zero(tmp_path: Path, mode: str) -> None:
    """The other stage stops and the process exits 1; one that hangs in its shutdown is cut off by the
    watchdog after health.exit_grace_s, still with exit 1 (the process never lingers half-dead)."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=90,
                       cwd=tmp_path)
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stdout + p.stderr
    assert "stage(s) crashed: raises" in p.stderr and "the loop raised" in p.stderr
    if mode == "clean":
        assert "returned 1" in p.stdout
    else:
        assert "shutdown took over 2 s" in p.stderr and "returned" not in p.stdout
    assert took < 60


def test_gpl_run_without_bootstrap_servers_refuses(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")}
    p = subprocess.run([sys.executable, "-m", "gpl.cli", "--data-dir", str(tmp_path), "run", "--stage", "indexer"],
                       env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--embedded" in lines[0] and "bootstrap_servers" in lines[0]
    assert not (tmp_path / "tansu.log").exists()  # no broker was started


@pytest.mark.integration
def test_a_crashing_faust_agent_ends_the_streams_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """faust would log an agent's exception and restart the agent, leaving a live process that lost
    its in-flight event; the streams stage instead ends with the error, which the runner turns into
    a crashed stage (and ``gpl run`` into exit 1). Before that, it beat and held its partitions.

    A message's own failure goes to its DLQ (``processing_error``); what escapes the agent is a failure
    of the dead-lettering itself, simulated here by a broken recall path *and* a broken DLQ."""
    from gpl.stack import Stages
    from runtime.broker import EmbeddedBroker
    from runtime.health import HEALTH
    from runtime.kafka import create_topics
    from schemas.events import Candidate, ItemEvent, RecallEvent
    from streams.app import StreamsProcessor
    from tests.fixtures.settings import make_settings
    from tests.helpers import item_index, produce, wait_for

    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as broker:
        s = make_settings(tmp_path, broker, partitions=1)
        create_topics(s.kafka)
        index = item_index([ItemEvent(item_id=i, text=f"item {i}") for i in range(1, 6)], s.encoder.collection)
        proc = StreamsProcessor(s, index)

        async def boom(*args: object) -> None:
            raise ValueError("a bug in the join")

        monkeypatch.setattr(proc, "on_recall", boom)
        monkeypatch.setattr(proc, "dead_letter", boom)
        stages = Stages({"streams": proc})
        with stages:
            # other tests of this process may have left stages in the global registry: look at ours
            wait_for(lambda: HEALTH.report()["streams"]["state"] == "running"
                     and HEALTH.report()["streams"]["partitions"] >= 1, 60, "streams running with partitions")
            produce(s, "recall", [RecallEvent(request_id="r1", user_id="u1", ts=1,
                                              candidates=[Candidate(item_id=1, score=1.0, source="t")])])
            wait_for(lambda: "streams" in stages.errors, 60, "the stage to end")
        assert "a bug in the join" in repr(stages.errors["streams"])
        assert stages.stop_event.is_set()  # the runner stops the process's other stages too
        ok, body = HEALTH.live()
        assert not ok and body["stages"]["streams"]["state"] == "crashed"
        assert "a bug in the join" in body["stages"]["streams"]["error"]
        HEALTH.forget("streams")
