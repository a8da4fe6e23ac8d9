"""Prometheus metrics of the foundation and of more than one stage, and the HTTP server of ``/metrics``.

``gpl run`` and ``gpl demo`` expose them on ``metrics_port`` (``GPL_METRICS_PORT``) at ``/metrics``,
with the liveness and readiness probes ``/healthz`` and ``/readyz`` (runtime/health.py registers
them in :data:`ROUTES`); any other path is 404.

Where metrics are declared: here, the ones the foundation sets or every stage shares (messages by
stage and outcome, consumer lag, stage up, faust's producer back-pressure, counted by
runtime/faust_config.py); each stage's own in its package, next to the code that sets them:
``streams/metrics.py``, ``workers/anchors/metrics.py``, ``workers/labeler/metrics.py``,
``workers/trainer/metrics.py`` and ``workers/calibration_metrics.py`` (the calibration monitor is one
module). A family is registered, and shown on ``/metrics``, once its module is imported: a stage's
modules import theirs, so a process shows the metrics of the stages it builds (and, relayed, of its
child processes': runtime/metrics_relay.py).

Names follow the Prometheus guidelines: one quantity per name, the unit as a suffix in base units
(``_seconds``), ``_total`` on counters, and labels only for dimensions that may be summed or averaged
(stage, topic, outcome, model), never for different quantities. ``deploy/grafana/`` and
``deploy/base/alerts.yaml`` query these names; ``tests/unit/app/test_deploy.py`` checks every name they use is
defined in one of these metric modules (``metrics.py`` or ``*_metrics.py`` of runtime, streams, workers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest

MESSAGES = Counter("gpl_messages_total", "Messages by stage and outcome (in, labeled, dlq:<reason>, ...)",
                   ["stage", "outcome"])
STAGE_UP = Gauge("gpl_stage_up", "1 while the stage's loop runs in this process, 0 once it stopped or failed",
                 ["stage"])
CONSUMER_LAG = Gauge("gpl_consumer_lag_messages",
                     "Records not yet committed by the stage's consumer group: high watermark minus committed "
                     "offset, summed over the partitions this process owns", ["stage", "topic"])

# ---- faust's producer back-pressure (runtime/faust_config.py): its "producer buffer full" warnings, counted
PRODUCER_BACKPRESSURE = Counter("gpl_streams_producer_backpressure_total",
                                "Times the streams stage's faust producer buffer was full and processing waited "
                                "for it to drain (flow control, logged at DEBUG)")

# A route answers (status, content type, body). /metrics is the Prometheus exposition; more routes
# (health, readiness: runtime/health.py) are added by registering here before serve() is called.
Route = Callable[[], tuple[int, str, bytes]]
ROUTES: dict[str, Route] = {
    "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)),
}


class _Handler(BaseHTTPRequestHandler):
    """Serves :data:`ROUTES`; anything else is 404, so a probe cannot mistake metrics for health."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        route = ROUTES.get(self.path.split("?", 1)[0])
        status, ctype, body = route() if route is not None else (404, "text/plain; charset=utf-8", b"not found\n")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not log lines
        return


def serve(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:  # noqa: S104 - scraped from outside
    """Serve :data:`ROUTES` on ``host:port`` from a daemon thread (port 0: not at all); returns the server.

    ``metrics_host``: 0.0.0.0 so a scraper in another container or pod reaches it, 127.0.0.1 keeps it on
    the host. Stage processes start it through :func:`runtime.health.serve_http`, which adds the probes.
    """
    if not port:
        return None
    return _start(port, host)


def serve_ephemeral(host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The same server on a free port the OS picks (tests; ``server_address`` has the port)."""
    return _start(0, host)


def _start(port: int, host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="gpl-metrics", daemon=True).start()
    return server

