"""orjson on the wire; decoding errors are values with a reason, never exceptions that escape.

:func:`decode` is the one decode entry point: it accepts plain JSON and the Confluent wire format
(``schemas/wire.py``), whose framing it strips before the pydantic contract validates the JSON.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.dlq import REDRIVE_HEADER, DeadLetter
from schemas.wire import FrameError, is_framed, unframe

M = TypeVar("M", bound=BaseModel)


class DecodeError(Exception):
    """Bad input: ``reason`` is a short class for counting, ``str(self)`` the detail for a human."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def encode(msg: BaseModel) -> bytes:
    return orjson.dumps(msg.model_dump(mode="json", exclude_none=True), option=orjson.OPT_SERIALIZE_NUMPY)


def decode(raw: bytes | None, value_type: type[M]) -> M:
    """Parse and validate one message; raises :class:`DecodeError` with a countable reason."""
    if raw is None:
        raise DecodeError("empty", "message has no value (tombstone or null)")
    try:
        obj = orjson.loads(unframe(raw)[1] if is_framed(raw) else raw)  # registry checks, if any, ran before
    except FrameError as e:
        raise DecodeError("bad_frame", str(e)) from None
    except orjson.JSONDecodeError as e:
        raise DecodeError("malformed_json", f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DecodeError("schema", f"expected a JSON object, got {type(obj).__name__}")
    try:
        return value_type.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise DecodeError("schema", f"{value_type.__name__}: {loc}: {first.get('msg')}") from None


# room left in a DLQ record for everything but the base64 payload (error text <= 2,000 chars, origin, key)
DLQ_OVERHEAD_BYTES = 16_384


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: str,
    reason: str,
    stage: str,
    max_bytes: int | None = None,
    redrives: int = 0,
) -> DeadLetter:
    """The DLQ record of one input. With ``max_bytes`` (the producer's message limit) an original whose
    record would not fit keeps only its first bytes, plus its size and sha256: a dead letter that the
    producer refuses is a message that ends nowhere, and the stage would fail on it again after a restart.
    A record that ``gpl dlq redrive`` sent (``redrives`` > 0, from :func:`redrive_count`) and that failed
    again is ``redrive_exhausted`` whatever went wrong; the first reason leads its error text."""
    if redrives > 0:
        error, reason = f"{reason} after {redrives} redrive(s): {error}", "redrive_exhausted"
    raw = value or b""
    original_size: int | None = None
    digest: str | None = None
    if max_bytes is not None:
        budget = max(0, (max_bytes - DLQ_OVERHEAD_BYTES - len(key or b"")) * 3 // 4)  # base64: 4 chars per 3 bytes
        if len(raw) > budget:
            original_size, digest = len(raw), hashlib.sha256(raw).hexdigest()
            raw = raw[:budget]
    return DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key.decode("utf-8", "replace")[:1024] if key is not None else None,
        value=base64.b64encode(raw).decode("ascii"),
        error=error[:2000],
        reason=reason,
        stage=stage,
        ts=int(time.time() * 1000),
        original_size=original_size,
        sha256=digest,
        redrives=redrives or None,
    )


def redrive_count(headers: object) -> int:
    """The redrive count a record carries in its headers (0: none, or unreadable); headers as the clients
    give them: confluent-kafka's list of (name, bytes) or None, faust's list of pairs or dict."""
    if not headers:
        return 0
    pairs = headers.items() if isinstance(headers, dict) else headers
    try:
        for name, value in pairs:  # type: ignore[attr-defined]
            if name == REDRIVE_HEADER:
                return max(0, int(bytes(value).decode("ascii")))
    except (TypeError, ValueError, UnicodeDecodeError):
        return 0
    return 0
