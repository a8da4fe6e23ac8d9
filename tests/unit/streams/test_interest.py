"""streams/interest.py: when a user's anchors are asked for (cold start, drift, new positives, expiry),
the debounce, the priority order, and the state's bookkeeping (deduplicated positives, trim, packing).

Pure logic: each trigger is shown firing just past its threshold and not just below it, so a trigger whose
test were removed or inverted fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.settings import StreamsSettings
from streams.interest import PRIORITY, Interest, add_positives, decide, request_anchors, trim

DIM = 4
E = np.eye(DIM, dtype=np.float32)
CFG = StreamsSettings(drift_threshold=0.15, new_positives_trigger=3, anchor_max_age_s=3600.0, debounce_s=60.0,
                      cold_start_min_positives=2)
T0 = 1_700_000_000_000  # event time of the first request, ms
LATER = T0 + 120_000  # past the debounce, well before expiry


def _clicked(state: Interest, ids: list[int], vectors: np.ndarray) -> Interest:
    return add_positives(state, np.asarray(ids, np.int64), np.asarray(vectors, np.float32))


def _requested(ids: list[int], vectors: np.ndarray) -> Interest:
    """A user with these positives whose anchors were asked for at T0 (cold start)."""
    state = _clicked(Interest.empty(DIM), ids, vectors)
    assert decide(state, T0, CFG) == "cold_start"
    state, req = request_anchors(state, "u1", "cold_start", T0, CFG)
    assert req.history == ids and req.priority == PRIORITY["cold_start"] == 0
    return state


def test_cold_start_needs_its_minimum_of_positives() -> None:
    state = Interest.empty(DIM)
    assert decide(state, T0, CFG) is None
    state = _clicked(state, [1], E[:1])
    assert decide(state, T0, CFG) is None  # 1 < cold_start_min_positives
    state = _clicked(state, [2], E[:1])
    assert decide(state, T0, CFG) == "cold_start"
    after, req = request_anchors(state, "u1", "cold_start", T0, CFG)
    assert (after.requests, after.positives_since, after.last_request_ms) == (1, 0, T0)
    assert after.gen_profile is not None and np.allclose(after.gen_profile, E[0])
    assert req.reason == "cold_start" and req.user_id == "u1" and req.ts == T0


def test_drift_fires_past_its_threshold_only() -> None:
    state = _requested([1, 2], E[[0, 0]])
    assert decide(state, LATER, CFG) is None and state.drift() == pytest.approx(0.0)
    # one positive along another axis: profile (2e0 + e1)/|.|, cos = 2/sqrt(5), drift 0.106 < 0.15
    small = _clicked(state, [3], E[[1]])
    assert small.drift() == pytest.approx(1 - 2 / np.sqrt(5), abs=1e-6)
    assert decide(small, LATER, CFG) is None
    # two: (2e0 + 2e1)/|.|, cos = 1/sqrt(2), drift 0.293 > 0.15, with 2 < new_positives_trigger new positives
    big = _clicked(small, [4], E[[1]])
    assert big.positives_since == 2 and big.drift() == pytest.approx(1 - 1 / np.sqrt(2), abs=1e-6)
    assert decide(big, LATER, CFG) == "drift"
    after, req = request_anchors(big, "u1", "drift", LATER, CFG)
    assert req.priority == PRIORITY["drift"] and req.drift == pytest.approx(big.drift(), abs=1e-5)
    assert after.drift() == pytest.approx(0.0, abs=1e-6)  # the new profile is the reference now


def test_new_positives_fire_at_their_count_without_drift() -> None:
    state = _requested([1, 2], E[[0, 0]])
    two = _clicked(state, [3, 4], E[[0, 0]])  # same direction: no drift
    assert two.positives_since == 2 and decide(two, LATER, CFG) is None
    three = _clicked(two, [5], E[[0]])
    assert three.drift() == pytest.approx(0.0, abs=1e-6) and decide(three, LATER, CFG) == "new_positives"
    after, _ = request_anchors(three, "u1", "new_positives", LATER, CFG)
    assert after.positives_since == 0 and decide(after, LATER + 120_000, CFG) is None


def test_repeated_clicks_are_not_new_positives() -> None:
    state = _requested([1, 2], E[[0, 0]])
    again = _clicked(state, [1, 2, 1], E[[0, 0, 0]])
    assert again.positives_since == 0 and len(again.recent) == 2 and np.allclose(again.profile_sum, 2 * E[0])


def test_expiry_fires_after_the_max_age_in_event_time() -> None:
    state = _requested([1, 2], E[[0, 0]])
    age = int(CFG.anchor_max_age_s * 1000)
    assert decide(state, T0 + age, CFG) is None  # exactly the max age: still fresh
    assert decide(state, T0 + age + 1, CFG) == "expiry"


def test_debounce_holds_every_trigger_but_cold_start() -> None:
    state = _requested([1, 2], E[[0, 0]])
    busy = _clicked(state, [3, 4, 5], E[[1, 1, 1]])  # drift and new positives at once
    assert decide(busy, T0 + int(CFG.debounce_s * 1000) - 1, CFG) is None
    assert decide(busy, T0 + int(CFG.debounce_s * 1000), CFG) == "drift"


def test_priority_order_drift_before_new_positives_before_expiry() -> None:
    state = _requested([1, 2], E[[0, 0]])
    old = T0 + int(CFG.anchor_max_age_s * 1000) + 1
    assert decide(_clicked(state, [3, 4, 5], E[[1, 1, 1]]), old, CFG) == "drift"
    assert decide(_clicked(state, [3, 4, 5], E[[0, 0, 0]]), old, CFG) == "new_positives"
    assert decide(state, old, CFG) == "expiry"
    assert sorted(PRIORITY, key=PRIORITY.__getitem__) == ["cold_start", "drift", "new_positives", "expiry"]


def test_trim_keeps_the_most_recent_and_recomputes_the_profile() -> None:
    state = _clicked(Interest.empty(DIM), [1, 2, 3], E[[0, 1, 2]])
    kept = trim(state, 2, {1: E[0], 2: E[1], 3: E[2]})
    assert kept.recent.tolist() == [2, 3] and np.allclose(kept.profile_sum, E[1] + E[2])
    assert trim(kept, 2, {}) is kept


def test_state_survives_packing() -> None:
    state = _requested([1, 2], E[[0, 1]])
    state = _clicked(state, [7], E[[3]])
    back = Interest.unpack(state.pack())
    assert back.recent.tolist() == [1, 2, 7] and np.array_equal(back.profile_sum, state.profile_sum)
    assert back.gen_profile is not None and state.gen_profile is not None
    assert np.array_equal(back.gen_profile, state.gen_profile)
    assert (back.last_request_ms, back.positives_since, back.requests) == (T0, 1, 1)
    fresh = Interest.unpack(Interest.empty(DIM).pack())
    assert fresh.gen_profile is None and fresh.requests == 0 and len(fresh.recent) == 0
