"""The fast codecs of the two largest messages, beside the contract they must agree with.

A recall (thousands of candidates) and an unexposed batch are read and written straight between JSON
and numpy arrays, never as per-candidate objects. They live here, next to their contracts
(``schemas/recall.py``, ``schemas/unexposed.py``), so the contract's rules (id lengths, the
epoch-milliseconds bound, the seconds guard, the known versions) are written once for every stage that
reads or writes these messages: the streams stage imports the recall decoder and both encoders, the
labeler the unexposed decoder. Any doubt falls back to the pydantic
contract (:func:`schemas.codec.decode`), so an error message and its DLQ reason are always the
contract's own; tests/unit/schemas/test_recall_decode.py checks, property by property, that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
import pybase64

from schemas.codec import DecodeError, decode
from schemas.contract import MAX_EPOCH_MS, MAX_ID_CHARS, SCHEMA_VERSION, looks_like_seconds
from schemas.events import ExposureEvent
from schemas.ids import sample_id
from schemas.recall import RECALL_SCHEMA_VERSION, RecallEvent
from schemas.unexposed import PACKED_IDS, UNEXPOSED_SCHEMA_VERSION, UnexposedBatch

# UnexposedBatch's packed id forms (PACKED_IDS): little-endian whatever this machine's byte order
_PACKED: dict[str, np.dtype[np.integer]] = {form: np.dtype(dt) for form, (_, dt) in PACKED_IDS.items()}
_LE32, _LE64 = _PACKED["item_ids_le32"], _PACKED["item_ids_le64"]
_U32_MAX = int(np.iinfo(_LE32).max)
_ID_FORMS = ("item_ids", *PACKED_IDS)
# what a malformed value raises on the fast paths (binascii.Error, from a base64 decoder, is a ValueError)
_DOUBT = (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, AttributeError)


def plausible_head(request_id: object, user_id: object, ts: object) -> bool:
    """The contract's rules on a request's head (``RequestId``, ``UserId``, ``EpochMs``), as one cheap
    check of JSON values: False sends the message to the contract, which names what is wrong."""
    return (type(request_id) is str and type(user_id) is str and 0 < len(request_id) <= MAX_ID_CHARS
            and 0 < len(user_id) <= MAX_ID_CHARS and type(ts) is int and 0 <= ts <= MAX_EPOCH_MS
            and not looks_like_seconds(ts))


# ------------------------------------------------------------------------------------------ recall


@dataclass(frozen=True)
class Recall:
    """A decoded recall event in array form (the fast path: no per-candidate objects)."""

    request_id: str
    user_id: str
    ts: int
    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32
    unique: bool = False  # every item id once (version 2 guarantees it; version 1 may repeat one)


def decode_recall(raw: bytes | None, max_candidates: int) -> Recall:
    """Parse a RecallEvent straight into arrays; any doubt falls back to the pydantic contract so the
    error message (and DLQ reason) is the contract's own.

    Version 2 (columns) never builds a per-candidate Python object: orjson gives lists, numpy infers
    one dtype per list in C (int64 only when every id is an int that fits, so floats, strings, bools
    alone and out-of-range ids all fall back), and ``"".join`` type-checks the sources. Version 1
    (candidate objects) still decodes, one dict per candidate, as before. ``None`` (a tombstone) goes
    to the contract, which calls it 'empty'. More than ``max_candidates`` is ``oversized`` and none
    ``empty_candidates``: the streams stage's limits, told apart from the contract's errors.
    """
    try:
        obj = orjson.loads(raw)  # type: ignore[arg-type]
        rid, uid, ts = obj["request_id"], obj["user_id"], obj["ts"]
        ok = plausible_head(rid, uid, ts)
        if ok and "candidates" not in obj:
            ids, scores, ok = _columns(obj)
        elif ok:
            ids, scores, ok = _candidates(obj)
    except _DOUBT:
        ok = False
    unique = ok and "candidates" not in obj  # the version 2 fast path rejected repeats
    if not ok:
        ev = decode(raw, RecallEvent)  # raises DecodeError with the contract's reason
        unique = False  # a version 1 recall arrives here converted to columns, repeats and all
        ids = np.asarray(ev.item_ids, dtype=np.int64)
        scores = (np.zeros(len(ids), np.float32) if ev.scores is None else np.asarray(ev.scores, dtype=np.float32))
        rid, uid, ts = ev.request_id, ev.user_id, ev.ts
    if len(ids) == 0:
        raise DecodeError("empty_candidates", f"recall {rid} has no candidates")
    if len(ids) > max_candidates:
        raise DecodeError("oversized", f"recall {rid} has {len(ids)} candidates > max {max_candidates}")
    return Recall(rid, uid, ts, ids, scores, unique)


_NO_ARRAYS = (np.zeros(0, np.int64), np.zeros(0, np.float32), False)


def _columns(obj: dict[str, object]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, scores, ok) of a version 2 recall; ok is False whenever the contract must judge."""
    ids_l, scores_l, sources = obj["item_ids"], obj.get("scores"), obj.get("sources")
    if obj.get("schema_version", RECALL_SCHEMA_VERSION) != RECALL_SCHEMA_VERSION or type(ids_l) is not list:
        return _NO_ARRAYS
    n = len(ids_l)
    ids = np.array(ids_l)
    if ids.dtype != np.int64 or ids.ndim != 1 or (n and int(ids.min()) < 0):
        return _NO_ARRAYS
    if n > 1:
        srt = np.sort(ids)
        if (srt[1:] == srt[:-1]).any():
            return _NO_ARRAYS  # a repeated item: the contract names the error
    if scores_l is None:
        scores = np.zeros(n, np.float32)
    else:
        if type(scores_l) is not list or len(scores_l) != n:
            return _NO_ARRAYS
        sc = np.array(scores_l)
        if n and (sc.ndim != 1 or sc.dtype.kind not in "if"):
            return _NO_ARRAYS
        scores = sc.astype(np.float32)
    if sources is not None and (type(sources) is not list or len(sources) != n or type("".join(sources)) is not str):
        return _NO_ARRAYS
    return ids, scores, True


