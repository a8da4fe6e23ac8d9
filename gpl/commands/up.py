"""``gpl up`` and ``gpl run``: start the stack, run stages until interrupted, and exit honestly.

One module for both: they share the stage-list syntax and the stage runner (:func:`_run_stages`, which
the health tests run as ``gpl up`` does). Their dependencies are imported when a command runs, so
``gpl --version`` imports none of them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpl.commands import BROKER_HELP, progress

if TYPE_CHECKING:
    from runtime.settings import Settings

# stages that draw tqdm bars: bars only on a terminal, never in a service's log
PROGRESS_STAGES = ("indexer", "anchors", "labeler", "trainer")


def register(sub: argparse._SubParsersAction) -> None:
    from gpl.stage_build import STAGES

    u = sub.add_parser("up", help="start the embedded stack (broker, topics, Qdrant engine) and keep it up",
                       description="Start the stack: a local broker (none when --bootstrap or kafka.bootstrap_servers "
                                   "names a cluster), the topics, the vector engine; with --stages also run "
                                   "pipeline stages. Ctrl-C stops.")
    stage_options(u, f"stages to run too: {', '.join(STAGES)} or all (default: none)")
    u.add_argument("--port", type=int, default=None,
                   help="pin the embedded broker to this loopback port (default: a free one); clients then "
                        "use GPL_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:PORT")
    u.add_argument("--broker", choices=("embedded", "kafka"), default=None, help=BROKER_HELP)
    u.add_argument("--bootstrap", metavar="HOST:PORT",
                   help="use this Kafka cluster instead of starting a local broker: its topics are created there "
                        "(overrides kafka.bootstrap_servers, like --set kafka.bootstrap_servers=HOST:PORT)")
    u.set_defaults(run=run_up, serves_metrics=True)

    r = sub.add_parser("run", help="run one or more pipeline stages until interrupted",
                       description="Run stages (streams, indexer, anchors, labeler, trainer, calibration) against "
                                   "the configured broker and vector index. With the embedded Qdrant engine, "
                                   "stages that share it must run in one process.")
    stage_options(r, f"stages to run: {', '.join(STAGES)} or all")
    r.add_argument("--embedded", action="store_true",
                   help="without kafka.bootstrap_servers, start the local broker (broker.kind; else: refused)")
    r.add_argument("--bootstrap", metavar="HOST:PORT",
                   help="the Kafka cluster to run against (overrides kafka.bootstrap_servers, like --set "
                        "kafka.bootstrap_servers=HOST:PORT)")
    r.set_defaults(run=run_run, serves_metrics=True)


def stage_options(p: argparse.ArgumentParser, help: str) -> None:
    """One stage-list syntax for `up` and `run`: ``--stages a b`` (documented); ``--stage a --stage b`` too."""
    from gpl.stage_build import STAGES

    p.add_argument("--stages", nargs="+", action="extend", default=[], choices=(*STAGES, "all"), metavar="STAGE",
                   help=help)
    p.add_argument("--stage", action="append", dest="stages", choices=(*STAGES, "all"), help=argparse.SUPPRESS)


def _until_interrupted(stop: threading.Event, first: Callable[[], None] = lambda: None) -> None:
    """Until SIGTERM, Ctrl-C or ``stop``; ``first`` (the wait for the ready line) runs under the same
    handling, so a stop while the stages are still joining is as clean as one later."""
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        first()
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        stop.set()


def run_up(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.stack import Stack
    from runtime.redact import mask_url

    names = _stage_names(args.stages)
    if args.port is not None and settings.kafka.bootstrap_servers:
        print("gpl up: --port pins the embedded broker, but kafka.bootstrap_servers is set (no embedded broker)",
              file=sys.stderr)
        return 2
    if args.broker is not None and settings.kafka.bootstrap_servers:
        print(f"gpl up: --broker {args.broker} starts a local broker, but kafka.bootstrap_servers is set (--bootstrap "
              "or the settings): drop one of them", file=sys.stderr)
        return 2
    if args.port is not None and not _port_free(args.port):
        print(f"gpl up: port {args.port} on 127.0.0.1 is in use (another broker?); pick another --port",
              file=sys.stderr)
        return 2
    _require_given_broker(settings)
    with Stack(settings, broker_port=args.port) as stack:
        bootstrap = stack.settings.kafka.bootstrap_servers
        metrics = f"http://127.0.0.1:{settings.metrics_port}/metrics" if settings.metrics_port else "off"
        kind = "" if stack.broker is None else (f"  (kafka, {settings.data_dir / 'kafka-broker'})"
                                                if stack.broker.name == "kafka"
                                                else f"  (embedded, {settings.broker.storage} storage)")
        print(f"broker    {bootstrap}{kind}")
        if stack.broker is not None and (profile := stack.broker.profile()):  # what this broker's clients need
            env = {f"GPL_{sec.upper()}__{k.upper()}": str(v).lower() if isinstance(v, bool) else v
                   for sec, fields in profile.items() for k, v in fields.items()}
            print("profile   " + " ".join(f"{k}={v}" for k, v in env.items()))
        print(f"qdrant    {mask_url(settings.qdrant.url) or settings.data_dir / 'qdrant'}")
        print(f"stages    {', '.join(names) or 'none'}  (Ctrl-C to stop)")
        calibrated = settings.labeler.label_source == "calibrator"
        if "labeler" in names and calibrated and not settings.calibrator_file.is_file():
            from workers.labeler.abstention import missing_calibrator_hint

            print(f"hint      {missing_calibrator_hint(settings)}")  # the first run on a user's own events
        # one parseable line once everything is up: scripts wait for it
        return _run_stages(stack, names, ready=f"ready     bootstrap={bootstrap} metrics={metrics}")


def _port_free(port: int) -> bool:
    """Whether the embedded broker can bind 127.0.0.1:port (checked before it starts, not after 30 s)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stage_kw(name: str) -> dict[str, Any]:
    return {"progress": False} if name in PROGRESS_STAGES and not progress() else {}


