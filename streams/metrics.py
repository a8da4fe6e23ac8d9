"""Prometheus metrics of the streams stage (the join): declared here, next to the code that sets them.

The shared ones (messages, lag, stage up, faust's producer back-pressure) are the foundation's:
runtime/metrics.py, which also serves ``/metrics``. Importing this module registers the families, so
the stage's modules import it (streams/app.py) and a streams process shows them before the first join.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

JOIN_PENDING = Gauge("gpl_join_pending_requests", "Recall or exposure events waiting for their partner")

# ---- co-partitioning (streams/copartition.py): a producer keyed or partitioned differently splits requests
SPLIT_REQUESTS = Counter("gpl_streams_split_requests_total",
                         "Joined requests whose recall and exposure arrived on different partitions "
                         "(a producer with another key or partitioner; docs/producers.md)")