def _candidates(obj: dict[str, object]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, scores, ok) of a version 1 recall (candidate objects): one dict per candidate, as v1 costs."""
    cands = obj["candidates"]
    if obj.get("schema_version", 1) != 1 or "item_ids" in obj or type(cands) is not list:
        return _NO_ARRAYS
    ids = np.array([c["item_id"] for c in cands], dtype=np.int64)
    scores = np.array([c.get("score", 0.0) for c in cands], dtype=np.float32)
    ok = all(type(c["item_id"]) is int for c in cands) and (len(ids) == 0 or int(ids.min()) >= 0)
    return ids, scores, ok


# ------------------------------------------------------------------------------------------ samples


def encode_real_samples(exposure: ExposureEvent) -> bytes:
    """The real labels of a request as SampleBatch JSON: every exposed item exactly once, 1 if clicked, else
    an exposed negative. Written by orjson from plain dicts (the contract's own encoding, field for field,
    tested), since pydantic objects per exposed item were a tenth of the streams stage's time."""
    rid = exposure.request_id
    samples = [{"sample_id": sample_id(rid, it.item_id), "item_id": it.item_id, "label": 1.0 if it.clicked else 0.0,
                "weight": 1.0, "source": "click" if it.clicked else "exposed-negative", "position": it.position}
               for it in exposure.items]
    return orjson.dumps({"schema_version": SCHEMA_VERSION, "request_id": rid, "user_id": exposure.user_id,
                         "ts": exposure.ts, "samples": samples, "candidates_total": len(samples), "sampled_out": 0})


# ------------------------------------------------------------------------------------------ unexposed


@dataclass(frozen=True, slots=True)
class Unexposed:
    """A decoded UnexposedBatch in array form (no per-candidate objects)."""

    request_id: str
    user_id: str
    ts: int
    item_ids: np.ndarray  # int64