def run_run(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.stack import Stack

    if not settings.kafka.bootstrap_servers and not args.embedded:
        print("gpl run: no kafka.bootstrap_servers (GPL_KAFKA__BOOTSTRAP_SERVERS); pass --embedded to start the "
              "embedded broker", file=sys.stderr)
        return 2
    if settings.kafka.bootstrap_servers and args.embedded:
        print("gpl run: --embedded starts a local broker, but kafka.bootstrap_servers is set (--bootstrap or the "
              "settings): drop one of them", file=sys.stderr)
        return 2
    if not args.stages:
        print("gpl run: name the stages to run: --stages STAGE [STAGE ...] (or all)", file=sys.stderr)
        return 2
    _require_given_broker(settings)
    with Stack(settings) as stack:
        return _run_stages(stack, _stage_names(args.stages))


def _require_given_broker(settings: Settings) -> None:
    """A cluster given (--bootstrap or kafka.bootstrap_servers) that does not answer: one line in seconds, not
    the topic creation's 30 s and a traceback. Without one the stack starts its own broker: nothing to check."""
    if settings.kafka.bootstrap_servers:
        from gpl.oneline import require_broker

        require_broker(settings)


def _stage_names(given: list[str]) -> list[str]:
    from gpl.stage_build import STAGES

    return list(STAGES) if "all" in given else list(dict.fromkeys(given))


def _run_stages(stack: Any, names: list[str], ready: str = "") -> int:
    """Run the stages until interrupted or until one crashes; a crash exits non-zero.

    Honest liveness (runtime/health.py): a stage that died takes the process down so the
    orchestrator restarts it. The other stages get ``health.exit_grace_s`` to stop cleanly; a stage
    that hangs in its shutdown cannot keep a broken process alive past it.
    """
    from gpl.stack import Stages

    stages = Stages({n: stack.make(n, **_stage_kw(n)) for n in names})
    def say_ready() -> None:  # the ready line once every stage holds its partitions
        if ready and stages.wait_ready():
            print(ready, flush=True)

    with stages:
        _until_interrupted(stages.stop_event, say_ready)
        if stages.errors:
            grace = stack.settings.health.exit_grace_s
            print(f"gpl: stage(s) crashed: {', '.join(f'{k}: {v!r}' for k, v in stages.errors.items())}; "
                  f"exiting 1 (within {grace:.0f} s)", file=sys.stderr, flush=True)
            _exit_after(grace, 1)
    return 1 if stages.errors else 0


def _exit_after(seconds: float, code: int) -> None:
    """Arm a watchdog that ends the process with ``code`` if a clean shutdown takes longer."""
    def die() -> None:
        print(f"gpl: shutdown took over {seconds:.0f} s; exiting {code} now", file=sys.stderr, flush=True)
        os._exit(code)

    t = threading.Timer(seconds, die)
    t.daemon = True
    t.start()
