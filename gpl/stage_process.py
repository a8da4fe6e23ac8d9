"""One stage in its own OS process, seen by the parent as an ordinary stage.

Why: Python runs one bytecode stream per process (the GIL), so stages sharing a process share one
core. The embedded vector engine admits one process (a lock on its directory), but the stages that
only *read* item vectors — streams, labeler, trainer, calibration — can open the item snapshot
(runtime/vectors/snapshot.py) instead, and so run on their own cores.

:class:`ProcessStage` has the :class:`gpl.stack.Stage` shape: ``run(stop)`` starts the child (spawn: a
clean interpreter, no inherited threads or Kafka handles), relays ``stop`` to it and returns when it
ends; ``accounting`` and the child's public counters (``counts``, ``deferred``, …) are mirrored from
snapshots the child sends every ``report_s``, so the demo's and the benches' progress checks read
them as they would read a thread's. A child that fails raises in ``run`` with the child's error, so
:class:`gpl.stack.Stages` records it like a crashed thread.

Each report also carries the child's health (beats, idle time, partitions of each stage loop, relayed
into the parent's :data:`~runtime.health.HEALTH` under the names a thread would report) and its
``gpl_*`` metrics (relayed into the parent's ``/metrics``, runtime/metrics_relay.py): the parent's
``/healthz``, ``/readyz`` and ``/metrics`` answer for the stage as for a thread, on the parent's
``metrics_port`` (children serve no port of their own). A child that dies ends its stage in the parent
(``crashed``) and drops its metrics.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from runtime.health import HEALTH
from runtime.metrics_relay import RELAYED, export_families
from runtime.settings import Settings

log = logging.getLogger(__name__)
READERS = ("streams", "labeler", "trainer", "calibration")  # stages that never write vectors
MIRRORED = ("counts", "deferred", "waiting")  # public counters read by the demo and benches
METRICS_S = 1.0  # the child's metrics ride on a report at most this often (a scrape is ~15 s anyway)


class MirroredAccounting:
    """The parent's view of a child's :class:`~runtime.kafka.Accounting` (last snapshot received)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._c: dict[str, int] = {}

    def update(self, counts: dict[str, int]) -> None:
        self._c = dict(counts)

    def snapshot(self) -> dict[str, int]:
        return dict(self._c)

    def __getitem__(self, outcome: str) -> int:
        return self._c.get(outcome, 0)


class ProcessStage:
    """A stage run by a child process; build it with the stage's name and keyword arguments."""

    def __init__(self, stage: str, settings: Settings, *, report_s: float = 0.25, **kw: Any) -> None:
        self.name = stage
        self.settings = settings
        self.kw = kw
        self.report_s = report_s
        self.accounting = MirroredAccounting(stage)
        self._mirror: dict[str, Any] = {}
        self._accountings: dict[str, MirroredAccounting] = {}
        self.pid: int | None = None
        self._relay_key = stage  # the child's key among the relayed metrics (stage[pid] once started)
        self.peak_rss_bytes = 0  # the child's peak resident set, reported when it ends

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr in self._accountings:
            return self._accountings[attr]
        if attr in self._mirror:
            return self._mirror[attr]
        raise AttributeError(f"{self.name} (in its own process) does not report {attr!r}")

    def snapshot(self) -> Any:
        """The child stage's own ``snapshot()`` as last reported (None if it has none)."""
        return self._mirror.get("snapshot")

    def run(self, stop: threading.Event) -> None:
        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        # stop goes down a pipe, not an mp.Event: Event.set() waits for every waiter to wake, and a child
        # killed while waiting never does (the parent would hang in set() on a dead child's stage)
        stop_recv, child_stop = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child_main, name=f"gpl-{self.name}", daemon=True,
                           args=(self.settings.model_dump_json(), self.name, self.kw, stop_recv, send,
                                 self.report_s))
        proc.start()
        send.close()  # the parent only reads; EOF then means the child is gone
        stop_recv.close()
        self.pid = proc.pid
        self._relay_key = f"{self.name}[{proc.pid}]"
        error: str | None = None
        try:
            while True:
                if stop.is_set():
                    _stop_child(child_stop)
                try:
                    ready = recv.poll(0.1)
                    msg = recv.recv() if ready else None
                except EOFError:
                    break
                if msg is not None:
                    error = self._take(msg) or error
                elif proc.exitcode is not None:  # gone, and no EOF: a process it started holds the pipe
                    break
        finally:
            _stop_child(child_stop)
            proc.join(60)
            if proc.is_alive():
                log.warning("stage %s (pid %s) did not stop; terminating it", self.name, proc.pid)
                proc.terminate()
                proc.join(10)
            recv.close()
            child_stop.close()
            RELAYED.drop(self._relay_key)  # a child that ended serves no metrics (its stage is down)
        if error is not None:
            raise RuntimeError(f"stage {self.name} failed in its process: {error}")
        if proc.exitcode not in (0, None):
            raise RuntimeError(f"stage {self.name} process exited with code {proc.exitcode}")

    def _take(self, msg: dict[str, Any]) -> str | None:
        for attr, counts in msg.get("accountings", {}).items():
            if attr == "accounting":
                self.accounting.update(counts)
            else:
                self._accountings.setdefault(attr, MirroredAccounting(f"{self.name}.{attr}")).update(counts)
        self._mirror.update(msg.get("attrs", {}))
        self.peak_rss_bytes = max(self.peak_rss_bytes, int(msg.get("peak_rss_bytes", 0)))
        if msg.get("error") is None:  # a failed child is the stage's crash (run raises), not a beat
            for stage, h in msg.get("health", {}).items():
                HEALTH.relay(stage, **h)
        if "metrics" in msg:
            RELAYED.put(self._relay_key, msg["metrics"])
        return msg.get("error")


