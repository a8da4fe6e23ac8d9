"""Pure logic of the streams reliability rules: join records, event-time clock, input bounds, dead letters."""

from __future__ import annotations

import base64
import hashlib

import numpy as np
import orjson
import pytest

from schemas.codec import DecodeError, dead_letter, decode, encode
from schemas.events import MAX_EPOCH_MS, DeadLetter, RecallEvent
from streams.clock import EventClock
from streams.join import DONE, EXPIRED, HELD, NO_OFFSET, RECALL, Pending, decode_recall, event_due, marker


def raw_recall(**over: object) -> bytes:
    obj: dict[str, object] = {"request_id": "r1", "user_id": "u1", "ts": 1_000,
                              "candidates": [{"item_id": 1, "score": 0.5}, {"item_id": 2}]}
    return orjson.dumps(obj | over)


def test_records_roundtrip_every_kind_with_offsets() -> None:
    ids, scores = np.array([3, 1, 2], np.int64), np.array([0.1, 0.2, 0.3], np.float32)
    recs = [
        Pending(RECALL, 5, 9, "ü", 2, 17, NO_OFFSET, ids, scores),
        Pending(HELD, 5, 9, "u", 1, 17, 4, ids, scores, b'{"x":1}'),  # a held recall that has its exposure
        Pending(HELD, 5, 9, "u", 1, 17, NO_OFFSET, ids[:0], scores[:0]),  # every candidate dropped
        Pending(b"E", 6, 9, "u", 0, NO_OFFSET, 3, exposure=b'{"e":2}'),
        Pending(DONE, 7, 9, "u", 0, 17, 3),
    ]
    for rec in recs:
        back = Pending.unpack(rec.pack())
        assert (back.kind, back.ts, back.deadline_ms, back.user_id, back.partition, back.recall_offset,
                back.exposure_offset, back.exposure) == (rec.kind, rec.ts, rec.deadline_ms, rec.user_id,
                                                         rec.partition, rec.recall_offset, rec.exposure_offset,
                                                         rec.exposure)
        if rec.item_ids is not None:
            assert back.item_ids is not None and back.scores is not None
            assert back.item_ids.tolist() == rec.item_ids.tolist() and back.scores.tolist() == rec.scores.tolist()
    assert [r.waiting_inputs for r in recs] == [1, 2, 1, 1, 0]


def test_marker_keeps_offsets_and_due_times_follow_the_kind() -> None:
    rec = Pending(RECALL, 1_000, 9, "u", 1, 17, NO_OFFSET)
    m = marker(EXPIRED, rec, 1_000, 99, exposure_offset=5)
    assert (m.kind, m.recall_offset, m.exposure_offset, m.partition, m.deadline_ms) == (EXPIRED, 17, 5, 1, 99)
    assert event_due(rec, 2_000, 600_000) == 3_000
    assert event_due(m, 2_000, 600_000) == 601_000
    assert event_due(Pending(HELD, 1_000, 9, "u"), 2_000, 600_000) is None


def test_watermark_per_partition_min_of_inputs_out_of_order_and_clamped() -> None:
    clock = EventClock(lateness_ms=500, idle_ms=0, sources=("recall", "exposure"), now_ms=0)
    clock.schedule(0, 3_000, b"a")  # a request of ts 1,000 with a 2 s wait
    clock.schedule(1, 3_000, b"b")
    clock.observe("recall", 0, 9_000, now_ms=10**12)
    assert clock.watermark(0, now_ms=10**12) is None, "exposures not read yet: they may be older"
    clock.observe("exposure", 0, 3_400, now_ms=10**12)
    clock.observe("exposure", 0, 1_200, now_ms=10**12)  # out of order: an input's clock never goes back
    assert clock.watermark(0, now_ms=10**12) == 2_900 and clock.pop_due(0, now_ms=10**12) == []
    clock.observe("exposure", 0, 3_501, now_ms=10**12)
    assert clock.pop_due(0, now_ms=10**12) == [(3_000, b"a")]
    assert clock.pop_due(1, now_ms=10**12) == [], "another partition's events do not move this one"
    clock.observe("recall", 1, 10**15, now_ms=2_000)  # a broken producer clock moves it to the wall clock only
    clock.observe("exposure", 1, 10**15, now_ms=2_000)
    assert clock.watermark(1, now_ms=2_000) == 1_500 and clock.pop_due(1, now_ms=2_000) == []


