"""The anchors stage's regeneration policy on the pure engine alone (workers/anchors/engine.py): no broker, no
generator, no index, a hand-moved clock.

Which request is served when: newest per user, cold starts first, debounce in event time, backpressure with
hysteresis (and again after a rebalance), the rate limit, the backoff after an outage, revoked partitions.
The mechanisms have their own tests (tests/integration/test_anchor_policy.py); the loop over the in-memory twin
(tests/unit/workers/test_worker_loops_memory.py) and the broker tests
(tests/integration/test_anchors_worker.py) check them end to end.
"""

from __future__ import annotations

import pytest

from runtime.anchor_settings import MemoryAnchors
from runtime.kafka import Accounting
from schemas.events import Anchor, AnchorReason, AnchorRequest, AnchorSet
from workers.anchors.engine import AnchorsEngine
from workers.anchors.policy import BACKOFF_START_S

Origin = tuple[str, int]  # (partition's topic, offset): what rides along with a request here


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def engine(clock: Clock | None = None, **cfg: object) -> AnchorsEngine[Origin]:
    settings = MemoryAnchors(**{"backend": "memory", "batch_size": 2, "max_pending": 4, "debounce_s": 30.0,
                                 "batch_wait_ms": 50, **cfg})
    return AnchorsEngine(settings, Accounting("anchors-engine-test"), clock=clock or Clock())


def req(user: str, reason: AnchorReason = "drift", ts: int = 1_000_000) -> AnchorRequest:
    priority = 0 if reason == "cold_start" else 2
    return AnchorRequest(user_id=user, reason=reason, ts=ts, history=[1, 2], priority=priority)


def aset(user: str) -> AnchorSet:
    return AnchorSet(user_id=user, version=1, anchors=[Anchor(text="a", vector=[1.0, 0.0])], model="m",
                     prompt_hash="p", encoder="e", generated_at=1)


def test_a_newer_request_supersedes_the_queued_one_and_frees_its_origin() -> None:
    e = engine()
    assert e.admit(req("u1", ts=1_000), ("r", 0)) is None  # queued
    assert e.admit(req("u1", ts=2_000), ("r", 1)) == ("r", 0)  # the queued one is done, nothing to emit for it
    assert e.admit(req("u1", ts=1_500), ("r", 2)) == ("r", 2)  # older than the queued one: itself superseded
    assert len(e.queue) == 1 and e.accounting["superseded"] == 2
    assert [(q.req.ts, q.origin) for q in e.take()] == [(2_000, ("r", 1))]


def test_cold_starts_read_behind_a_backlog_are_served_first() -> None:
    e = engine(max_pending=10)
    for i in range(3):
        e.admit(req(f"d{i}", ts=1_000 + i), ("r", i))
    e.admit(req("c0", "cold_start", ts=9_000), ("r", 3))
    assert [q.req.user_id for q in e.take()] == ["c0", "d0"]
    assert [q.req.user_id for q in e.take()] == ["d1", "d2"]


def test_debounce_in_event_time_after_a_served_request_cold_starts_excepted() -> None:
    e = engine()
    e.admit(req("u1", ts=1_000_000), ("r", 0))
    batch = e.take()
    e.served(batch, [aset("u1")], 0.1)
    assert e.admit(req("u1", ts=1_000_000 + 29_000), ("r", 1)) == ("r", 1)  # within 30 s of event time
    assert e.accounting["debounced"] == 1 and len(e.queue) == 0
    assert e.admit(req("u1", "cold_start", ts=1_000_000 + 1_000), ("r", 2)) is None  # never debounced
    assert e.admit(req("u2", ts=1_000_000 + 1_000), ("r", 3)) is None  # another user
    e.take()
    assert e.admit(req("u1", ts=1_000_000 + 31_000), ("r", 4)) is None  # after the window: served again


