"""Prometheus metrics of the labeler stage: latency to samples, anchor age, deferral, abstention, drift.

Set by stage.py and loop.py; the shared ones (messages, lag, stage up) are the foundation's
(runtime/metrics.py, which also serves ``/metrics``). Importing this module registers the families.
"""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

LATENCY = Histogram("gpl_exposure_to_samples_seconds",
                    "Exposure event time to its SampleBatch being produced",
                    ["source"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
ANCHOR_AGE = Histogram("gpl_anchor_age_seconds", "Age of the anchor set used to label a batch",
                       buckets=(1, 10, 60, 300, 1800, 3600, 21600, 86400))
DEFERRED = Gauge("gpl_labeler_deferred_batches", "Unexposed batches waiting for their user's anchors")
ABSTAINING = Gauge("gpl_labeler_abstaining", "1 while the labeler has no usable calibrator (no pseudo-labels)")
CALIBRATION_DRIFT = Gauge("gpl_calibration_drift",
                          "1 while the labeler's closed-loop ECE of pseudo-labels exceeds labeler.ece_alert")
