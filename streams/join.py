"""Pure logic of the recall × exposure join: compact state records and the join itself.

Kept apart from the Faust app so it is tested without a broker. State is bytes, not objects: a recall
of 1,000 candidates is stored as one int64 array (+ float32 recall scores), because every table write
also goes to the changelog topic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from schemas.codec import DecodeError
from schemas.events import ExposureEvent

# the wire codecs live beside the contract (schemas/fast_codec.py); re-exported for gpl/bench and older imports
from schemas.fast_codec import Recall as Recall
from schemas.fast_codec import decode_recall as decode_recall
from schemas.fast_codec import encode_real_samples as encode_real_samples
from schemas.fast_codec import encode_unexposed as encode_unexposed

# kind byte of a join-table record: waiting for its partner (RECALL, EXPOSURE), a recall held until the
# indexer knows its candidates (HELD, may already carry its exposure), or a marker kept after the request
# was joined (DONE) or expired (EXPIRED) to tell duplicates and late partners from re-reads
RECALL, EXPOSURE, HELD, DONE, EXPIRED = b"R", b"E", b"H", b"D", b"X"
PENDING_RECALL, PENDING_EXPOSURE = RECALL, EXPOSURE  # the names streams/app.py uses (its RECALL is a topic)
# every final outcome of an input message besides ``dlq:<reason>`` (streams/app.py counts them)
OUTCOMES = ("joined", "expired", "expired_memory_guard", "exposure_only", "exposure_only_memory_guard",
            "late_exposure", "late_recall", "reread")
WAITING = (RECALL, EXPOSURE, HELD)
# kind, event ts ms, wall-clock deadline ms, partition, recall offset, exposure offset, len(user_id), has arrays
_HEAD = struct.Struct("<cqqHqqH?")
NO_OFFSET = -1


@dataclass(frozen=True)
class Pending:
    """One record of the join table, keyed by request id.

    ``deadline_ms`` is wall clock: the memory guard of a waiting request, the end of a hold, or when a marker
    is forgotten at the latest. The join itself expires by event time (streams/clock.py). The offsets of the
    recall and exposure that made the record tell a re-read after a restart (same offset: already done)
    from a duplicate (another offset).
    """

    kind: bytes
    ts: int
    deadline_ms: int
    user_id: str
    partition: int = 0
    recall_offset: int = NO_OFFSET
    exposure_offset: int = NO_OFFSET
    item_ids: np.ndarray | None = None  # RECALL/HELD: candidates (int64)
    scores: np.ndarray | None = None  # RECALL/HELD: recall scores (float32)
    exposure: bytes | None = None  # EXPOSURE/HELD: the raw exposure event, joined when its recall arrives

    @property
    def waiting_inputs(self) -> int:
        """How many input messages this record holds back from an outcome."""
        if self.kind not in WAITING:
            return 0
        return int(self.recall_offset != NO_OFFSET) + int(self.exposure_offset != NO_OFFSET)

    def pack(self) -> bytes:
        user = self.user_id.encode()
        arrays = self.item_ids is not None and self.kind in (RECALL, HELD)
        head = _HEAD.pack(self.kind, self.ts, self.deadline_ms, self.partition, self.recall_offset,
                          self.exposure_offset, len(user), arrays) + user
        if arrays:
            assert self.item_ids is not None and self.scores is not None
            n = struct.pack("<I", len(self.item_ids))
            head += n + self.item_ids.astype("<i8").tobytes() + self.scores.astype("<f4").tobytes()
        if self.kind in (EXPOSURE, HELD):
            head += self.exposure or b""
        return head

    @staticmethod
    def unpack(raw: bytes) -> Pending:
        kind, ts, deadline, part, r_off, e_off, ulen, arrays = _HEAD.unpack_from(raw)
        off = _HEAD.size
        user = raw[off : off + ulen].decode()
        off += ulen
        ids = scores = None
        if arrays:
            (n,) = struct.unpack_from("<I", raw, off)
            off += 4
            ids = np.frombuffer(raw, dtype="<i8", count=n, offset=off)
            scores = np.frombuffer(raw, dtype="<f4", count=n, offset=off + 8 * n)
            off += 12 * n
        exposure = bytes(raw[off:]) if kind in (EXPOSURE, HELD) and off < len(raw) else None
        return Pending(kind, ts, deadline, user, part, r_off, e_off, item_ids=ids, scores=scores, exposure=exposure)


def event_due(rec: Pending, join_wait_ms: int, dedup_ms: int) -> int | None:
    """Event time at which the record is due: a waiting request expires, a marker is forgotten. A held recall
    has no event-time due: it waits for the indexer, bounded by its wall-clock hold."""
    if rec.kind in (RECALL, EXPOSURE):
        return rec.ts + join_wait_ms
    if rec.kind in (DONE, EXPIRED):
        return rec.ts + dedup_ms
    return None


def pending_recall(ev: Recall, deadline_ms: int, partition: int, offset: int, kind: bytes = RECALL,
                   exposure: Pending | None = None) -> Pending:
    """A recall waiting for its exposure (RECALL) or for its items (HELD, with the exposure if it came)."""
    e_off, e_raw = (exposure.exposure_offset, exposure.exposure) if exposure is not None else (NO_OFFSET, None)
    return Pending(kind, ev.ts, deadline_ms, ev.user_id, partition, offset, e_off, item_ids=ev.item_ids,
                   scores=ev.scores, exposure=e_raw)


def pending_exposure(ev: ExposureEvent, raw: bytes, deadline_ms: int, partition: int, offset: int) -> Pending:
    return Pending(EXPOSURE, ev.ts, deadline_ms, ev.user_id, partition, exposure_offset=offset, exposure=raw)


def marker(kind: bytes, rec: Pending, ts: int, forget_at_ms: int, *, recall_offset: int | None = None,
           exposure_offset: int | None = None) -> Pending:
    """Remembered after a request is joined (DONE) or expired (EXPIRED), to catch duplicates and late
    partners and to recognise re-reads; forgotten by event time, or at ``forget_at_ms`` at the latest."""
    return Pending(kind, ts, forget_at_ms, rec.user_id, rec.partition,
                   rec.recall_offset if recall_offset is None else recall_offset,
                   rec.exposure_offset if exposure_offset is None else exposure_offset)


def unexposed(recall_ids: np.ndarray, recall_scores: np.ndarray, exposure: ExposureEvent
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """recall − exposure as (item ids, recall scores), in recall order; None when everything recalled was shown."""
    shown = np.sort(np.fromiter((it.item_id for it in exposure.items), dtype=np.int64, count=len(exposure.items)))
    if shown.size:  # binary search in the few shown ids: a quarter of np.isin's time, which sorts both sides
        at = np.minimum(np.searchsorted(shown, recall_ids), shown.size - 1)
        keep = shown[at] != recall_ids
    else:
        keep = np.ones(recall_ids.shape[0], bool)
    if not keep.any():
        return None
    return recall_ids[keep], recall_scores[keep]


def unique_candidates(recall: Recall) -> tuple[Recall, int]:
    """The recall with each candidate once (the first occurrence kept, order unchanged), and how many
    repeats were dropped: a candidate listed twice would be labeled twice."""
    if recall.unique:
        return recall, 0
    _, first = np.unique(recall.item_ids, return_index=True)
    if len(first) == len(recall.item_ids):
        return recall, 0
    keep = np.sort(first)
    dropped = len(recall.item_ids) - len(first)
    kept = Recall(recall.request_id, recall.user_id, recall.ts, recall.item_ids[keep], recall.scores[keep], True)
    return kept, dropped


def is_reread(prev: Pending | None, side: str, request_id: str, partition: int, offset: int) -> bool:
    """Whether this ``side`` ("recall" or "exposure") of a request was read before: True for the same record
    read again after a restart (same partition and offset: its work is in the table already); a second
    record of that side (another offset) is refused as a ``duplicate``."""
    if prev is None:
        return False
    seen = prev.recall_offset if side == "recall" else prev.exposure_offset
    if seen == NO_OFFSET:
        return False
    if (prev.partition, seen) == (partition, offset):
        return True
    raise DecodeError("duplicate", f"{side} {request_id} seen before (offset {seen})")
