"""Prometheus metrics of the anchors stage: generation, its replay cache, the regeneration policy.

Set by loop.py, engine.py, sets.py, generation_cache.py and generators/retrying.py; the shared ones
(messages, lag, stage up) are the foundation's (runtime/metrics.py, which also serves ``/metrics``).
One module for the stage, so importing any of those registers all of the stage's families.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ANCHOR_GENERATIONS = Counter("gpl_anchor_generations_total", "Anchor sets generated", ["model", "outcome"])
ANCHOR_TOKENS = Counter("gpl_anchor_tokens_total", "Tokens generated for anchors", ["model"])

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
