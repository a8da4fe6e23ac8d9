"""The base of every wire contract: the field types at the edge and the ``Contract`` model.

Why a module of its own: every contract module (``schemas/events.py``, ``schemas/recall.py``,
``schemas/unexposed.py``, ``schemas/dlq.py``) builds on these types, and ``schemas/events.py`` re-exports
the others, so the base must sit below all of them. Ids at the edge: ``user_id`` is a string (it is the
partition key of every topic), ``item_id`` a non-negative 64-bit integer (it is also the Qdrant point
id); event time is epoch milliseconds, refused when it looks like seconds.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
MAX_INT64 = 2**63 - 1
# year 3000 in epoch ms: a bound that no real clock reaches, and that keeps event times (and the sums the
# join makes of them, ts + wait) far inside int64, where a 2**63 would overflow the state records
MAX_EPOCH_MS = 32_503_680_000_000

ItemId = Annotated[int, Field(ge=0, le=MAX_INT64)]
MAX_ID_CHARS = 256
UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
# The plausibility bound on event times: epoch *seconds* of any date from 2001-09-09 to year 5138 lie in
# [1e9, 1e11), where milliseconds would mean January 1970 to March 1973, when no event of ours happened.
# So a value there is refused as a producer sending seconds (the first mistake docs/producers.md warns
# about); small values (synthetic clocks and tests count from 0) and real milliseconds pass.
SECONDS_LOW, SECONDS_HIGH = 10**9, 10**11


def looks_like_seconds(ts: int) -> bool:
    """True for an event time that is implausible as milliseconds and plausible as seconds."""
    return SECONDS_LOW <= ts < SECONDS_HIGH


def _not_seconds(ts: int) -> int:
    if looks_like_seconds(ts):
        raise ValueError(f"{ts} is epoch seconds? event times are epoch milliseconds (send {ts * 1000})")
    return ts


EpochMs = Annotated[int, Field(ge=0, le=MAX_EPOCH_MS), AfterValidator(_not_seconds)]


class Contract(BaseModel):
    """Base of every message: frozen, strict about unknown versions, tolerant of extra fields."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION or v < 1:
            raise ValueError(f"unsupported schema_version {v} (this build reads 1..{SCHEMA_VERSION})")
        return v