def open_reader_index(settings: Settings) -> Any:
    """The vector index a reader stage opens in its own process: the snapshot, or the Qdrant server."""
    if settings.qdrant.url:
        from gpl.backends import open_index

        return open_index(settings)
    from runtime.vectors.snapshot import SnapshotIndex, snapshot_dir

    return SnapshotIndex(snapshot_dir(settings.data_dir, settings.encoder.collection).parent)


def _stop_child(conn: Connection) -> None:
    """Ask the child to stop (once; a child that is gone already needs no asking)."""
    if not conn.closed:
        with contextlib.suppress(OSError):
            conn.send(True)
        conn.close()


def child_main(settings_json: str, name: str, kw: dict[str, Any], stop: Connection, conn: Connection,
               report_s: float) -> None:
    """The child: build the stage over a reader index, run it in a thread, report until it ends."""
    from gpl.stage_build import build_stage
    from runtime.encoder import open_encoder
    from runtime.kafka import use_topic_names
    from runtime.logs import configure_logging
    from runtime.redact import install

    settings = Settings.model_validate_json(settings_json)
    use_topic_names(settings.kafka)  # a spawned process starts with the logical names: take the stack's
    configure_logging(settings.log_level, settings.log_format, stage=name)
    install(settings)  # the child's log lines are masked like the parent's (runtime/redact.py)
    error: list[str] = []
    with open_reader_index(settings) as index:
        try:
            stage = build_stage(name, settings, index, lambda: open_encoder(settings.encoder), **kw)
        except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
            conn.send({"error": repr(e)})
            conn.close()
            return
        tstop = threading.Event()

        def target() -> None:
            try:
                stage.run(tstop)
            except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
                log.exception("stage %s crashed", name)
                error.append(repr(e))

        t = threading.Thread(target=target, name=f"gpl-{name}", daemon=True)
        t.start()
        parent = os.getppid()
        sent_metrics = 0.0
        while t.is_alive():
            if stop.poll(report_s) or os.getppid() != parent:  # stopped (or EOF: parent gone), or orphaned
                tstop.set()
                t.join(60)
                break
            with_metrics = time.monotonic() - sent_metrics >= METRICS_S
            sent_metrics = time.monotonic() if with_metrics else sent_metrics
            _send(conn, _report(stage, None, metrics=with_metrics))
        _send(conn, _report(stage, error[0] if error else None))
    conn.close()


def _send(conn: Connection, msg: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the parent is gone (BrokenPipeError): nobody to report to
        conn.send(msg)


def _report(stage: Any, error: str | None, *, metrics: bool = True) -> dict[str, Any]:
    from runtime.kafka import Accounting

    accountings = {k: v.snapshot() for k, v in vars(stage).items() if isinstance(v, Accounting)}
    attrs: dict[str, Any] = {}
    for a in MIRRORED:
        v = getattr(stage, a, None)
        if isinstance(v, int | float | dict):
            attrs[a] = dict(v) if isinstance(v, dict) else v
    view = getattr(stage, "snapshot", None)  # a stage's own summary (the calibration monitor has one)
    if callable(view):
        attrs["snapshot"] = view()
    msg: dict[str, Any] = {"accountings": accountings, "attrs": attrs, "error": error,
                           "peak_rss_bytes": peak_rss_bytes(),
                           "health": _health(), "t": time.time()}
    if metrics:
        msg["metrics"] = export_families()
    return msg


def _health() -> dict[str, dict[str, Any]]:
    """The child's stage loops as its own health registry sees them, under the names they report as
    threads too (``streams``, ``labeler``, a trainer's ``name``): beats so far, seconds since the
    latest, partitions held."""
    return {name: {"beats": s["beats"], "idle_s": s["idle_s"], "partitions": s["partitions"]}
            for name, s in HEALTH.report().items()}


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (``VmHWM``).

    Not ``ru_maxrss``: Linux keeps it across ``execve``, so a spawned child would report the peak of
    the parent it was forked from.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
