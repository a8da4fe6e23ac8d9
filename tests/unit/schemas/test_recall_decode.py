"""The recall decoder (``schemas.fast_codec.decode_recall``), property-based: both schema versions, and
malformed arrays turned into a clear :class:`DecodeError`, never an exception that escapes.

The fast path must accept exactly what the contract (:class:`schemas.events.RecallEvent`) accepts and
give the same arrays; these properties compare the two on generated events (pure logic, no broker).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import DecodeError, decode
from schemas.events import (
    MAX_EPOCH_MS,
    MAX_INT64,
    SECONDS_HIGH,
    SECONDS_LOW,
    RecallEvent,
    UnexposedBatch,
    recall_as_v2,
)
from schemas.fast_codec import decode_recall, decode_unexposed

MAX = 5000
# event times the contract takes: milliseconds, not the [1e9, 1e11) window refused as seconds
ts_ms_st = st.integers(0, SECONDS_LOW - 1) | st.integers(SECONDS_HIGH, MAX_EPOCH_MS)
ids_st = st.lists(st.integers(0, MAX_INT64), min_size=1, max_size=40, unique=True)
score_st = st.floats(allow_nan=False, allow_infinity=False, width=32)
head_st = st.fixed_dictionaries({"request_id": st.text(min_size=1, max_size=20),
                                 "user_id": st.text(min_size=1, max_size=20), "ts": ts_ms_st})
# heads the contract may refuse: times past its bound (year 3000), ids longer than 256 characters
edge_head_st = st.fixed_dictionaries({
    "request_id": st.text(min_size=1, max_size=20) | st.just("r" * 257),
    "user_id": st.text(min_size=1, max_size=20) | st.just("u" * 257),
    "ts": st.integers(0, MAX_EPOCH_MS) | st.integers(MAX_EPOCH_MS - 2, MAX_EPOCH_MS + 2) | st.integers(0, 2**63 - 1)
    | st.sampled_from([SECONDS_LOW - 1, SECONDS_LOW, SECONDS_HIGH - 1, SECONDS_HIGH])})
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _contract(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    ev = decode(raw, RecallEvent)
    scores = ev.scores if ev.scores is not None else [0.0] * len(ev.item_ids)
    return np.asarray(ev.item_ids, np.int64), np.asarray(scores, np.float32)


@fast
@given(head=head_st, ids=ids_st, data=st.data(), with_scores=st.booleans(), with_sources=st.booleans(),
       explicit_version=st.booleans())
def test_v2_columns_decode_like_the_contract(head: dict[str, Any], ids: list[int], data: st.DataObject,
                                             with_scores: bool, with_sources: bool, explicit_version: bool) -> None:
    ev: dict[str, Any] = {**head, "item_ids": ids}
    if explicit_version:
        ev["schema_version"] = 2
    if with_scores:
        ev["scores"] = data.draw(st.lists(score_st, min_size=len(ids), max_size=len(ids)))
    if with_sources:
        ev["sources"] = data.draw(st.lists(st.text(max_size=8), min_size=len(ids), max_size=len(ids)))
    raw = orjson.dumps(ev)
    got = decode_recall(raw, MAX)
    want_ids, want_scores = _contract(raw)
    assert (got.request_id, got.user_id, got.ts) == (head["request_id"], head["user_id"], head["ts"])
    assert got.item_ids.dtype == np.int64 and got.scores.dtype == np.float32
    np.testing.assert_array_equal(got.item_ids, want_ids)
    np.testing.assert_array_equal(got.scores, want_scores)
    assert got.item_ids.tolist() == ids


@fast
@given(head=head_st, ids=st.lists(st.integers(0, MAX_INT64), min_size=1, max_size=30), data=st.data(),
       explicit_version=st.booleans())
def test_v1_candidates_still_decode(head: dict[str, Any], ids: list[int], data: st.DataObject,
                                    explicit_version: bool) -> None:
    scores = data.draw(st.lists(score_st, min_size=len(ids), max_size=len(ids)))
    ev: dict[str, Any] = {**head, "candidates": [{"item_id": i, "score": s, "source": "x"}
                                                for i, s in zip(ids, scores, strict=True)]}
    if explicit_version:
        ev["schema_version"] = 1
    got = decode_recall(orjson.dumps(ev), MAX)
    assert got.item_ids.tolist() == ids  # version 1 keeps repeats (the join counts and drops them)
    np.testing.assert_array_equal(got.scores, np.asarray(scores, np.float32))
    model = RecallEvent.model_validate(ev)  # and the contract turns version 1 into the columns
    assert model.schema_version == 2 and model.item_ids == ids and model.sources == ["x"] * len(ids)


@fast
@given(head=head_st, ids=ids_st, extra=st.integers(1, 3), which=st.sampled_from(["scores", "sources"]))
def test_unequal_arrays_are_a_schema_error(head: dict[str, Any], ids: list[int], extra: int, which: str) -> None:
    col = [0.5] * (len(ids) + extra) if which == "scores" else ["s"] * (len(ids) + extra)
    with pytest.raises(DecodeError) as e:
        decode_recall(orjson.dumps({**head, "schema_version": 2, "item_ids": ids, which: col}), MAX)
    assert e.value.reason == "schema"
    assert f"{which} has {len(ids) + extra} entries but item_ids has {len(ids)}" in str(e.value)


@fast
@given(head=head_st, ids=ids_st, data=st.data())
def test_repeated_item_is_a_schema_error(head: dict[str, Any], ids: list[int], data: st.DataObject) -> None:
    dup = ids + [data.draw(st.sampled_from(ids))]
    with pytest.raises(DecodeError) as e:
        decode_recall(orjson.dumps({**head, "item_ids": dup, "scores": [0.0] * len(dup)}), MAX)
    assert e.value.reason == "schema" and "more than once" in str(e.value)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c,
                                                                                            max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(head=head_st, ids=st.one_of(json_value, st.lists(json_scalar, min_size=1, max_size=6)),
       scores=st.one_of(st.none(), json_value, st.lists(json_scalar, max_size=6)),
       sources=st.one_of(st.none(), json_value, st.lists(json_scalar, max_size=6)))
def test_any_malformed_arrays_decode_or_fail_like_the_contract(head: dict[str, Any], ids: object, scores: object,
                                                               sources: object) -> None:
    ev: dict[str, Any] = {**head, "item_ids": ids}
    if scores is not None:
        ev["scores"] = scores
    if sources is not None:
        ev["sources"] = sources
    raw = orjson.dumps(ev)
    try:
        want: tuple[np.ndarray, np.ndarray] | None = _contract(raw)
    except DecodeError as e:
        want = None
        assert e.reason == "schema" and str(e).startswith("RecallEvent: ")
    if want is None or len(want[0]) == 0:
        with pytest.raises(DecodeError) as err:  # the fast path never lets a bad array through
            decode_recall(raw, MAX)
        assert err.value.reason in ("schema", "empty_candidates")
        return
    got = decode_recall(raw, MAX)
    np.testing.assert_array_equal(got.item_ids, want[0])
    np.testing.assert_array_equal(got.scores, want[1])


@pytest.mark.parametrize(("value", "reason", "needle"), [
    ({"item_ids": [1, -2]}, "schema", "item_ids.1: Input should be greater than or equal to 0"),
    ({"item_ids": [1, "x"]}, "schema", "item_ids.1"),
    ({"item_ids": [1, 2], "scores": [0.1, "high"]}, "schema", "scores.1"),
    ({"item_ids": [1, 2], "sources": ["a", 3]}, "schema", "sources.1"),
    ({"item_ids": [], "scores": []}, "empty_candidates", "no candidates"),
    ({"item_ids": list(range(MAX + 1))}, "oversized", "> max"),
    ({"schema_version": 2, "candidates": [{"item_id": 1}]}, "schema", "schema_version 1 form"),
    ({"schema_version": 1, "item_ids": [1]}, "schema", "schema_version 1 carries 'candidates'"),
    ({"schema_version": 3, "item_ids": [1]}, "schema", "unsupported schema_version 3"),
    ({"candidates": [{"item_id": 1}, {"score": 1.0}]}, "schema", "candidates.1.item_id"),
])
def test_bad_recalls_name_the_problem(value: dict[str, Any], reason: str, needle: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode_recall(orjson.dumps({"request_id": "r", "user_id": "u", "ts": 1, **value}), MAX)
    assert e.value.reason == reason and needle in str(e.value), str(e.value)


def test_v2_decoding_builds_no_per_candidate_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The columnar fast path never reaches the pydantic contract (which builds the per-item objects)."""
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the v2 fast path fell back to the contract")
    monkeypatch.setattr("schemas.fast_codec.decode", refuse)
    raw = orjson.dumps({"schema_version": 2, "request_id": "r", "user_id": "u", "ts": 7,
                        "item_ids": list(range(1000)), "scores": [0.25] * 1000, "sources": ["a"] * 1000})
    got = decode_recall(raw, MAX)
    assert len(got.item_ids) == 1000 and float(got.scores.sum()) == 250.0


