"""Prometheus metrics of every stage, declared once so names and labels stay consistent.

``gpl run`` and ``gpl demo`` expose them on ``metrics_port`` (``GPL_METRICS_PORT``) at ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

MESSAGES = Counter("gpl_messages_total", "Messages by stage and outcome (in, labeled, dlq:<reason>, ...)",
                   ["stage", "outcome"])
LATENCY = Histogram("gpl_exposure_to_samples_seconds", "Exposure event time to its SampleBatch being produced",
                    ["source"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
ANCHOR_AGE = Histogram("gpl_anchor_age_seconds", "Age of the anchor set used to label a batch",
                       buckets=(1, 10, 60, 300, 1800, 3600, 21600, 86400))
ANCHOR_GENERATIONS = Counter("gpl_anchor_generations_total", "Anchor sets generated", ["model", "outcome"])
ANCHOR_TOKENS = Counter("gpl_anchor_tokens_total", "Tokens generated for anchors", ["model"])
DEFERRED = Gauge("gpl_labeler_deferred_batches", "Unexposed batches waiting for their user's anchors")
JOIN_PENDING = Gauge("gpl_join_pending_requests", "Recall or exposure events waiting for their partner")
TRAINER_LOSS = Gauge("gpl_trainer_loss", "Last mini-batch loss of the pre-ranker", ["part"])
CHECKPOINT_VERSION = Gauge("gpl_trainer_checkpoint_version", "Last durable checkpoint version")


def serve(port: int) -> None:
    if port:
        start_http_server(port)