def encode_unexposed(request_id: str, user_id: str, ts: int, item_ids: np.ndarray,
                     recall_scores: np.ndarray | None, *, version: int = UNEXPOSED_SCHEMA_VERSION) -> bytes:
    """The biggest message as UnexposedBatch JSON, orjson straight from the arrays (no list, no pydantic).

    ``version`` 2 (the default) packs the ids: base64 of little-endian ``item_ids_le32`` when every id
    fits 32 unsigned bits, else ``item_ids_le64``. Version 1 writes them as a JSON list, for labelers
    of an older release during a rolling upgrade. Scores (unless None: the contract's default, no
    scores) are rounded to 6 decimals as float64 (what the contract's float round-trips).
    """
    out: dict[str, object] = {"schema_version": version, "request_id": request_id, "user_id": user_id, "ts": ts}
    if version >= 2:  # the narrowest packed form that holds every id
        narrow = item_ids.shape[0] == 0 or int(item_ids.max()) <= _U32_MAX
        ids = np.ascontiguousarray(item_ids, dtype=_LE32 if narrow else _LE64)
        out["item_ids_le32" if narrow else "item_ids_le64"] = pybase64.b64encode(ids.tobytes()).decode("ascii")
    else:
        out["item_ids"] = np.ascontiguousarray(item_ids, dtype=np.int64)
    if recall_scores is not None:
        out["recall_scores"] = np.round(recall_scores.astype(np.float64), 6)
    return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_unexposed(raw: bytes | None) -> Unexposed:
    """Parse an UnexposedBatch straight into arrays; anything unusual goes through the pydantic contract.

    The fast path accepts only what the contract accepts (ints ≥ 0 that fit int64, a known schema
    version, non-empty ids of bounded length); doubt falls back to :func:`schemas.codec.decode`, whose
    DecodeError carries the reason the DLQ records. numpy's dtype inference over the id list is the
    type check: ``sum`` of the list is an int only when every element is one (bools count as ints, as
    in pydantic's lax mode; floats give a float, strings and nesting a TypeError), then ``fromiter``
    into int64 raises on an id that does not fit (half the time of ``np.array``'s dtype inference).
    Packed ids (``item_ids_le32``/``item_ids_le64``, version 2, what the streams stage writes) skip
    all that: the base64 decode's bytes are the array (pybase64's SIMD decoder: ~1 µs for 1,000 ids,
    where binascii takes ~20 and a list of 63-bit ids ~50). pybase64 refuses some strings binascii's
    strict mode takes (excess padding); those go through the contract, which decides.
    """
    ok = False
    if raw is not None:
        try:
            obj = orjson.loads(raw)
            rid, uid, ts = obj["request_id"], obj["user_id"], obj["ts"]
            ver = obj.get("schema_version", 1)
            rs = obj.get("recall_scores", ())
            packed, dtype = next(((obj[f], t) for f, t in _PACKED.items() if obj.get(f) is not None), (None, None))
            ok = (plausible_head(rid, uid, ts)
                  and type(ver) is int and 1 <= ver <= UNEXPOSED_SCHEMA_VERSION
                  and (rs == () or (type(rs) is list and _numbers(rs)))
                  and sum(k in obj for k in _ID_FORMS) == 1)  # one id form, as the contract asks
            if not ok:
                pass
            elif packed is not None:  # version 2: one base64 decode, the bytes are the id array
                ok = type(packed) is str and ver >= 2
                if ok:
                    buf = pybase64.b64decode(packed, validate=True)  # stricter than the contract: doubt falls back
                    ok = dtype is not None and len(buf) > 0 and len(buf) % dtype.itemsize == 0
                    if ok:
                        ids = np.frombuffer(buf, dtype).astype(np.int64)
                        ok = int(np.minimum.reduce(ids)) >= 0  # the ufunc: .min() adds a Python wrapper
            else:
                ids_l = obj["item_ids"]
                ok = type(ids_l) is list and len(ids_l) > 0 and type(sum(ids_l)) is int
                if ok:
                    ids = np.fromiter(ids_l, np.int64, len(ids_l))
                    ok = int(np.minimum.reduce(ids)) >= 0
        except _DOUBT:
            ok = False
    if not ok:
        ev = decode(raw, UnexposedBatch)  # raises DecodeError with the contract's reason
        rid, uid, ts = ev.request_id, ev.user_id, ev.ts
        ids = np.asarray(ev.item_ids, dtype=np.int64)
    return Unexposed(rid, uid, ts, ids)


def _numbers(xs: list[object]) -> bool:
    return type(sum(xs)) in (int, float)  # type: ignore[arg-type]