def test_backpressure_pauses_when_full_and_resumes_at_half() -> None:
    e = engine(max_pending=4, batch_size=1)
    assert e.poll_budget()[0] == 4
    for i in range(3):
        e.admit(req(f"u{i}"), ("r", i))
    assert e.backpressure() is None and not e.paused
    e.admit(req("u3"), ("r", 3))
    e.polled()  # the loop, after admitting a poll's requests: the high-water mark
    assert e.poll_budget()[0] == 1  # full: a paused consumer still polls (its callbacks), one record at most
    assert e.backpressure() == "pause" and e.paused and e.pauses == 1
    assert e.backpressure() is None  # paused once, not on every poll
    e.take()
    assert e.backpressure() is None  # 3 left: above half
    e.take()
    assert e.backpressure() == "resume" and not e.paused
    e.polled()
    assert e.max_queued == 4  # the high-water mark stays


def test_a_rebalance_while_paused_pauses_the_new_assignment_again() -> None:
    e = engine(max_pending=1)
    e.admit(req("u1"), ("r", 0))
    assert e.backpressure() == "pause"
    e.assigned()
    assert e.repause() and not e.repause()  # once per assignment
    e.take()
    assert e.backpressure() == "resume"
    e.assigned()
    assert not e.repause()  # not paused: nothing to re-apply


def test_a_failed_batch_is_requeued_and_retried_after_a_doubling_backoff() -> None:
    clock = Clock()
    e = engine(clock, batch_size=2)
    e.admit(req("u1", "cold_start"), ("r", 0))
    e.admit(req("u2"), ("r", 1))
    batch = e.take()
    e.failed(batch)
    assert len(e.queue) == 2 and e.take() == []  # backing off: nothing dispatched
    assert e.poll_budget()[1] == pytest.approx(min(0.05, BACKOFF_START_S))
    clock.t += BACKOFF_START_S
    again = e.take()
    assert [q.req.user_id for q in again] == ["u1", "u2"] and again[0].cold  # as they were, priority kept
    e.failed(again)
    clock.t += BACKOFF_START_S
    assert e.take() == []  # the second wait is twice as long
    clock.t += BACKOFF_START_S
    served = e.take()
    e.served(served, [aset("u1"), aset("u2")], 0.5)
    assert e.backoff_s == BACKOFF_START_S and e.accounting["emitted"] == 2  # an answer ends the backoff


def test_the_rate_follows_the_measured_capacity_and_its_cap() -> None:
    clock = Clock()
    e = engine(clock, batch_size=2, max_pending=100, rate_limit=0.0)
    for i in range(6):
        e.admit(req(f"u{i}"), ("r", i))
    first = e.take()
    assert len(first) == 2  # unlimited before the first measurement
    e.served(first, [aset(q.req.user_id) for q in first], 2.0)  # 1 user/s: the bucket allows 1.25/s
    assert e.bucket.rate == pytest.approx(1.25)
    assert len(e.take()) == 2  # a full burst (the bucket was unlimited until now) ...
    assert len(e.take()) == 0  # ... then spent: tokens come back at the measured rate
    clock.t += 1.0
    assert len(e.take()) == 1
    capped = engine(clock, batch_size=2, max_pending=100, rate_limit=0.5)
    capped.admit(req("v"), ("r", 0))
    capped.served(capped.take(), [aset("v")], 0.01)  # fast, but a shared server's quota caps it
    assert capped.bucket.rate == 0.5


def test_a_revoked_partitions_requests_are_forgotten_and_counted() -> None:
    e = engine(max_pending=10)
    e.admit(req("a"), ("p0", 0))
    e.admit(req("b"), ("p1", 0))
    e.admit(req("c"), ("p0", 1))
    assert sorted(e.revoked(lambda o: o[0] == "p0")) == [("p0", 0), ("p0", 1)]
    assert e.accounting["revoked"] == 2 and [q.req.user_id for q in e.take()] == ["b"]


def test_a_fresh_run_starts_with_an_empty_queue_but_keeps_the_debounce_memory() -> None:
    e = engine()
    e.admit(req("u1", ts=1_000_000), ("r", 0))
    e.served(e.take(), [aset("u1")], 0.1)
    e.admit(req("u2"), ("r", 1))
    e.start()
    assert len(e.queue) == 0 and not e.paused and e.backoff_s == BACKOFF_START_S
    assert e.admit(req("u1", ts=1_000_000 + 1_000), ("r", 2)) == ("r", 2)  # still within u1's window
