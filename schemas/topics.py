"""Every topic, its record type, its key and its dead-letter topic, declared once.

Faust binds ``value_type`` to a topic; we do the same for all stages (faust and confluent-kafka alike)
so a reader sees the whole contract of the system in this one table. All user-keyed topics share one
partition count so a user's recall, exposure, interest state and anchors live in one partition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
from schemas.serde import JSON, Serde


@dataclass(frozen=True)
class Naming:
    """Where the logical names meet a shared cluster: ``prefix`` before every topic (``team-a.`` gives
    ``team-a.recall``, ``team-a.recall.dlq`` and the streams app's ``team-a.gpl-streams-…`` internal topics)
    and ``renames`` of single topics by logical name (``{"recall": "search.recall.v2"}``: taken as is, no
    prefix). A topic's dead-letter topic follows its physical name (``<name>.dlq``)."""

    prefix: str = ""
    renames: Mapping[str, str] = field(default_factory=dict)

    def physical(self, logical: str) -> str:
        return self.renames.get(logical) or f"{self.prefix}{logical}"

    def check(self) -> Naming:
        """Refuse a rename of a topic this table does not declare (a typo would rename nothing)."""
        unknown = sorted(set(self.renames) - set(TOPICS))
        if unknown:
            raise ValueError(f"kafka.topic_names: unknown topic(s) {', '.join(unknown)}; known: {', '.join(TOPICS)}")
        return self


# Process-wide, like the logging configuration: set once at the edge from the settings (kafka.topic_prefix,
# kafka.topic_names; runtime/settings.py KafkaSettings.apply_topic_names) by the CLI, the stack and a
# stage's child process, and read by every TopicSpec.name below: one registry, no name built elsewhere.
_naming = Naming()


def configure(naming: Naming) -> Naming:
    """Use ``naming`` from now on in this process; returns the previous one (to restore it)."""
    global _naming
    before, _naming = _naming, naming.check()
    _resolved.clear()
    return before


def naming() -> Naming:
    return _naming


@dataclass(frozen=True)
class TopicSpec:
    logical: str  # the name in this table, in event files (JSONL ``topic``) and in the docs
    value_type: type[BaseModel]
    key: str  # the field whose value is the message key
    compacted: bool = False
    dlq: bool = True  # whether a <name>.dlq topic exists for its bad input
    declared_serde: Serde = JSON  # the format of its values, unless this process binds another

    @property
    def serde(self) -> Serde:
        """The format its values are written and read in: the binding of this process, else the declared one."""
        return _bound.get(self.logical, self.declared_serde)

    @property
    def name(self) -> str:
        """The topic on the broker: the logical name under this process's :class:`Naming`."""
        return _naming.physical(self.logical)

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

TOPICS: dict[str, TopicSpec] = {  # by logical name
    t.logical: t for t in (ITEMS, RECALL, EXPOSURE, UNEXPOSED, ANCHOR_REQUESTS, ANCHORS, SAMPLES)
}
"""Input topics a producer may write to with ``gpl replay``."""
EVENT_TOPICS = ("items", "recall", "exposure")

# The streams processor's internal topic (streams/app.py): the memory-guard timer and the unknown-items hold
# hand due requests to the agent through it, at the request's partition, because only the agent may write
# tables. Declared here so operators create it with the others (same partition count: it is co-partitioned
# with recall and exposure); its name follows the streams app id (settings streams.app_id).
STREAMS_APP_ID = "gpl-streams"


def under_prefix(name: str) -> str:
    """A name the product puts on the broker outside this table (the streams app id, the benchmark's own
    topics): under the prefix too, so a shared cluster sees no name of ours outside it."""
    return f"{_naming.prefix}{name}"


def app_id(configured: str = STREAMS_APP_ID) -> str:
    """The streams app id on the broker (faust's group id and the stem of its internal topics: changelogs,
    the assignor's, the expiry topic): under the prefix, so a shared cluster sees no name outside it."""
    return under_prefix(configured)


def expiry_topic(configured_app_id: str = STREAMS_APP_ID) -> str:
    return f"{app_id(configured_app_id)}-expiry"


def internal_topics(configured_app_id: str = STREAMS_APP_ID) -> list[str]:
    return [expiry_topic(configured_app_id)]


def dlq_topics() -> list[str]:
    return [t.dlq_name for t in TOPICS.values() if t.dlq]


def all_topic_names(configured_app_id: str = STREAMS_APP_ID) -> list[str]:
    return [*(t.name for t in TOPICS.values()), *dlq_topics(), *internal_topics(configured_app_id)]


def by_name(name: str) -> TopicSpec | None:
    """The spec of a topic (or of its dead-letter topic) by its name on the broker, or by its logical name."""
    base = name.removesuffix(".dlq")
    return next((t for t in TOPICS.values() if t.name == base), None) or TOPICS.get(base)


def broker_name(typed: str) -> str:
    """The topic on the broker for a name an operator typed (``gpl topics create``, ``replay --topic/--to``,
    ``groups reset --topic``): a registry topic's logical name, or its ``.dlq``, under this process's naming
    (``recall`` → ``team-a.recall``); a name already on the broker, or any other, as typed."""
    base = by_name(typed.removesuffix(".dlq"))
    if base is None:
        return typed
    return base.dlq_name if typed.endswith(".dlq") else base.name


def spec(name: str) -> TopicSpec:
    """The spec of a logical topic name (event files and commands name topics this way)."""
    try:
        return TOPICS[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {', '.join(TOPICS)}") from None


# Formats bound in this process over the declared ones (by logical name), and the format of each topic name a
# reader or writer asked for (a cache: a Wire asks per record; cleared whenever a binding or the naming changes)
_bound: dict[str, Serde] = {}
_resolved: dict[str, Serde] = {}


def bind_serde(logical: str, serde: Serde | None) -> Serde | None:
    """Write and read topic ``logical`` in ``serde`` from now on in this process (None: its declared format
    again); returns the previous binding. Like :func:`configure`, set at the edge before the stages start:
    every writer and reader of the topic must agree, so bind it in every process that touches it."""
    spec(logical)  # refuse an unknown topic
    before = _bound.pop(logical, None)
    if serde is not None:
        _bound[logical] = serde
    _resolved.clear()
    return before


def serde_of(name: str) -> Serde:
    """The format of a topic by its name on the broker (or its logical name). Dead-letter topics hold
    :class:`DeadLetter` records in JSON whatever their source's format (the original bytes are inside, in
    base64), and a name the table does not declare is JSON, as every topic was before formats were bound."""
    got = _resolved.get(name)
    if got is None:
        base = None if name.endswith(".dlq") else by_name(name)
        got = _resolved[name] = base.serde if base is not None else JSON
    return got


__all__ = ["bind_serde", "serde_of", "Naming", "configure", "naming", "app_id", "by_name",
           "TopicSpec", "TOPICS", "EVENT_TOPICS", "PSEUDO_HEADER", "STREAMS_APP_ID", "spec", "dlq_topics",
           "expiry_topic", "internal_topics", "all_topic_names", "DeadLetter"]
