"""What ``kafka.transactional`` costs the labeler, side by side on one Apache Kafka broker.

``python -m gpl.bench.transactions [--requests N] [--candidates C] [--rate R] [--rounds K]``: one broker;
per round, the labeler alone (a thread, items in memory, the fixed label map) on fresh topics, once
at-least-once and once transactional, in turns so machine load falls on both alike. Each run writes
``requests`` unexposed batches for 8 users whose anchors are already there — a backlog (``--rate 0``: how
fast the labeler drains it) or paced at ``rate`` per second — and a ``read_committed`` reader times each
request from its produce to its SampleBatch becoming readable: with transactions that is when the
transaction holding it commits, so the cost shows in both throughput and latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from confluent_kafka.admin import AdminClient

from runtime.encoder import HashEncoder
from runtime.kafka import consumer, create_topics, producer
from runtime.kafka_broker import KafkaBroker
from runtime.settings import Settings, load
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.codec import encode
from schemas.events import Anchor, AnchorSet, UnexposedBatch
from schemas.topics import ANCHORS, SAMPLES, UNEXPOSED

USERS = [f"u{i}" for i in range(8)]


def _index(s: Settings, items: int) -> MemoryIndex:
    enc = HashEncoder()
    idx = MemoryIndex()
    idx.ensure_collection(s.encoder.collection, enc.dim)
    texts = [f"item {i} topic{i % 41} shade{i % 13}" for i in range(items)]
    idx.upsert(s.encoder.collection, Points(np.arange(items, dtype=np.int64), enc.encode(texts), [{}] * items))
    return idx


def run(bootstrap: str, data_dir: Path, *, transactional: bool, requests: int, candidates: int,
        rate: float, tag: str) -> dict[str, Any]:
    """One labeler run on fresh topics; requests/s and produce → readable SampleBatch latencies."""
    from workers.labeler.loop import Labeler

    s = load(env={}, data_dir=str(data_dir), labeler={"label_source": "map", "wait_for_anchors_s": 60.0},
             kafka={"bootstrap_servers": bootstrap, "partitions": 4, "transactional": transactional,
                    "group_prefix": f"bench-{tag}"})
    admin = AdminClient({"bootstrap.servers": bootstrap})
    old = [t for t in admin.list_topics(timeout=10).topics if not t.startswith("__")]
    if old:
        for f in admin.delete_topics(old, operation_timeout=30).values():
            f.result()
        while set(old) & set(admin.list_topics(timeout=10).topics):
            time.sleep(0.2)
    create_topics(s.kafka)
    enc = HashEncoder()
    p = producer(s.kafka)
    for u in USERS:
        vec = enc.encode([f"topic{USERS.index(u)} shade3"])[0].tolist()
        aset = AnchorSet(user_id=u, version=1, model="bench", prompt_hash="h", encoder=s.encoder.model,
                         generated_at=1, anchors=[Anchor(text="a", vector=vec)])
        p.produce(ANCHORS.name, encode(aset), key=u.encode())
    p.flush(30)
    labeler = Labeler(s, _index(s, max(candidates * 2, 2000)))
    stop = threading.Event()
    worker = threading.Thread(target=labeler.run, args=(stop,), daemon=True)
    worker.start()
    seen: dict[str, float] = {}
    reader = consumer(s.kafka, f"bench-reader-{tag}")  # read_committed: librdkafka's default
    reader.assign([TopicPartition(SAMPLES.name, q, OFFSET_BEGINNING) for q in range(s.kafka.partitions)])

    done = threading.Event()

    def read() -> None:  # arrival times are taken as records come, while the driver produces
        while not done.is_set():
            for m in reader.consume(500, 0.1):
                if m.error() is None:
                    seen.setdefault(str(orjson.loads(m.value() or b"{}").get("request_id")), time.time())

    def wait(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(seen) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, max(candidates * 2, 2000), size=(requests, candidates))
    rid = f"warm-{tag}"  # the labeler has joined once this comes back
    p.produce(UNEXPOSED.name, encode(UnexposedBatch(request_id=rid, user_id=USERS[0], ts=int(time.time() * 1000),
                                                 item_ids=ids[0].tolist(), recall_scores=[0.5] * candidates)),
              key=USERS[0].encode())
    p.flush(30)
    wait(1, 120)
    sent: dict[str, float] = {}
    start = time.time()
    for j in range(requests):
        if rate > 0:
            time.sleep(max(0.0, start + j / rate - time.time()))
        r = f"r{j}"
        sent[r] = time.time()
        b = UnexposedBatch(request_id=r, user_id=USERS[j % len(USERS)], ts=int(sent[r] * 1000),
                           item_ids=ids[j].tolist(), recall_scores=[0.5] * candidates)
        p.produce(UNEXPOSED.name, encode(b), key=b.user_id.encode())
        p.poll(0)
    p.flush(30)
    wait(requests + 1, 300)
    done.set()
    reading.join(10)
    stop.set()
    worker.join(60)
    reader.close()
    lat = sorted(seen[r] - sent[r] for r in sent if r in seen)
    took = max(seen[r] for r in sent if r in seen) - start if lat else float("nan")
    return {"transactional": transactional, "labeled": len(lat), "requests_per_s": round(len(lat) / took, 1),
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.0, help="offered requests/s (0: a backlog)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    out: list[dict[str, Any]] = []
    dist = load(env={}).data_dir  # where `gpl kafka fetch` put the jars
    with tempfile.TemporaryDirectory() as tmp, KafkaBroker(Path(tmp) / "kafka", dist_dir=dist) as broker:
        for k in range(a.rounds):
            for tx in (False, True):
                res = run(broker.bootstrap, Path(tmp) / f"d{k}{tx}", transactional=tx, requests=a.requests,
                          candidates=a.candidates, rate=a.rate, tag=f"{k}{int(tx)}")
                print(json.dumps(res), flush=True)
                out.append(res)
    for tx in (False, True):
        rows = [r for r in out if r["transactional"] is tx]
        print(f"transactional={tx}: requests/s {[r['requests_per_s'] for r in rows]}, "
              f"p99 s {[r['latency_p99_s'] for r in rows]}")


if __name__ == "__main__":
    main()
