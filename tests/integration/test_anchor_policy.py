"""The anchors worker's regeneration policy and replay cache.

Pure parts (queue, debounce, token bucket, capacity, offsets, cache) are tested directly; the loop is
tested once on the real broker with a slow generator: priorities, debounce, backpressure (pause and
resume with a bounded queue), an outage that re-queues a batch, and exact commits.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from runtime.encoder import HashEncoder
from runtime.kafka import consumer, producer
from runtime.offsets import OffsetLedger
from runtime.settings import AnchorSettings, Settings, load
from runtime.vectors.memory import MemoryIndex
from schemas.codec import decode, encode
from schemas.events import AnchorReason, AnchorRequest, AnchorSet, ItemEvent
from streams.interest import PRIORITY
from workers.anchors import AnchorWorker
from workers.anchors.generation_cache import GenerationCache, cache_key
from workers.anchors.generators.base import AnchorPrompt, Generation, GeneratorUnavailable
from workers.anchors.generators.memory import MemoryGenerator
from workers.anchors.policy import CapacityMeter, Debouncer, RequestQueue, TokenBucket, rate_limit
from workers.indexer import Indexer


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings


ITEMS = {1: "trail running shoes", 2: "gps running watch", 3: "fantasy novel dragons",
         4: "cast iron skillet", 5: "chef knife steel", 6: "jazz vinyl record",
         **{10 + i: f"gadget model {i} deluxe" for i in range(20)}}


def req(user: str, reason: AnchorReason = "drift", ts: int = 1000,
        history: list[int] | None = None) -> AnchorRequest:
    return AnchorRequest(user_id=user, reason=reason, ts=ts, history=history or [1, 2],
                         priority=PRIORITY[reason])


# ------------------------------------------------------------------------------------------ queue

def test_queue_serves_cold_start_first_then_oldest() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.push(req("a", "expiry", 1), "m1")
    q.push(req("b", "drift", 5), "m2")
    q.push(req("c", "drift", 3), "m3")
    q.push(req("d", "cold_start", 9), "m4")
    q.push(req("e", "new_positives", 0), "m5")
    assert [e.req.user_id for e in q.pop(10)] == ["d", "c", "b", "e", "a"]
    assert len(q) == 0 and q.pop(3) == []


def test_queue_keeps_newest_per_user_with_the_more_urgent_priority() -> None:
    q: RequestQueue[str] = RequestQueue()
    assert q.push(req("u", "cold_start", 10, [1]), "m1") is None
    assert q.push(req("u", "drift", 20, [1, 2]), "m2") == "m1"  # newer replaces, still a cold start
    assert q.push(req("u", "expiry", 15, [9]), "m3") == "m3"  # older than the queued one: it loses
    q.push(req("v", "drift", 1), "m4")
    (first,) = q.pop(1)
    assert first.req.user_id == "u" and first.req.history == [1, 2] and first.priority == 0 and first.cold
    assert len(q) == 1


def test_queue_late_older_request_can_raise_priority() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.push(req("u", "expiry", 20), "new")
    q.push(req("v", "drift", 1), "v")
    assert q.push(req("u", "cold_start", 10), "old-cold") == "old-cold"
    (first,) = q.pop(1)
    assert first.req.user_id == "u" and first.origin == "new" and first.priority == 0 and first.cold


def test_queue_restore_and_drop() -> None:
    q: RequestQueue[tuple[str, int]] = RequestQueue()
    for i in range(4):
        q.push(req(f"u{i}", ts=i), ("t", i % 2))
    batch = q.pop(2)
    q.restore(batch)
    assert len(q) == 4 and [e.req.user_id for e in q.pop(4)] == ["u0", "u1", "u2", "u3"]
    for i in range(4):
        q.push(req(f"u{i}", ts=i), ("t", i % 2))
    assert sorted(q.drop(lambda o: o[1] == 1)) == [("t", 1), ("t", 1)]
    assert [e.req.user_id for e in q.pop(9)] == ["u0", "u2"]


def test_queue_heap_stays_bounded_under_supersedes() -> None:
    q: RequestQueue[int] = RequestQueue()
    for i in range(10_000):
        q.push(req("same", ts=i), i)
    assert len(q) == 1 and len(q._heap) <= 4 * len(q) + 65


# ------------------------------------------------------------------------------- debounce, rates

def test_debounce_is_event_time_and_spares_cold_start() -> None:
    d = Debouncer(30.0)
    r = req("u", ts=100_000)
    assert not d.blocks(r, cold=False)
    d.generated("u", 100_000)
    assert d.blocks(req("u", ts=129_999), cold=False)
    assert not d.blocks(req("u", ts=130_000), cold=False)
    assert not d.blocks(req("u", "cold_start", ts=100_001), cold=True)
    assert not d.blocks(req("other", ts=100_001), cold=False)
    assert not Debouncer(0).blocks(req("u", ts=1), cold=False)


def test_debounce_memory_is_pruned_to_the_window() -> None:
    d = Debouncer(1.0)
    for i in range(25_000):
        d.generated(f"u{i}", i * 10)  # 10 ms apart: a 1 s window holds ~100 users
    assert len(d._last) < 11_000
    assert d.blocks(req("u24999", ts=249_990 + 500), cold=False)


def test_token_bucket_refills_at_rate() -> None:
    now = [0.0]
    b = TokenBucket(rate=2.0, burst=4, clock=lambda: now[0])
    assert b.take(10) == 4 and b.take(1) == 0
    assert b.wait_s(1) == pytest.approx(0.5)
    now[0] = 1.0
    assert b.take(10) == 2
    now[0] = 100.0
    assert b.take(10) == 4  # never more than the burst
    b.set_rate(math.inf)
    assert b.take(3) == 3 and b.take(4) == 4 and b.wait_s(4) == 0.0


def test_capacity_ewma_and_rate_limit() -> None:
    m = CapacityMeter(alpha=0.5)
    assert m.rate is None and rate_limit(m.rate, 0) == math.inf
    m.observe(10, 1.0)
    assert m.rate == 10.0
    m.observe(2, 1.0)
    assert m.rate == 6.0
    assert rate_limit(6.0, 0) == pytest.approx(7.5)  # headroom above what was measured
    assert rate_limit(6.0, 3.0) == 3.0  # the configured cap wins
    assert m.observe(0, 1.0) == 6.0  # nothing measured, nothing changes


def test_offsets_commit_up_to_the_oldest_unfinished() -> None:
    t = OffsetLedger()
    for o in (5, 6, 7, 8):
        t.read(("t", 0), o)
    t.read(("t", 1), 3)
    t.done(("t", 0), 7)
    t.done(("t", 0), 5)
    assert t.committable() == {("t", 0): 6}  # 6 still pending: 7 is done but not committable yet
    assert t.committable() == {}
    t.done(("t", 0), 6)
    t.done(("t", 0), 8)
    t.done(("t", 1), 3)
    assert t.committable() == {("t", 0): 9, ("t", 1): 4}
    t.forget([("t", 0)])
    assert t.committable([("t", 0), ("t", 1)]) == {("t", 1): 4}


# ----------------------------------------------------------------------------------------- cache

def _gen(text: str) -> Generation:
    return Generation([text], [-0.5], f'["{text}"]', 3, True, 1, False)


def test_cache_roundtrip_first_write_wins_and_counts(tmp_path: Path) -> None:
    c = GenerationCache(tmp_path / "cache")
    k1 = cache_key(["a", "b"], 4, "m", "h")
    assert c.get_many([k1]) == {} and c.misses == 1
    c.put_many([(k1, _gen("first"))])
    c.put_many([(k1, _gen("second"))])  # a replay must read what was produced first
    hits_before = REGISTRY.get_sample_value("gpl_anchor_cache_lookups_total", {"result": "hit"}) or 0.0
    assert c.get_many([k1, k1])[k1].anchors == ["first"] and c.hits == 2
    assert (REGISTRY.get_sample_value("gpl_anchor_cache_lookups_total", {"result": "hit"}) or 0.0) == hits_before + 2
    c.close()
    again = GenerationCache(tmp_path / "cache")  # persisted
    assert again.get_many([k1])[k1] == _gen("first") and len(again) == 1
    again.close()


def test_cache_key_names_everything_that_shapes_a_generation() -> None:
    base = cache_key(["a", "b"], 4, "m", "h")
    assert base == cache_key(["a", "b"], 4, "m", "h") and len(base) == 32
    others = [cache_key(["b", "a"], 4, "m", "h"), cache_key(["a", "b"], 3, "m", "h"),
              cache_key(["a", "b"], 4, "m2", "h"), cache_key(["a", "b"], 4, "m", "h2"),
              cache_key(["a b"], 4, "m", "h")]
    assert len({base, *others}) == 6


def test_cache_is_bounded(tmp_path: Path) -> None:
    c = GenerationCache(tmp_path, max_entries=100)
    for s in range(0, 300, 50):
        c.put_many([(cache_key([str(i)], 1, "m", "h"), _gen(str(i))) for i in range(s, s + 50)])
    assert len(c) <= 105
    assert cache_key(["299"], 1, "m", "h") in c.get_many([cache_key(["299"], 1, "m", "h")])  # newest kept
    assert c.get_many([cache_key(["0"], 1, "m", "h")]) == {}  # oldest dropped
    c.close()


def _worker(s: Settings, gen: MemoryGenerator) -> AnchorWorker:
    enc = HashEncoder()
    index = MemoryIndex()
    items = [ItemEvent(item_id=i, text=t) for i, t in ITEMS.items()]
    Indexer(s, index, enc, progress=False).index_items(items)
    return AnchorWorker(s, index, enc, gen)


def test_replay_reproduces_anchors_without_the_llm(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path), anchors={"backend": "memory", "k": 2})
    first = _worker(s, MemoryGenerator(s.anchors)).generate_for([req("runner", history=[1, 2]),
                                                                 req("cook", history=[4, 5])])
    # a "restarted" worker whose LLM would now answer differently: the cache answers instead
    changed = MemoryGenerator(s.anchors, script=lambda p, a: '{"interests": ["something else"]}')
    w = _worker(s, changed)
    replay = w.generate_for([req("runner", history=[1, 2]), req("cook", history=[4, 5])])
    assert [[a.text for a in x.anchors] for x in replay] == [[a.text for a in x.anchors] for x in first]
    assert [[a.logprob for a in x.anchors] for x in replay] == [[a.logprob for a in x.anchors] for x in first]
    assert changed.calls == 0 and w.cache is not None and w.cache.hits == 2
    # a new history is a new prompt: generated
    (new,) = w.generate_for([req("runner", history=[1, 2, 6])])
    assert [a.text for a in new.anchors] == ["something else"] and changed.calls == 1
    # identical prompts in one batch are generated once; with the cache off every call reaches the LLM
    off = load(env={}, data_dir=str(tmp_path / "off"), anchors={"backend": "memory", "k": 2, "cache": False})
    g = MemoryGenerator(off.anchors)
    w_off = _worker(off, g)
    assert w_off.cache is None
    w_off.generate_for([req("a", history=[3])])
    w_off.generate_for([req("a", history=[3])])
    assert g.calls == 2


def test_identical_prompts_in_a_batch_are_generated_once(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path), anchors={"backend": "memory", "k": 2})
    seen: list[str] = []

    def script(p: AnchorPrompt, attempt: int) -> str:
        seen.append(p.user_id)
        return '{"interests": ["running"]}'

    w = _worker(s, MemoryGenerator(s.anchors, script=script))
    sets = w.generate_for([req("a", history=[1, 2]), req("b", history=[1, 2]), req("c", history=[3])])
    assert len(sets) == 3 and seen == ["a", "c"]


# ----------------------------------------------------------------------------- the loop, real broker

class SlowGenerator(MemoryGenerator):
    """MemoryGenerator that takes ``delay`` per batch, records who it served, and fails its first call."""

    def __init__(self, settings: AnchorSettings, delay: float) -> None:
        super().__init__(settings, model="slow-memory")
        self.delay = delay
        self.order: list[str] = []
        self.failed = False

    def generate(self, prompts: list[AnchorPrompt]) -> list[Generation]:
        time.sleep(self.delay)
        if not self.failed:
            self.failed = True
            raise GeneratorUnavailable("server restarting")
        self.order.extend(p.user_id for p in prompts)
        return super().generate(prompts)


def _wait(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.integration
def test_loop_priorities_debounce_backpressure_and_outage(settings: Settings) -> None:
    """A backlog of refreshes with two new users at its end, read ahead into a queue of 8 (full: paused);
    the first batch hits an outage and is re-queued; then repeats arrive after the first anchors."""
    s = settings.with_overrides(anchors={"backend": "memory", "k": 2, "batch_size": 2, "batch_wait_ms": 50,
                                         "max_pending": 8, "debounce_s": 30})
    gen = SlowGenerator(s.anchors, delay=0.1)
    w = _worker(s, gen)
    labels = {"model": "slow-memory"}
    errors_before = REGISTRY.get_sample_value("gpl_anchor_backend_errors_total", labels) or 0.0
    p = producer(s.kafka)
    # distinct histories: identical prompts would be answered by the replay cache, not the generator
    drifts = [req(f"d{i}", "drift", ts=1_000_000 + i, history=[10 + i]) for i in range(6)]
    colds = [req(f"c{i}", "cold_start", ts=2_000_000 + i, history=[4 + i]) for i in range(2)]
    for r in drifts + colds:  # one partition: the new users are read *behind* the backlog
        p.produce("anchor-requests", encode(r), key=r.user_id.encode(), partition=0)
    assert p.flush(10) == 0

    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    try:
        _wait(lambda: w.accounting["emitted"] == 8)
        late = [req("d0", "new_positives", ts=1_000_000 + 5_000, history=[11, 12]),  # within 30 s: dropped
                req("d5", "expiry", ts=1_000_005 + 60_000, history=[20]),  # after the window: served
                req("c0", "cold_start", ts=2_000_000 + 1_000, history=[6])]  # cold start: never debounced
        for r in late:
            p.produce("anchor-requests", encode(r), key=r.user_id.encode(), partition=1)
        assert p.flush(10) == 0
        total = len(drifts) + len(colds) + len(late)
        _wait(lambda: w.accounting["emitted"] + w.accounting["debounced"] == total)
        time.sleep(0.5)  # let the last commit land
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    acc = w.accounting.snapshot()
    assert acc["in"] == total
    assert acc.get("debounced", 0) == 1  # d0's repeat 5 s (event time) after the request it answered
    assert acc["emitted"] == total - 1 and acc.get("superseded", 0) == 0
    assert not any(k.startswith("dlq:") for k in acc)
    # the outage re-queued its batch: nothing lost, nothing turned into a fallback
    assert (REGISTRY.get_sample_value("gpl_anchor_backend_errors_total", labels) or 0.0) == errors_before + 1
    # the new users overtook the backlog they were read behind; the rest by event time
    assert gen.order[:8] == ["c0", "c1", "d0", "d1", "d2", "d3", "d4", "d5"]
    assert sorted(gen.order[8:]) == ["c0", "d5"]
    # bounded read-ahead: the queue never held more than max_pending, and then the partitions paused
    assert w.max_queued <= 8 and w.pauses >= 1
    sets: list[AnchorSet] = []
    c = consumer(s.kafka, f"check-{time.monotonic_ns()}")
    c.subscribe(["anchors"])
    end = time.monotonic() + 20
    while len(sets) < acc["emitted"] and time.monotonic() < end:
        sets += [decode(m.value(), AnchorSet) for m in c.consume(50, timeout=0.5) if m.error() is None]
    c.close()
    assert len(sets) == acc["emitted"]
    # every offset was committed: the worker's group has nothing left to read
    c = consumer(s.kafka, "anchors")
    c.subscribe(["anchor-requests"])
    leftover = [m for _ in range(8) for m in c.consume(50, timeout=0.5) if m.error() is None]
    c.close()
    assert leftover == []
