"""Every topic, its record type, its key and its dead-letter topic, declared once.

Faust binds ``value_type`` to a topic; we do the same for all stages (faust and confluent-kafka alike)
so a reader sees the whole contract of the system in this one table. All user-keyed topics share one
partition count so a user's recall, exposure, interest state and anchors live in one partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from schemas.events import (
    AnchorRequest,
    AnchorSet,
    DeadLetter,
    ExposureEvent,
    ItemEvent,
    RecallEvent,
    SampleBatch,
    UnexposedBatch,
)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    value_type: type[BaseModel]
    key: str  # the field whose value is the message key
    compacted: bool = False
    dlq: bool = True  # whether a <name>.dlq topic exists for its bad input

    @property
    def dlq_name(self) -> str:
        return f"{self.name}.dlq"


ITEMS = TopicSpec("items", ItemEvent, key="item_id", compacted=True)
RECALL = TopicSpec("recall", RecallEvent, key="user_id")
EXPOSURE = TopicSpec("exposure", ExposureEvent, key="user_id")
UNEXPOSED = TopicSpec("unexposed", UnexposedBatch, key="user_id")
ANCHOR_REQUESTS = TopicSpec("anchor-requests", AnchorRequest, key="user_id")
ANCHORS = TopicSpec("anchors", AnchorSet, key="user_id", compacted=True)
SAMPLES = TopicSpec("samples", SampleBatch, key="user_id")
# A header on the labeler's own ``samples`` records: they hold only pseudo-labels. The labeler reads
# ``samples`` for the real labels among them and skips its own batches by this header instead of
# parsing ~10 kB of JSON each; a record without it (other writers, a copy that dropped headers) is parsed.
PSEUDO_HEADER = ("gpl-labels", b"pseudo")

TOPICS: dict[str, TopicSpec] = {
    t.name: t for t in (ITEMS, RECALL, EXPOSURE, UNEXPOSED, ANCHOR_REQUESTS, ANCHORS, SAMPLES)
}
"""Input topics a producer may write to with ``gpl replay``."""
EVENT_TOPICS = ("items", "recall", "exposure")

# The streams processor's internal topic (streams/app.py): the memory-guard timer and the unknown-items hold
# hand due requests to the agent through it, at the request's partition, because only the agent may write
# tables. Declared here so operators create it with the others (same partition count: it is co-partitioned
# with recall and exposure); its name follows the streams app id (settings streams.app_id).
STREAMS_APP_ID = "gpl-streams"


def expiry_topic(app_id: str = STREAMS_APP_ID) -> str:
    return f"{app_id}-expiry"


def internal_topics(app_id: str = STREAMS_APP_ID) -> list[str]:
    return [expiry_topic(app_id)]


def dlq_topics() -> list[str]:
    return [t.dlq_name for t in TOPICS.values() if t.dlq]


def all_topic_names(app_id: str = STREAMS_APP_ID) -> list[str]:
    return [*TOPICS, *dlq_topics(), *internal_topics(app_id)]


def spec(name: str) -> TopicSpec:
    try:
        return TOPICS[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {', '.join(TOPICS)}") from None


__all__ = ["TopicSpec", "TOPICS", "EVENT_TOPICS", "PSEUDO_HEADER", "STREAMS_APP_ID", "spec", "dlq_topics",
           "expiry_topic", "internal_topics", "all_topic_names", "DeadLetter"]
