"""Contracts of GPL stream: pydantic v2 models, orjson encoding, topic registry, JSONL event files."""

from schemas.codec import DecodeError, dead_letter, decode, encode
from schemas.events import (
    SCHEMA_VERSION,
    Anchor,
    AnchorRequest,
    AnchorSet,
    Candidate,
    DeadLetter,
    ExposedItem,
    ExposureEvent,
    ItemEvent,
    Lineage,
    RecallEvent,
    Sample,
    SampleBatch,
    UnexposedBatch,
)
from schemas.topics import TOPICS, TopicSpec, spec

__all__ = [
    "SCHEMA_VERSION",
    "Anchor",
    "AnchorRequest",
    "AnchorSet",
    "Candidate",
    "DeadLetter",
    "DecodeError",
    "ExposedItem",
    "ExposureEvent",
    "ItemEvent",
    "Lineage",
    "RecallEvent",
    "Sample",
    "SampleBatch",
    "TOPICS",
    "TopicSpec",
    "UnexposedBatch",
    "dead_letter",
    "decode",
    "encode",
    "spec",
]
