"""Prometheus metrics of the calibration monitor (workers/calibration.py, a one-module stage).

A module of its own, like each stage package's ``metrics.py``, so that every metric module of the
project is found by name (``metrics.py`` or ``*_metrics.py``: tests/unit/app/test_deploy.py collects
them). The shared ones (messages, lag, stage up) are the foundation's (runtime/metrics.py, which also
serves ``/metrics``).

Closed-loop calibration of pseudo-labels: a pseudo-label joined with the real label its (user, item)
got later. Labels: the anchor generator (model, prompt hash) and whether the anchors were the
fallback; never the per-user anchor version (epoch ms: unbounded cardinality).
"""

from __future__ import annotations

from prometheus_client import Gauge

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
