"""Prometheus metrics of every stage, declared once so names and labels stay consistent.

``gpl run`` and ``gpl demo`` expose them on ``metrics_port`` (``GPL_METRICS_PORT``) at ``/metrics``,
with the liveness and readiness probes ``/healthz`` and ``/readyz`` (runtime/health.py registers
them in :data:`ROUTES`); any other path is 404.

Names follow the Prometheus guidelines: one quantity per name, the unit as a suffix in base units
(``_seconds``), ``_total`` on counters, and labels only for dimensions that may be summed or averaged
(stage, topic, outcome, model), never for different quantities. ``deploy/grafana/`` and
``deploy/base/alerts.yaml`` query these names; ``tests/unit/app/test_deploy.py`` checks every name they use is
defined here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

MESSAGES = Counter("gpl_messages_total", "Messages by stage and outcome (in, labeled, dlq:<reason>, ...)",
                   ["stage", "outcome"])
LATENCY = Histogram("gpl_exposure_to_samples_seconds",
                    "Exposure event time to its SampleBatch being produced",
                    ["source"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
ANCHOR_AGE = Histogram("gpl_anchor_age_seconds", "Age of the anchor set used to label a batch",
                       buckets=(1, 10, 60, 300, 1800, 3600, 21600, 86400))
ANCHOR_GENERATIONS = Counter("gpl_anchor_generations_total", "Anchor sets generated", ["model", "outcome"])
ANCHOR_TOKENS = Counter("gpl_anchor_tokens_total", "Tokens generated for anchors", ["model"])
DEFERRED = Gauge("gpl_labeler_deferred_batches", "Unexposed batches waiting for their user's anchors")
ABSTAINING = Gauge("gpl_labeler_abstaining", "1 while the labeler has no usable calibrator (no pseudo-labels)")
CALIBRATION_DRIFT = Gauge("gpl_calibration_drift",
                          "1 while the labeler's closed-loop ECE of pseudo-labels exceeds labeler.ece_alert")
JOIN_PENDING = Gauge("gpl_join_pending_requests", "Recall or exposure events waiting for their partner")
TRAINER_LOSS = Gauge("gpl_trainer_loss", "Last mini-batch loss of the pre-ranker", ["part"])
CHECKPOINT_VERSION = Gauge("gpl_trainer_checkpoint_version", "Last durable checkpoint version")
# when the last checkpoint was written: the stalled-checkpoint alert's clock (0 until the first one)
CHECKPOINT_TIME = Gauge("gpl_trainer_last_checkpoint_timestamp_seconds",
                        "Unix time of the last durable checkpoint this process wrote")


STAGE_UP = Gauge("gpl_stage_up", "1 while the stage's loop runs in this process, 0 once it stopped or failed",
                 ["stage"])
CONSUMER_LAG = Gauge("gpl_consumer_lag_messages",
                     "Records not yet committed by the stage's consumer group: high watermark minus committed "
                     "offset, summed over the partitions this process owns", ["stage", "topic"])

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


# ---- anchor generation policy (workers/anchors/: loop.py, generation_cache.py, generators/)
ANCHOR_PARSE_FAILURES = Counter("gpl_anchor_parse_failures_total",
                                "LLM answers with no usable anchor (per attempt; retried or fallback)",
                                ["model"])
ANCHOR_CACHE = Counter("gpl_anchor_cache_lookups_total", "Anchor replay-cache lookups", ["result"])
ANCHOR_QUEUED = Gauge("gpl_anchor_requests_queued", "Anchor requests read and waiting for generation")
ANCHOR_RATE = Gauge("gpl_anchor_generations_per_second", "Measured anchor generation capacity (EWMA)")
ANCHOR_PAUSED = Gauge("gpl_anchor_consumer_paused", "1 while the anchors worker pauses its partitions")
ANCHOR_BACKEND_ERRORS = Counter("gpl_anchor_backend_errors_total",
                                "Generation batches that failed as a whole and were re-queued", ["model"])
ANCHOR_SET_AGE = Histogram("gpl_anchor_set_age_seconds",
                           "Age of a user's anchor set when a new one replaces it",
                           buckets=(10, 60, 300, 1800, 3600, 6 * 3600, 86400, 7 * 86400))
ANCHOR_REQUEST_DELAY = Histogram("gpl_anchor_request_delay_seconds",
                                 "Request event time to its anchor set being published",
                                 buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800))

# Closed-loop calibration of pseudo-labels (workers/calibration.py): a pseudo-label joined with the real
# label its (user, item) got later. Labels: the anchor generator (model, prompt hash) and whether the
# anchors were the fallback; never the per-user anchor version (epoch ms: unbounded cardinality).
PSEUDO_JOINED = Gauge("gpl_pseudo_label_joined_pairs",
                      "Pseudo-labels in the monitor's window later met by a real label",
                      ["model", "prompt_hash", "fallback"])
PSEUDO_ECE = Gauge("gpl_pseudo_label_ece", "Expected calibration error of pseudo-labels vs later real labels",
                   ["model", "prompt_hash", "fallback"])
PSEUDO_WEIGHT_ECE = Gauge("gpl_pseudo_weight_ece",
                          "ECE of confidence weights vs agreement 1-|label-p| of the joined pseudo-labels",
                          ["model", "prompt_hash", "fallback"])
# the reliability curve: three quantities, three names (one per quantity), per bin of the predicted label
_BIN = ["model", "prompt_hash", "fallback", "bin"]
PSEUDO_RELIABILITY_PREDICTED = Gauge("gpl_pseudo_label_reliability_predicted_ratio",
                                     "Mean pseudo-label (predicted click probability) of the bin's joined pairs", _BIN)
PSEUDO_RELIABILITY_OBSERVED = Gauge("gpl_pseudo_label_reliability_observed_ratio",
                                    "Observed real click rate of the bin's joined pairs", _BIN)
PSEUDO_RELIABILITY_PAIRS = Gauge("gpl_pseudo_label_reliability_pairs", "Joined pairs in the bin", _BIN)
PSEUDO_PENDING = Gauge("gpl_calibration_pending_pairs",
                       "Pseudo-labeled (user, item) pairs awaiting a real label")

# Publishing gate of the trainer (workers/trainer/publish.py): every checkpoint scored against the published one
PUBLISH_DECISIONS = Counter("gpl_trainer_publish_decisions_total",
                            "Gate decisions on checkpoints (published, refused, insufficient)", ["outcome"])
PUBLISHED_VERSION = Gauge("gpl_trainer_published_version", "Checkpoint version currently published for serving")
PUBLISH_TIME = Gauge("gpl_trainer_last_publish_timestamp_seconds",
                     "Unix time the serving pointer last moved (a publication or a rollback)")
GATE_SCORE = Gauge("gpl_trainer_gate_score", "Held-out AUC/GAUC of the last gated candidate and the published model",
                   ["model", "metric"])

# ---- offsets past a topic's end (workers/trainer/offsets.py): the topic was recreated or the broker lost data
OFFSET_RESETS = Counter("gpl_offset_resets_total",
                        "Partitions whose committed/checkpointed offset was past the topic's end, reset to its "
                        "beginning", ["stage", "topic"])

# ---- faust's producer back-pressure (runtime/faust_config.py): its "producer buffer full" warnings, counted
PRODUCER_BACKPRESSURE = Counter("gpl_streams_producer_backpressure_total",
                                "Times the streams stage's faust producer buffer was full and processing waited "
                                "for it to drain (flow control, logged at DEBUG)")

# ---- co-partitioning (streams/copartition.py): a producer keyed or partitioned differently splits requests
SPLIT_REQUESTS = Counter("gpl_streams_split_requests_total",
                         "Joined requests whose recall and exposure arrived on different partitions "
                         "(a producer with another key or partitioner; docs/producers.md)")