@settings(max_examples=200, deadline=None)
@given(head=edge_head_st, ids=st.one_of(json_value, st.lists(json_scalar, min_size=1, max_size=6), ids_st))
def test_unexposed_fast_decode_accepts_what_the_contract_accepts(head: dict[str, Any], ids: object) -> None:
    """The labeler's decoder (one numpy dtype inference instead of a Python ``sum``) agrees with the
    contract on every id list: same ids when valid, a DecodeError when not."""
    _decodes_like_the_contract(orjson.dumps({**head, "schema_version": 1, "item_ids": ids}))


def _decodes_like_the_contract(raw: bytes) -> None:
    """The labeler's fast decoder gives the contract's ids when it accepts, a DecodeError when it refuses."""
    try:
        want: list[int] | None = decode(raw, UnexposedBatch).item_ids
    except DecodeError:
        want = None
    if want is None:
        with pytest.raises(DecodeError):
            decode_unexposed(raw)
        return
    got = decode_unexposed(raw)
    assert got.item_ids.dtype == np.int64 and got.item_ids.tolist() == want


def _pack(ids: list[int], code: str = "q") -> str:
    return base64.b64encode(struct.pack(f"<{len(ids)}{code}", *ids)).decode()


packed_st = st.one_of(
    ids_st.map(_pack),  # what the streams stage writes for big ids
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40).map(lambda x: _pack(x, "I")),  # for 32-bit ids
    st.lists(st.integers(-(2**63), MAX_INT64), min_size=1, max_size=6).map(_pack),  # negative ids
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),  # not whole ids
    st.text(max_size=20),  # not base64
    st.integers(-(2**63), MAX_INT64) | st.none() | st.lists(st.integers(0, 9), max_size=3),  # not a string
)