@pytest.mark.parametrize("over", [{"ts": 2**63}, {"ts": MAX_EPOCH_MS + 1}, {"user_id": "u" * 70_000},
                                  {"request_id": "r" * 257}])
def test_fast_path_keeps_the_contract_bounds(over: dict[str, object]) -> None:
    """These passed the fast path and broke the state record (struct.error) before bounds were checked."""
    with pytest.raises(DecodeError) as e:
        decode_recall(raw_recall(**over), 100)
    assert e.value.reason == "schema"
    ok = decode_recall(raw_recall(ts=MAX_EPOCH_MS, user_id="u" * 256), 100)
    Pending(RECALL, ok.ts, 0, ok.user_id, 0, 0, NO_OFFSET, ok.item_ids, ok.scores).pack()


def test_epoch_ms_has_an_upper_bound() -> None:
    with pytest.raises(DecodeError):
        decode(raw_recall(ts=MAX_EPOCH_MS + 1), RecallEvent)
    assert decode(raw_recall(ts=MAX_EPOCH_MS), RecallEvent).ts == MAX_EPOCH_MS


def test_dead_letter_too_large_keeps_a_truncated_payload_size_and_digest() -> None:
    big = encode(RecallEvent(request_id="r", user_id="u", ts=1, item_ids=list(range(100_000)),
                             scores=[0.123456] * 100_000))
    limit = 1_000_000
    dl = dead_letter(topic="recall", partition=0, offset=7, key=b"u", value=big, error="oversized",
                     reason="oversized", stage="streams", max_bytes=limit)
    wire = encode(dl)
    assert len(big) > limit and len(wire) <= limit
    assert dl.original_size == len(big) and dl.sha256 == hashlib.sha256(big).hexdigest()
    assert big.startswith(base64.b64decode(dl.value))
    small = dead_letter(topic="recall", partition=0, offset=7, key=b"u", value=b"{}", error="e", reason="schema",
                        stage="streams", max_bytes=limit)
    assert small.original_size is None and small.sha256 is None and base64.b64decode(small.value) == b"{}"
    assert decode(wire, DeadLetter).original_size == len(big)


def test_idle_inputs_stop_holding_back_and_follow_the_wall_clock() -> None:
    clock = EventClock(lateness_ms=0, idle_ms=5_000, sources=("recall", "exposure"), now_ms=100_000)
    clock.observe("recall", 0, 1_000, now_ms=101_000)
    clock.schedule(0, 3_000, b"last")  # the stream's last request: no event will move the clock past it
    assert clock.watermark(0, now_ms=104_000) is None, "exposures were never seen, but are not idle yet"
    assert clock.watermark(0, now_ms=105_500) == 1_000, "exposures idle: the active recalls alone count"
    assert clock.watermark(0, now_ms=106_500) == 1_500, "both idle: from the newest, with the wall clock"
    assert clock.due_partitions(now_ms=107_500) == []
    assert clock.due_partitions(now_ms=108_001) == [0] and clock.pop_due(0, now_ms=108_001) == [(3_000, b"last")]
    clock.observe("exposure", 0, 1_500, now_ms=108_000)  # an event: its input is active again
    assert clock.watermark(0, now_ms=108_000) == 1_500, "the idle recall input no longer holds it back"
    off = EventClock(0, idle_ms=0, sources=("recall", "exposure"), now_ms=0)
    off.observe("recall", 0, 1_000, now_ms=0)
    assert off.watermark(0, now_ms=10**9) is None and off.due_partitions(now_ms=10**9) == []


