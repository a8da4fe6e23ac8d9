"""The JSONL event file: one event per line, with its topic, so any dataset can be replayed.

Format (documented in docs/operations.md, "The event file format")::

    {"topic": "items",    "value": {"item_id": 1, "text": "Toy Story (1995) ...", "category": "Animation"}}
    {"topic": "recall",   "value": {"request_id": "r1", "user_id": "u1", "ts": 1700000000000, "item_ids": [...]}}
    {"topic": "exposure", "value": {"request_id": "r1", "user_id": "u1", "ts": 1700000000500, "items": [...]}}

``value`` is the topic's contract (schemas/events.py). The message key is derived from the topic's key
field, the record timestamp from ``value.ts`` (0 when absent). Lines are replayed in file order;
``gpl replay`` paces them by ``ts``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson
from pydantic import BaseModel

from schemas.codec import DecodeError
from schemas.topics import spec


@dataclass(frozen=True)
class JsonlEvent:
    topic: str
    key: bytes | None
    value: bytes
    ts: int
    line: int


def key_of(topic: str, value: dict[str, object]) -> bytes | None:
    k = value.get(spec(topic).key)
    return None if k is None else str(k).encode()


def read_events(path: Path | str) -> Iterator[JsonlEvent]:
    """Yield events in file order; the value is re-serialized bytes, not validated (the pipeline does that,
    so a replayed bad event reaches the DLQ exactly as it would from a producer)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise DecodeError("malformed_json", f"{path}:{n}: {e}") from None
            topic = obj.get("topic")
            if not isinstance(topic, str):
                raise DecodeError("schema", f"{path}:{n}: missing 'topic'")
            spec(topic)
            value = obj.get("value")
            if isinstance(value, str):  # a raw (possibly malformed) payload, kept as-is for DLQ tests
                yield JsonlEvent(topic, obj.get("key", "").encode() or None, value.encode(), 0, n)
                continue
            if not isinstance(value, dict):
                raise DecodeError("schema", f"{path}:{n}: 'value' must be an object or a raw string")
            ts = value.get("ts", 0)
            yield JsonlEvent(topic, key_of(topic, value), orjson.dumps(value), ts if isinstance(ts, int) else 0, n)


def write_events(out: IO[bytes], events: Iterable[tuple[str, BaseModel]]) -> int:
    n = 0
    for topic, msg in events:
        out.write(orjson.dumps({"topic": topic, "value": msg.model_dump(mode="json", exclude_none=True)}))
        out.write(b"\n")
        n += 1
    return n