@settings(max_examples=300, deadline=None)
@given(head=edge_head_st, packed=packed_st, form=st.sampled_from(["item_ids_le32", "item_ids_le64"]),
       version=st.integers(0, 3), also=st.sampled_from([None, "item_ids", "item_ids_le32", "item_ids_le64"]))
def test_packed_unexposed_decodes_like_the_contract(head: dict[str, Any], packed: object, form: str, version: int,
                                                    also: str | None) -> None:
    """The packed forms (schema_version 2): the fast decoder and the contract agree on every value:
    same ids when valid; a DecodeError for bad base64, a partial id, a negative id, an old version, or
    two id forms at once."""
    value = {**head, "schema_version": version, form: packed}
    if also is not None and also != form:
        value[also] = [1, 2] if also == "item_ids" else _pack([1])
    _decodes_like_the_contract(orjson.dumps(value))


def test_packed_unexposed_round_trips_and_names_its_problems() -> None:
    """What the streams stage writes reads back exactly, in both versions and both widths (the
    narrowest that holds the ids); the DLQ reason of a bad packed value says what is wrong with it."""
    from schemas.fast_codec import encode_unexposed

    for ids, form in ((np.array([0, 7, 2**32 - 1], np.int64), b"item_ids_le32"),
                      (np.array([0, 7, 2**32, 2**62, MAX_INT64], np.int64), b"item_ids_le64")):
        for version in (1, 2):
            raw = encode_unexposed("r", "u", 5, ids, None, version=version)
            assert (form in raw) == (version == 2) and (b'"item_ids"' in raw) == (version == 1)
            assert decode_unexposed(raw).item_ids.tolist() == ids.tolist()
            assert decode(raw, UnexposedBatch).item_ids == ids.tolist()
    head = {"schema_version": 2, "request_id": "r", "user_id": "u", "ts": 5}
    # excess padding: binascii's strict mode (the contract) takes it, pybase64 (the fast path) does not;
    # the fast path then falls back to the contract and both read the same ids
    odd = orjson.dumps({**head, "item_ids_le32": "A" * 16 + "="})
    assert decode(odd, UnexposedBatch).item_ids == [0, 0, 0] and decode_unexposed(odd).item_ids.tolist() == [0, 0, 0]
    for packed, needle in ((_pack([-1]), "negative"), ("AAAA", "whole number of 64-bit"), ("a!", "not base64"),
                           (7, "base64 string")):
        with pytest.raises(DecodeError, match=needle):
            decode(orjson.dumps({**head, "item_ids_le64": packed}), UnexposedBatch)
    with pytest.raises(DecodeError, match="whole number of 32-bit"):
        decode(orjson.dumps({**head, "item_ids_le32": "AAA="}), UnexposedBatch)
    with pytest.raises(DecodeError, match="schema_version 2"):
        decode(orjson.dumps({**head, "schema_version": 1, "item_ids_le64": _pack([1])}), UnexposedBatch)
    with pytest.raises(DecodeError, match="one form, not 2"):
        decode(orjson.dumps({**head, "item_ids": [1], "item_ids_le32": _pack([1], "I")}), UnexposedBatch)
    with pytest.raises(DecodeError, match="one form, not 0"):
        decode(orjson.dumps(head), UnexposedBatch)