def test_fast_encoders_write_what_the_contract_reads() -> None:
    """The streams stage's orjson encoders match the contracts field for field (no pydantic on the hot path)."""
    from schemas.events import ExposureEvent, Sample, SampleBatch, UnexposedBatch
    from schemas.fast_codec import encode_real_samples, encode_unexposed
    from schemas.ids import sample_id
    from streams.join import unexposed

    ev = ExposureEvent.model_validate({"request_id": "r9", "user_id": "ü", "ts": 7,
                                       "items": [{"item_id": 5, "position": 0, "clicked": True},
                                                 {"item_id": 2**62, "position": 1, "clicked": False}]})
    want = SampleBatch(request_id="r9", user_id="ü", ts=7, candidates_total=2, samples=[
        Sample(sample_id=sample_id("r9", 5), item_id=5, label=1.0, weight=1.0, source="click", position=0),
        Sample(sample_id=sample_id("r9", 2**62), item_id=2**62, label=0.0, weight=1.0, source="exposed-negative",
               position=1)])
    raw = encode_real_samples(ev)
    assert SampleBatch.model_validate_json(raw) == want
    assert orjson.loads(raw) == orjson.loads(encode(want))  # the same JSON as the contract's encoder

    ids = np.array([9, 5, 3, 2**62], np.int64)
    scores = np.array([0.1234567, 0.5, 0.25, 1.0], np.float32)
    rest = unexposed(ids, scores, ev)
    assert rest is not None and rest[0].tolist() == [9, 3]
    b = UnexposedBatch.model_validate_json(encode_unexposed("r9", "ü", 7, *rest))
    assert (b.request_id, b.user_id, b.ts, b.item_ids) == ("r9", "ü", 7, [9, 3])
    assert b.recall_scores == [0.123457, 0.25]
    bare = encode_unexposed("r9", "ü", 7, rest[0], None)  # the default: ids only
    assert UnexposedBatch.model_validate_json(bare) == b.model_copy(update={"recall_scores": []})
    assert b"recall_scores" not in bare
    assert unexposed(ids[[1, 3]], scores[[1, 3]], ev) is None  # everything recalled was shown


def test_a_stalled_broker_does_not_make_its_inputs_idle() -> None:
    """Idle time counts only while the broker answers the input's fetches: after a 60 s stall (longer
    than idle_ms) the input read first must not move the watermark alone (the chaos suite's broker stop)."""
    clock = EventClock(lateness_ms=0, idle_ms=30_000, sources=("recall", "exposure"), now_ms=0, stall_ms=5_000)
    for t in range(0, 10_001, 500):  # both inputs flow, fetches answered
        clock.answered("recall", 0, t, now_ms=t)
        clock.answered("exposure", 0, t, now_ms=t)
    clock.observe("recall", 0, 1_000, now_ms=10_000)
    clock.observe("exposure", 0, 900, now_ms=10_000)
    for t in range(10_500, 70_001, 500):  # the broker stops answering at 10 s
        clock.answered("recall", 0, 10_000, now_ms=t)
        clock.answered("exposure", 0, 10_000, now_ms=t)
    assert clock.live_ms("exposure", 0, now_ms=70_000) == 15_000, "live until stall_ms after the last answer"
    clock.answered("recall", 0, 70_100, now_ms=70_200)  # back: the recall backlog is read first
    clock.answered("exposure", 0, 70_100, now_ms=70_200)
    clock.observe("recall", 0, 50_000, now_ms=70_300)
    assert clock.watermark(0, now_ms=70_300) == 900, "the exposure input is not idle: it holds the watermark"
    # with answers flowing and no exposure for idle_ms of live time, it is idle again
    for t in range(70_500, 96_001, 500):
        clock.answered("recall", 0, t, now_ms=t)
        clock.answered("exposure", 0, t, now_ms=t)
        if t == 94_000:
            assert clock.watermark(0, now_ms=t) == 900
    assert clock.watermark(0, now_ms=96_000) == 50_000, "idle after 30 s of answered fetches without events"
    wall = EventClock(lateness_ms=0, idle_ms=30_000, now_ms=0)  # no reports: the wall clock is live time
    assert wall.live_ms("recall", 0, now_ms=70_000) == 70_000
