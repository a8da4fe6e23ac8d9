"""UnexposedBatch bytes straight into arrays: the labeler's fast decoder, never per-candidate objects.

Anything unusual falls back to the pydantic contract, whose DecodeError carries the DLQ reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import orjson

from schemas.codec import decode
from schemas.events import MAX_EPOCH_MS, MAX_ID_CHARS, SCHEMA_VERSION, UnexposedBatch

log = logging.getLogger(__name__)




@dataclass(frozen=True, slots=True)
class Unexposed:
    """A decoded UnexposedBatch in array form (no per-candidate objects)."""

    request_id: str
    user_id: str
    ts: int
    item_ids: np.ndarray  # int64


def decode_unexposed(raw: bytes | None) -> Unexposed:
    """Parse an UnexposedBatch straight into arrays; anything unusual goes through the pydantic contract.

    The fast path accepts only what the contract accepts (ints ≥ 0 that fit int64, a known schema
    version, non-empty ids of bounded length); doubt falls back to :func:`schemas.codec.decode`, whose
    DecodeError carries the reason the DLQ records. numpy's dtype inference over the id list is the
    type check: ``sum`` of the list is an int only when every element is one (bools count as ints, as
    in pydantic's lax mode; floats give a float, strings and nesting a TypeError), then ``fromiter``
    into int64 raises on an id that does not fit (half the time of ``np.array``'s dtype inference).
    """
    ok = False
    if raw is not None:
        try:
            obj = orjson.loads(raw)
            rid, uid, ts, ids_l = obj["request_id"], obj["user_id"], obj["ts"], obj["item_ids"]
            ver = obj.get("schema_version", 1)
            rs = obj.get("recall_scores", ())
            ok = (type(rid) is str and type(uid) is str and 0 < len(rid) <= MAX_ID_CHARS
                  and 0 < len(uid) <= MAX_ID_CHARS and type(ts) is int and 0 <= ts <= MAX_EPOCH_MS
                  and type(ver) is int
                  and 1 <= ver <= SCHEMA_VERSION and type(ids_l) is list and len(ids_l) > 0
                  and (rs == () or (type(rs) is list and _numbers(rs))))
            if ok and type(sum(ids_l)) is int:
                ids = np.fromiter(ids_l, np.int64, len(ids_l))
                ok = int(ids.min()) >= 0
            else:
                ok = False
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, AttributeError):
            ok = False
    if not ok:
        ev = decode(raw, UnexposedBatch)  # raises DecodeError with the contract's reason
        rid, uid, ts = ev.request_id, ev.user_id, ev.ts
        ids = np.asarray(ev.item_ids, dtype=np.int64)
    return Unexposed(rid, uid, ts, ids)


def _numbers(xs: list[object]) -> bool:
    return type(sum(xs)) in (int, float)  # type: ignore[arg-type]
