"""Honest liveness and readiness of a stage process: ``/healthz`` and ``/readyz`` next to ``/metrics``.

Why not "the metrics endpoint answers": the HTTP server is a daemon thread of its own and keeps
answering after a stage's loop died, so an orchestrator probing ``/metrics`` never restarts a process
that no longer works. Here every stage reports into one registry (:data:`HEALTH`):

* ``beat`` — its loop came round (``StageIO.poll`` does it for the workers, the faust runner for the
  streams stage); a loop silent for longer than ``health.stall_s`` is *stalled*;
* ``assigned`` — how many partitions its consumer holds (rebalance callbacks);
* ``crashed`` / ``stopped`` — how its thread ended (:class:`gpl.stack.Stages`);
* ``relay`` — a stage run by a child process (gpl/stage_process.py): its beats, idle time and partitions
  as the child's own registry saw them, sent to the parent with each report, so the parent's probes
  answer for it as for a thread (the child's death ends its stage in the parent: ``crashed``).

``/healthz`` answers 200 while every registered stage is running and not stalled, 503 otherwise;
``/readyz`` 200 when, besides, every stage holds at least one partition (it can serve), 503 otherwise.
Both answer the per-stage state as JSON. ``health.stall_s`` (runtime/settings.py) is the stall
time; :func:`serve_http` applies it to the registry it serves. A crash also ends the process with a
non-zero exit (the stage runner in ``gpl run``/``gpl up``): the probes are for what an exit cannot
show, a hung loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

import orjson

from runtime.metrics import ROUTES, serve, serve_ephemeral
from runtime.metrics_relay import metrics_route
from runtime.settings import HealthSettings

STARTING, RUNNING, CRASHED, STOPPED = "starting", "running", "crashed", "stopped"


@dataclass
class StageState:
    state: str = STARTING
    since: float = field(default_factory=time.monotonic)
    last_beat: float | None = None
    beats: int = 0
    partitions: int = 0
    error: str = ""


class Health:
    """Thread-safe per-stage state; ``live()`` and ``ready()`` answer (ok, JSON-able report)."""

    def __init__(self, stall_s: float = HealthSettings.model_fields["stall_s"].default) -> None:
        self.stall_s = stall_s
        self._stages: dict[str, StageState] = {}
        self._lock = threading.Lock()

    def register(self, stage: str) -> None:
        with self._lock:
            self._stages[stage] = StageState()

    def _get(self, stage: str) -> StageState:
        st = self._stages.get(stage)
        if st is None:  # a stage run outside the runner (tests, demo) still reports
            st = self._stages[stage] = StageState()
        return st

    def beat(self, stage: str) -> None:
        with self._lock:
            st = self._get(stage)
            if st.state == STARTING:
                st.state = RUNNING
            st.last_beat = time.monotonic()
            st.beats += 1

    def assigned(self, stage: str, partitions: int) -> None:
        with self._lock:
            self._get(stage).partitions = max(0, partitions)

    def relay(self, stage: str, *, beats: int, idle_s: float, partitions: int) -> None:
        """A child process's view of its stage: ``beats`` so far, ``idle_s`` since its last one (measured
        in the child, so a hung loop looks hung here too), the partitions it holds. A stage that ended
        (crashed, stopped) stays so."""
        with self._lock:
            st = self._get(stage)
            if st.state not in (STARTING, RUNNING):
                return
            st.partitions = max(0, partitions)
            if beats > 0:
                st.state = RUNNING
                st.last_beat = time.monotonic() - max(0.0, idle_s)
                st.beats = beats

    def crashed(self, stage: str, error: BaseException | str) -> None:
        with self._lock:
            st = self._get(stage)
            st.state, st.error = CRASHED, error if isinstance(error, str) else f"{type(error).__name__}: {error}"

    def stopped(self, stage: str) -> None:
        with self._lock:
            st = self._get(stage)
            if st.state != CRASHED:
                st.state = STOPPED

    def forget(self, stage: str) -> None:
        with self._lock:
            self._stages.pop(stage, None)

    def report(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            out = {}
            for name, st in self._stages.items():
                idle = now - (st.last_beat if st.last_beat is not None else st.since)
                stalled = st.state in (STARTING, RUNNING) and idle > self.stall_s
                out[name] = {"state": "stalled" if stalled else st.state, "idle_s": round(idle, 3),
                             "beats": st.beats, "partitions": st.partitions, "error": st.error}
            return out

    def live(self) -> tuple[bool, dict[str, Any]]:
        stages = self.report()
        ok = all(s["state"] in (STARTING, RUNNING) for s in stages.values())
        return ok, {"live": ok, "stages": stages}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        stages = self.report()
        ok = bool(stages) and all(s["state"] == RUNNING and s["partitions"] > 0 for s in stages.values())
        return ok, {"ready": ok, "stages": stages}


HEALTH = Health()


def _probe(check: str) -> Callable[[], tuple[int, str, bytes]]:
    """A metrics-server route answering ``HEALTH.<check>()`` (looked up per request: tests swap HEALTH)."""
    def route() -> tuple[int, str, bytes]:
        ok, body = getattr(HEALTH, check)()
        return 200 if ok else 503, "application/json", orjson.dumps(body)

    return route


ROUTES["/metrics"] = metrics_route  # this process's metrics with those its child stages relayed
ROUTES["/healthz"] = _probe("live")
ROUTES["/readyz"] = _probe("ready")


def serve_http(port: int, host: str = "0.0.0.0", *,  # noqa: S104 - probed from outside
               stall_s: float | None = None) -> ThreadingHTTPServer:
    """Start the metrics + probes server in a daemon thread; returns it (``server_address`` has the port).

    ``stall_s`` (``health.stall_s``): how long a stage loop may stay silent before ``/healthz`` says so.
    """
    if stall_s is not None:
        HEALTH.stall_s = stall_s
    server = serve(port, host) if port else serve_ephemeral(host)
    assert server is not None
    return server
