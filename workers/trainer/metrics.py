"""Prometheus metrics of the trainer stage: loss, checkpoints, the publishing gate, offset resets.

Set by stage.py, publish.py, published_area.py and offsets.py; the shared ones (messages, lag, stage up) are the
foundation's (runtime/metrics.py, which also serves ``/metrics``). Importing this module registers the
families.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TRAINER_LOSS = Gauge("gpl_trainer_loss", "Last mini-batch loss of the pre-ranker", ["part"])
CHECKPOINT_VERSION = Gauge("gpl_trainer_checkpoint_version", "Last durable checkpoint version")
# when the last checkpoint was written: the stalled-checkpoint alert's clock (0 until the first one)
CHECKPOINT_TIME = Gauge("gpl_trainer_last_checkpoint_timestamp_seconds",
                        "Unix time of the last durable checkpoint this process wrote")

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
