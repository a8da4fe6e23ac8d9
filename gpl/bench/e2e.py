"""``gpl bench e2e``: requests/s and exposure → SampleBatch latency through broker, join and labeler.

Synthetic but real: the embedded Tansu broker, the embedded Qdrant engine holding ``items`` random
unit vectors, anchor sets for every user published on ``anchors`` beforehand (so no LLM is in the
loop: this measures the streaming path), then ``requests`` recall+exposure pairs with ``candidates``
candidates each, produced as fast as possible (or at ``rate`` requests/s). Latency is measured per
request from the exposure's event time (set to the wall clock when produced) to the arrival of its
pseudo-labeled SampleBatch on ``samples``; throughput from the first to the last arrival.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from gpl.runtime.kafka import consumer, producer
from gpl.runtime.settings import Settings
from gpl.runtime.vectors.index import Points
from gpl.runtime.vectors.normalize import normalize
from gpl.stack import Stack, Stages
from schemas.codec import encode
from schemas.events import Anchor, AnchorSet
from schemas.wire import payload


def bench_e2e(settings: Settings, *, requests: int = 3000, candidates: int = 1000, rate: float = 0.0,
              items: int = 20_000, users: int = 200, k: int = 8, dim: int = 384, seed: int = 0,
              progress: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    s = settings.with_overrides(kafka={"bootstrap_servers": ""}, data_dir=str(settings.data_dir / "bench-e2e"),
                                qdrant={"url": ""}, streams={"max_candidates": max(candidates, 5000)})
    import shutil

    shutil.rmtree(s.data_dir, ignore_errors=True)
    with Stack(s) as stack:
        s = stack.settings
        col = s.encoder.collection
        vecs = rng.standard_normal((items, dim)).astype(np.float32)
        vecs = normalize(vecs)
        stack.index.ensure_collection(col, dim)
        stack.index.upsert(col, Points(np.arange(1, items + 1, dtype=np.int64), vecs,
                                       [{"text": f"item {i}"} for i in range(1, items + 1)]))
        p = producer(s.kafka)
        now = int(time.time() * 1000)
        for u in range(users):
            a = rng.standard_normal((k, dim)).astype(np.float32)
            a = normalize(a)
            aset = AnchorSet(user_id=f"u{u}", version=1, model="bench", prompt_hash="bench", encoder=s.encoder.model,
                             generated_at=now, anchors=[Anchor(text=f"a{j}", vector=a[j].tolist(), logprob=-1.0)
                                                        for j in range(k)])
            p.produce("anchors", encode(aset), key=f"u{u}".encode())
        p.flush(30)
        stages = Stages({"streams": stack.make("streams"), "labeler": stack.make("labeler")})
        arrivals: dict[str, float] = {}
        sent_ts: dict[str, int] = {}
        stop_reader = threading.Event()
        reader = threading.Thread(target=_read_samples, args=(s, arrivals, stop_reader), daemon=True)
        with stages:
            reader.start()
            time.sleep(8.0)  # group joins (faust ~3 s with the tuned timeouts) before the clock starts
            bar = tqdm(total=requests, desc="e2e requests", disable=not progress)
            t0 = time.perf_counter()
            for r in range(requests):
                if rate > 0:
                    target = t0 + r / rate
                    delay = target - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                user = f"u{r % users}"
                rid = f"b{r}"
                cand = rng.choice(items, size=candidates, replace=False) + 1
                ts = int(time.time() * 1000)
                recall = {"schema_version": 2, "request_id": rid, "user_id": user, "ts": ts,
                          "item_ids": cand.tolist(), "scores": [0.5] * len(cand)}
                shown = cand[:10]
                exposure = {"request_id": rid, "user_id": user, "ts": ts,
                            "items": [{"item_id": int(i), "position": j, "clicked": j == 0}
                                      for j, i in enumerate(shown)]}
                p.produce("recall", orjson.dumps(recall), key=user.encode())
                p.produce("exposure", orjson.dumps(exposure), key=user.encode())
                sent_ts[rid] = ts
                p.poll(0)
                bar.update()
            p.flush(60)
            produce_s = time.perf_counter() - t0
            deadline = time.monotonic() + 300
            while len(arrivals) < requests and time.monotonic() < deadline:
                time.sleep(0.2)
            bar.close()
            stop_reader.set()
            reader.join(10)
    lat = np.array([arrivals[r] - sent_ts[r] / 1000 for r in arrivals if r in sent_ts])
    first = min(arrivals.values()) if arrivals else 0.0
    last = max(arrivals.values()) if arrivals else 0.0
    return {
        "requests": requests, "candidates": candidates, "offered_rate": rate or "max",
        "labeled_requests": len(arrivals),
        "produce_seconds": round(produce_s, 2),
        "throughput_requests_per_s": round(len(arrivals) / max(last - first, 1e-9), 1) if len(arrivals) > 1 else None,
        "latency_p50_s": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "latency_p99_s": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
        "latency_max_s": round(float(lat.max()), 3) if len(lat) else None,
    }


def _read_samples(s: Settings, arrivals: dict[str, float], stop: threading.Event) -> None:
    c = consumer(s.kafka, f"bench-reader-{time.monotonic_ns()}", **{"auto.offset.reset": "latest"})
    c.subscribe(["samples"])
    try:
        while not stop.is_set():
            for m in c.consume(500, timeout=0.2):
                if m.error() is not None:
                    continue
                now = time.time()
                b = orjson.loads(payload(m.value()) or b"{}")  # either wire format
                if b.get("lineage") is not None:  # the pseudo-labeled batch of this request
                    arrivals.setdefault(b["request_id"], now)
    finally:
        c.close()
