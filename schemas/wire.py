"""The Confluent wire format: magic byte 0, a 4-byte big-endian schema id, then the JSON payload.

Producers that use Confluent's serializers frame every message this way. Our own JSON always starts
with ``{``, so one byte tells the two formats apart and every decode site can accept both. This module
only frames and unframes; looking the schema id up in a registry is the runtime's job
(``runtime/serde.py``), because the contracts layer holds no clients.
"""

from __future__ import annotations

import struct

MAGIC = 0
HEADER_LEN = 5
_HEADER = struct.Struct(">bI")


class FrameError(ValueError):
    """A message starts with the magic byte but is too short to hold a schema id
    (:func:`schemas.codec.decode` turns it into the DLQ reason ``bad_frame``)."""


def subject(topic: str) -> str:
    """The registry subject of a topic's values (Confluent's default TopicNameStrategy)."""
    return f"{topic}-value"


def is_framed(raw: bytes | None) -> bool:
    """True for a Confluent-framed message (plain JSON never starts with a zero byte)."""
    return bool(raw) and raw[0] == MAGIC  # type: ignore[index]


def unframe(raw: bytes) -> tuple[int, bytes]:
    """(schema id, JSON payload) of a framed message; a frame too short to hold an id is bad input."""
    if len(raw) < HEADER_LEN:
        raise FrameError(f"Confluent frame of {len(raw)} bytes has no room for a schema id")
    _, schema_id = _HEADER.unpack_from(raw)
    return schema_id, bytes(raw[HEADER_LEN:])


def payload(raw: bytes | None) -> bytes | None:
    """The JSON of a message in either format: framing stripped, plain JSON returned as is."""
    return unframe(raw)[1] if raw is not None and is_framed(raw) else raw


def frame(schema_id: int, body: bytes) -> bytes:
    """Prefix a JSON payload with the Confluent header (tests and tools; writers use the serializer)."""
    return _HEADER.pack(MAGIC, schema_id) + body
