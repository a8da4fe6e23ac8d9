"""Co-partitioning of the join's inputs: checked at start, watched while running.

The join meets a request's recall and exposure in one partition, so it is only correct when both
topics have the same partition count and every producer places a user's events with the same
partitioner (murmur2 of the UTF-8 ``user_id``, docs/producers.md). A count mismatch is refused at
start, because no processing could repair it. A producer with another partitioner cannot be seen at
start; its symptom is a request whose two halves arrive on different partitions. When one process owns
both partitions the join still succeeds and :class:`SplitWatch` counts it (``split_partitions`` in the
streams accounting, ``gpl_streams_split_requests_total``); across processes the halves never meet and
expire, which is why a non-zero count is worth an alert.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from confluent_kafka.admin import AdminClient

from runtime.kafka import Accounting
from runtime.settings import KafkaSettings
from streams.join import Pending
from streams.metrics import SPLIT_REQUESTS

log = logging.getLogger(__name__)



class CopartitionError(RuntimeError):
    """The join's input topics cannot be co-partitioned as they stand."""


def check_counts(counts: Mapping[str, int | None], expected: int) -> None:
    """Raise :class:`CopartitionError` unless every existing input topic has ``expected`` partitions.

    ``counts`` maps a topic to its partition count, None when it does not exist yet (faust then creates
    it with ``expected``, the ``kafka.partitions`` setting its tables use as well).
    """
    existing = {t: n for t, n in counts.items() if n is not None}
    if len(set(existing.values())) > 1:
        listed = ", ".join(f"{t}={n}" for t, n in sorted(existing.items()))
        raise CopartitionError(
            f"the join's input topics have different partition counts ({listed}): a user's recall and exposure "
            "land in different partitions and never meet. Give them one count (kafka.partitions) and "
            "re-create or expand the smaller one; the streams stage will not start until then.")
    wrong = {t: n for t, n in existing.items() if n != expected}
    if wrong:
        listed = ", ".join(f"{t}={n}" for t, n in sorted(wrong.items()))
        raise CopartitionError(
            f"input topics have {listed} partitions but kafka.partitions is {expected}: the streams tables are "
            f"partitioned by kafka.partitions and must match their source topics. Set "
            f"GPL_KAFKA__PARTITIONS={next(iter(wrong.values()))} or re-create the topics.")


def topic_partitions(kafka: KafkaSettings, topics: list[str], timeout: float = 30.0) -> dict[str, int | None]:
    """Partition counts from the cluster's metadata; None for a topic that does not exist."""
    md = AdminClient(kafka.client_config()).list_topics(timeout=timeout).topics
    return {t: (len(md[t].partitions) if t in md and md[t].error is None else None) for t in topics}


def verify_copartitioned(kafka: KafkaSettings, topics: list[str], timeout: float = 30.0) -> dict[str, int | None]:
    """The start-up check of the streams stage: read the counts, refuse a mismatch, return the counts."""
    counts = topic_partitions(kafka, topics, timeout)
    check_counts(counts, kafka.partitions)
    log.info("streams: input topics co-partitioned: %s", counts)
    return counts


class SplitWatch:
    """Counts joins whose halves came from different partitions (see the module docstring)."""

    def __init__(self, accounting: Accounting) -> None:
        self.accounting = accounting
        self._warned = False

    def joined(self, first: Pending | None, partition: int) -> bool:
        """``first``: the pending record of the half that came first; ``partition``: the second's.

        True (and counted) when they differ. The first split is logged once, with what it means.
        """
        if first is None:
            return False
        earlier = first.partition
        if earlier == partition:
            return False
        self.accounting.add("split_partitions")
        SPLIT_REQUESTS.inc()
        if not self._warned:
            self._warned = True
            log.warning("streams: a request's recall and exposure came on partitions %d and %d: a producer keys or "
                        "partitions differently (docs/producers.md); across processes such requests expire "
                        "unjoined", earlier, partition)
        return True