def test_recall_as_v2_rewrites_only_when_exact() -> None:
    head = {"request_id": "r", "user_id": "u", "ts": 3}
    v1 = {**head, "candidates": [{"item_id": 4, "score": 0.5, "source": "pop"}, {"item_id": 9}]}
    v2 = recall_as_v2(v1)
    assert v2 == {**head, "schema_version": 2, "item_ids": [4, 9], "scores": [0.5, 0.0], "sources": ["pop", ""]}
    assert RecallEvent.model_validate(v2) == RecallEvent.model_validate(v1)  # the same event either way
    assert recall_as_v2({**head, "candidates": [{"item_id": 4}]}) == {**head, "schema_version": 2, "item_ids": [4],
                                                                     "scores": [0.0]}
    # not exact: left as it is, for the contract (and the DLQ) to judge
    assert recall_as_v2({**head, "candidates": [{"item_id": 4}, {"item_id": 4}]}) is None  # v1 repeats are legal
    assert recall_as_v2({**head, "candidates": [{"score": 1.0}]}) is None
    assert recall_as_v2({**head, "candidates": [{"item_id": [1]}]}) is None
    assert recall_as_v2({**head, "schema_version": 2, "item_ids": [1]}) is None
    assert recall_as_v2({**head, "candidates": "nope"}) is None


@fast
@given(head=edge_head_st, ids=ids_st, v2=st.booleans())
def test_recall_fast_path_refuses_what_the_contract_refuses(head: dict[str, Any], ids: list[int], v2: bool) -> None:
    """Bounds hold on the fast path too: an event the contract refuses (a time past year 3000, an id
    over 256 characters) never slips through as arrays."""
    ev = {**head, "item_ids": ids} if v2 else {**head, "candidates": [{"item_id": i} for i in ids]}
    raw = orjson.dumps(ev)
    try:
        decode(raw, RecallEvent)
        valid = True
    except DecodeError:
        valid = False
    if valid:
        assert decode_recall(raw, MAX).item_ids.tolist() == ids
    else:
        with pytest.raises(DecodeError):
            decode_recall(raw, MAX)
