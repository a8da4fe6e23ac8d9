"""``gpl bench e2e``: requests/s and exposure → SampleBatch latency through broker, join and labeler.

Synthetic but real: a local broker (``broker.kind``: the embedded Tansu one, or Apache Kafka with
``--broker kafka``), the embedded Qdrant engine holding ``items`` random
unit vectors (written through to the item snapshot the stage processes read), anchor sets for every
user published on ``anchors`` beforehand (no LLM in the loop: this measures the streaming path), then
``requests`` recall+exposure pairs with ``candidates`` candidates each, offered as fast as possible
(or at ``rate`` requests/s). Recalls are encoded by the contract's encoder before the clock starts
(``schemas.codec.encode``: whatever shape the recall producer emits; only the event time is stamped
at send), so the driver is not the bottleneck.

Latency is measured per request from the moment its exposure is produced to the arrival of its
pseudo-labeled SampleBatch; throughput from the first to the last arrival. Before the clock starts,
warm-up requests go through until one comes back, so spawned stage processes, group joins and the
reader's own assignment are done (a fixed sleep lost the first request when a join was slow).

``slo_p99``: then search the highest offered rate whose p99 stays within that many seconds (bisection, a
paced run per trial): the rate a provisioned system can be run at.

``baseline``: the same requests through :mod:`gpl.bench.bare_loop` (one bare confluent-kafka process
doing the same work) on the same kind of broker in the same run, and the ratio. ``fraction``: after the
saturating run, the pipeline again offered ``fraction`` × the rate it sustained, for the latency a
provisioned system sees. ``streams_workers``: that many streams processes in one consumer group.

Every measured run starts a fresh embedded stack (broker, vector engine, stages) from the same seeded
world: the embedded Tansu broker costs more CPU per record as its partitions grow (docs/scaling.md §12),
so a run after another would measure the broker's history, not the pipeline.

Each run reports ``cpu_cores``: the cores each process used while the requests went through (the
driver, which also holds the vector engine; the broker; each stage process; the bare loop), so a
saturated figure says which process was full.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from gpl.bench.bare_loop import bare_loop, bare_topics
from gpl.bench.cpu import CpuMeter
from gpl.stack import Stack, Stages
from runtime.kafka import GapGuard, consumer, create_topics, producer, take
from runtime.settings import Settings
from runtime.vectors.index import Points
from runtime.vectors.normalize import normalize
from schemas.codec import encode
from schemas.events import Anchor, AnchorSet, RecallEvent
from schemas.topics import ANCHORS, EXPOSURE, RECALL, SAMPLES
from schemas.wire import payload

TS0 = 1_000_000_000_000  # placeholder event time in the pre-encoded recalls (13 digits, as every stamp)


def bench_e2e(settings: Settings, *, requests: int = 3000, candidates: int = 1000, rate: float = 0.0,
              items: int = 20_000, users: int = 200, k: int = 8, dim: int = 384, seed: int = 0,
              baseline: bool = False, fraction: float = 0.0, streams_workers: int = 1, slo_p99: float = 0.0,
              slo_trials: int = 5, progress: bool = True) -> dict[str, Any]:
    base = settings.with_overrides(kafka={"bootstrap_servers": ""}, data_dir=str(settings.data_dir / "bench-e2e"),
                                   qdrant={"url": ""}, streams={"max_candidates": max(candidates, 5000)})
    jars = settings.data_dir / "kafka"  # Apache Kafka's, fetched once (`gpl kafka fetch`): kept across runs
    world = World.make(np.random.default_rng(seed), requests, items, users, k, dim, candidates)
    # several streams workers split the partitions (one consumer group); separate processes only
    names = [f"streams-{i}" if i else "streams" for i in range(streams_workers)] + ["labeler"]
    out: dict[str, Any] = {"requests": requests, "candidates": candidates, "items": items,
                           "processes": base.stack.processes, "streams_workers": streams_workers}

    def paced(rate: float, reqs: list[Request], prefix: str) -> dict[str, Any]:
        """One run on a fresh stack: the embedded broker slows as its topics grow (docs/scaling.md §12), so
        no measurement inherits the records of the one before."""
        with _stack(base, world, names, jars) as (s, stages, pids):
            def processes() -> dict[str, int | None]:  # stage processes have their pids once started
                return {**pids, **{name: getattr(stage, "pid", None) for name, stage in stages.stages.items()}}

            run = _run(s, SAMPLES.name, RECALL.name, EXPOSURE.name, reqs, rate, prefix, progress, processes)
            run["accounting"] = stages.accounting()
        if stages.errors:
            run["errors"] = {n: repr(e) for n, e in stages.errors.items()}
        return run

    run = out["pipeline"] = paced(rate, world.requests, "p")
    sustained = run["throughput_requests_per_s"]
    if fraction > 0 and sustained:
        out[f"pipeline_at_{fraction:g}"] = paced(fraction * sustained, world.requests, "q")
    if slo_p99 > 0 and sustained:
        out["slo"] = _slo_search(paced, world.requests, sustained, slo_p99, slo_trials)
    if baseline:
        with _stack(base, world, [], jars) as (s, _, pids):
            out["bare_loop"] = _bare(s, world.requests, rate, users, progress, pids)
        b = out["bare_loop"]["throughput_requests_per_s"]
        if b and sustained:
            out["ratio_pipeline_to_bare"] = round(sustained / b, 3)
    return out


@dataclass(frozen=True)
class World:
    """What every run of one benchmark shares: item vectors, anchors and the encoded requests (one seed)."""

    vectors: np.ndarray  # (items, dim) unit rows, item ids 1..items
    anchors: np.ndarray  # (users, k, dim) unit rows
    requests: list[Request]

    @staticmethod
    def make(rng: np.random.Generator, requests: int, items: int, users: int, k: int, dim: int,
             candidates: int) -> World:
        vectors = normalize(rng.standard_normal((items, dim)).astype(np.float32))
        anchors = normalize(rng.standard_normal((users * k, dim)).astype(np.float32)).reshape(users, k, dim)
        return World(vectors, anchors, _requests(rng, requests, users, items, candidates))


@contextlib.contextmanager
def _stack(base: Settings, world: World, stage_names: list[str], jars: Path
           ) -> Iterator[tuple[Settings, Stages, dict[str, int | None]]]:
    """A fresh local stack (a new broker of ``broker.kind``, its data wiped) holding the world's items,
    anchors and a calibrator, with ``stage_names`` running (none for the bare loop): yields its settings, its
    stages and the processes to meter (this one, the driver, which also holds the vector engine; the
    broker's). ``jars``: Apache Kafka's, linked into the wiped data directory rather than fetched again."""
    shutil.rmtree(base.data_dir, ignore_errors=True)
    if base.broker.kind == "kafka" and jars.is_dir():
        base.data_dir.mkdir(parents=True)
        (base.data_dir / "kafka").symlink_to(jars.resolve(), target_is_directory=True)
    with Stack(base) as stack:
        s = stack.settings
        col = s.encoder.collection
        n = world.vectors.shape[0]
        stack.index.ensure_collection(col, world.vectors.shape[1])
        stack.index.upsert(col, Points(np.arange(1, n + 1, dtype=np.int64), world.vectors,
                                       [{"text": f"item {i}"} for i in range(1, n + 1)]))
        _publish_anchors(s, world.anchors)
        _save_calibrator(s)
        pids: dict[str, int | None] = {"driver": os.getpid()}
        pids.update({f"broker{i or ''}": pid for i, pid in enumerate(stack.broker.pids if stack.broker else [])})
        with Stages({name: stack.make(name.split("-")[0]) for name in stage_names}) as stages:
            yield s, stages, pids


def _slo_search(paced: Callable[[float, list[Request], str], dict[str, Any]], reqs: list[Request],
                saturated: float, slo_p99: float, trials: int = 5, trial_s: float = 20.0) -> dict[str, Any]:
    """The highest offered rate at which every request is labeled with exposure → SampleBatch p99 within
    ``slo_p99`` s: bisection between 0 and the saturated rate, starting at half of it, one paced run of about
    ``trial_s`` seconds of the same requests per trial, each on a fresh stack. The saturated rate overstates
    what a paced stream sustains (a backlog read in big fetches is cheaper per request, and the driver is
    idle once it has sent it)."""
    lo, hi, rate = 0.0, saturated, saturated / 2
    runs: list[dict[str, Any]] = []
    for t in range(trials):
        part = reqs[: max(300, min(len(reqs), int(rate * trial_s)))]  # about trial_s seconds of traffic
        run = paced(round(rate, 1), part, f"s{t}")
        ok = run["labeled_requests"] == len(part) and (run["latency_p99_s"] or float("inf")) <= slo_p99
        runs.append({"offered": round(rate, 1), "requests": len(part), "ok": ok, **{k: run[k] for k in (
            "throughput_requests_per_s", "latency_p50_s", "latency_p99_s", "labeled_requests")}})
        lo, hi = (rate, hi) if ok else (lo, rate)
        rate = (lo + hi) / 2
    return {"p99_target_s": slo_p99, "max_rate_within_target": round(lo, 1) if lo else None,
            "fraction_of_saturated": round(lo / saturated, 3) if lo else None, "trials": runs}


def _publish_anchors(s: Settings, anchors: np.ndarray) -> None:
    p = producer(s.kafka)
    now = int(time.time() * 1000)
    for u, a in enumerate(anchors):
        aset = AnchorSet(user_id=f"u{u}", version=1, model="bench", prompt_hash="bench", encoder=s.encoder.model,
                         generated_at=now, anchors=[Anchor(text=f"a{j}", vector=v.tolist(), logprob=-1.0)
                                                    for j, v in enumerate(a)])
        p.produce(ANCHORS.name, encode(aset), key=f"u{u}".encode())
    p.flush(30)


def _save_calibrator(s: Settings) -> None:
    """A calibrator over every feature the labeler computes, with fixed coefficients: the labeler's
    default path (calibrated, all features) at full cost, without fitting one on synthetic data."""
    from workers.labeler.calibrator import Calibrator
    from workers.labeler.features import FEATURES

    n = len(FEATURES)
    Calibrator(features=FEATURES, mean=(0.3,) * n, scale=(0.2,) * n, coef=(0.8,) + (0.1,) * (n - 1),
               intercept=-2.0, monotone="s1", encoder=s.encoder.model, catalogue="").save(s.calibrator_file)


Request = tuple[str, str, bytes, list[int]]  # user, request-id suffix, recall bytes (placeholder ts), shown


def _requests(rng: np.random.Generator, n: int, users: int, items: int, candidates: int) -> list[Request]:
    """Every request's recall encoded once, by the contract's encoder, with a placeholder event time."""
    out: list[Request] = []
    for r in range(n):
        user = f"u{r % users}"
        cand = rng.choice(items, size=candidates, replace=False) + 1
        ev = RecallEvent(request_id=f"@{r:07d}", user_id=user, ts=TS0, item_ids=cand.tolist(),
                         scores=[0.5] * len(cand))  # the columnar contract (schema_version 2)
        raw = encode(ev)
        assert raw.count(str(TS0).encode()) == 1 and raw.count(b"@") == 1, "recall encoding changed shape"
        out.append((user, f"{r:07d}", raw, cand[:10].tolist()))
    return out


def _send(p: Any, recall: str, exposure: str, req: Request, rid: str) -> float:
    """Produce one request (recall, then exposure) as ``rid``, stamped now; returns the exposure's wall time."""
    user, suffix, raw, shown = req
    now = time.time()
    ts = int(now * 1000)
    p.produce(recall, raw.replace(str(TS0).encode(), str(ts).encode()).replace(f"@{suffix}".encode(), rid.encode()),
              key=user.encode())
    exposure_ev = {"request_id": rid, "user_id": user, "ts": ts,
                   "items": [{"item_id": i, "position": j, "clicked": j == 0} for j, i in enumerate(shown)]}
    p.produce(exposure, orjson.dumps(exposure_ev), key=user.encode())
    return now


def _run(s: Settings, out_topic: str, recall: str, exposure: str, reqs: list[Request], rate: float, prefix: str,
         progress: bool, processes: Callable[[], Mapping[str, int | None]]) -> dict[str, Any]:
    """Warm up, then offer every request (at ``rate``, or as fast as possible) and wait for their batches;
    ``cpu_cores`` says how many cores each of the ``processes`` used meanwhile (gpl/bench/cpu.py)."""
    arrivals: dict[str, float] = {}
    stop = threading.Event()
    reader = threading.Thread(target=_read, args=(s, out_topic, arrivals, stop), daemon=True)
    reader.start()
    p = producer(s.kafka)
    _warm_up(p, recall, exposure, reqs[0], prefix, lambda: any(r.startswith(f"w{prefix}") for r in arrivals))
    sent: dict[str, float] = {}
    bar = tqdm(total=len(reqs), desc=f"e2e {prefix}", disable=not progress)
    meter = CpuMeter(processes())
    meter.start()
    t0 = time.perf_counter()
    for r, req in enumerate(reqs):
        if rate > 0 and (delay := t0 + r / rate - time.perf_counter()) > 0:
            time.sleep(delay)
        sent[f"{prefix}{req[1]}"] = _send(p, recall, exposure, req, f"{prefix}{req[1]}")
        p.poll(0)
        bar.update()
    p.flush(60)
    produce_s = time.perf_counter() - t0
    last_count, last_move = -1, time.monotonic()
    while time.monotonic() - last_move < 30:  # until complete, or 30 s without a new arrival
        got = sum(1 for r in sent if r in arrivals)
        if got == len(sent):
            break
        if got != last_count:
            last_count, last_move = got, time.monotonic()
        time.sleep(0.2)
    cores = meter.stop()
    bar.close()
    stop.set()
    reader.join(10)
    out = _figures(sent, arrivals, rate, produce_s)
    out["cpu_cores"] = cores
    if out["missing"]:  # lost on the way, or only missed by the live reader? read the topic again from its start
        found = _scan(s, out_topic, set(out["missing"]))
        out["missing_but_in_topic"] = sorted(found)
    return out


def _warm_up(p: Any, recall: str, exposure: str, req: Request, prefix: str, seen: Callable[[], bool],
             timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    n = 0
    while not seen():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm-up request came back through {recall}/{exposure} in {timeout:.0f} s")
        _send(p, recall, exposure, req, f"w{prefix}-{n}")
        p.flush(10)
        n += 1
        time.sleep(1.0)


def _figures(sent: dict[str, float], arrivals: dict[str, float], rate: float, produce_s: float) -> dict[str, Any]:
    got = [r for r in sent if r in arrivals]
    lat = np.array([arrivals[r] - sent[r] for r in got])
    t = np.array([arrivals[r] for r in got])
    thr = round(len(got) / max(float(t.max() - t.min()), 1e-9), 1) if len(got) > 1 else None

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 3) if len(lat) else None

    return {"offered_rate": rate or "max", "labeled_requests": len(got), "missing": sorted(set(sent) - set(got))[:10],
            "produce_seconds": round(produce_s, 2), "throughput_requests_per_s": thr,
            "latency_p50_s": pct(50), "latency_p99_s": pct(99), "latency_max_s": pct(100)}


def _read(s: Settings, topic: str, arrivals: dict[str, float], stop: threading.Event) -> None:
    c = consumer(s.kafka, f"bench-reader-{time.monotonic_ns()}", **{"auto.offset.reset": "latest"})
    gaps = GapGuard(c, s.kafka.refetch_gaps)  # two producers write `samples`: the embedded broker's skips
    c.subscribe([topic], on_assign=lambda _c, parts: gaps.forget((p.topic, p.partition) for p in parts))
    try:
        while not stop.is_set():
            for m in gaps.filter(take(c, 500, 0.2)):
                if (rid := _pseudo_request(m)) is not None:
                    arrivals.setdefault(rid, time.time())
    finally:
        c.close()


def _pseudo_request(m: Any) -> str | None:
    """The request id of a pseudo-labeled SampleBatch message (either wire format), else None."""
    if m.error() is not None:
        return None
    b = orjson.loads(payload(m.value()) or b"{}")
    return str(b["request_id"]) if b.get("lineage") is not None else None


def _scan(s: Settings, topic: str, wanted: set[str], quiet_s: float = 5.0) -> set[str]:
    """Which of ``wanted`` have a pseudo-labeled batch in ``topic``, read from the beginning."""
    c = consumer(s.kafka, f"bench-scan-{time.monotonic_ns()}", **{"auto.offset.reset": "earliest"})
    c.subscribe([topic])
    found: set[str] = set()
    last = time.monotonic() + 10.0  # the group join comes first
    try:
        while time.monotonic() - last < quiet_s and found != wanted:
            for m in take(c, 500, 0.2):
                last = time.monotonic()
                if (rid := _pseudo_request(m)) in wanted:
                    found.add(rid)
    finally:
        c.close()
    return found


def _bare(s: Settings, reqs: list[Request], rate: float, users: int, progress: bool,
          pids: Mapping[str, int | None]) -> dict[str, Any]:
    """The same requests through the bare loop, in its own process, on the same broker."""
    recall, exposure, out = bare_topics()  # under kafka.topic_prefix (the stack set this process's naming)
    create_topics(s.kafka, [recall, exposure, out])
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=bare_loop, args=(s.model_dump_json(), users, s.labeler.cap, ready, stop), daemon=True)
    proc.start()
    try:
        if not ready.wait(180):
            raise TimeoutError("the bare loop did not start")
        return _run(s, out, recall, exposure, reqs, rate, "b", progress,
                    lambda: {**pids, "bare_loop": proc.pid})
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
