"""Issue 24's "done when": a foreign event log replayed as a new user would, every candidate accounted for.

The file has the shape of a converted public data set: one request per user, its lines ordered by user (not
event time), the item catalogue in the middle of the file. It goes through ``gpl replay`` as a command (a
subprocess, with ``GPL_METRICS_PORT`` exported and that port taken, as in the shell of a running ``gpl up``),
which sorts it, sends the items first and waits for the indexer, into the real stack: the embedded broker,
the embedded Qdrant engine, the streams processor, the content anchors, the labeler as shipped (a
calibrator is required, and there is none at first), the trainer.

Every recalled candidate ends exposed (a real label) or unexposed, and every unexposed one pseudo-labelled,
sampled out, or dead-lettered with a reason; the labeler holds what it abstained on until the calibrator is
written (``gpl calibrate``'s part), relabels up to ``labeler.keep_abstained`` batches and dead-letters the
rest with reason ``abstained``. Nothing expires, nothing waits, every count has its place.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from gpl.stack import Stack, Stages
from runtime.broker import EmbeddedBroker
from runtime.metrics_relay import MERGED
from schemas.events import DeadLetter
from schemas.fast_codec import decode_unexposed
from tests.fixtures.settings import make_settings
from tests.helpers import drain, wait_for
from tests.integration.test_pipeline import fixed_calibrator

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BASE = 1_700_000_000_000
TOPICS = ["running shoes trail", "fantasy dragon novel", "cast iron kitchen", "jazz vinyl record",
          "garden seeds tomato"]
ITEMS = 40
USERS = 24
RECALLED = 14  # candidates per request
SHOWN = 4  # of which exposed
KEEP = 16  # labeler.keep_abstained: the 8 oldest held batches go to the DLQ


def foreign_file(path: Path, seed: int = 7) -> dict[str, Any]:
    """Write the file; return what it holds (recalls and exposures by request)."""
    rng = np.random.default_rng(seed)
    items = [{"item_id": 1000 + i, "text": f"{TOPICS[i % len(TOPICS)]} model {i}", "category": f"c{i % 5}"}
             for i in range(ITEMS)]
    stamps = BASE + 60_000 * rng.permutation(USERS)  # event times unrelated to the user order of the file
    recalls, exposures, lines = {}, {}, []
    for u in range(USERS):
        rid, uid, ts = f"r{u:02d}", f"u{u:02d}", int(stamps[u])
        ids = [int(x) for x in 1000 + rng.choice(ITEMS, RECALLED, replace=False)]
        recalls[rid] = {"request_id": rid, "user_id": uid, "ts": ts, "item_ids": ids,
                        "scores": [round(1 - j / RECALLED, 3) for j in range(RECALLED)], "schema_version": 2}
        shown = [{"item_id": i, "position": j, "clicked": j in (0, 2)} for j, i in enumerate(ids[:SHOWN])]
        exposures[rid] = {"request_id": rid, "user_id": uid, "ts": ts + 1500, "items": shown}
        lines += [{"topic": "recall", "value": recalls[rid]}, {"topic": "exposure", "value": exposures[rid]}]
        if u == USERS // 2:  # the catalogue in the middle of the events
            lines += [{"topic": "items", "value": it} for it in items]
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    return {"recalls": recalls, "exposures": exposures}


def _cli_env(s: Any, broker: EmbeddedBroker, metrics_port: int) -> dict[str, str]:
    """The environment of a shell next to the stack: its broker, its profile, and its metrics port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")}
    for section, fields in broker.profile().items():
        for k, v in fields.items():
            env[f"GPL_{section.upper()}__{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return env | {"PYTHONPATH": str(ROOT), "GPL_DATA_DIR": str(s.data_dir),
                  "GPL_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
                  "GPL_KAFKA__PARTITIONS": str(s.kafka.partitions), "GPL_METRICS_PORT": str(metrics_port)}


def test_a_user_ordered_foreign_file_accounts_for_every_candidate(tmp_path: Path, fresh_broker: EmbeddedBroker) -> None:
    path = tmp_path / "foreign.jsonl"
    world = foreign_file(path)
    recalls, exposures = world["recalls"], world["exposures"]
    s = make_settings(tmp_path, fresh_broker, partitions=2, encoder={"model": "hash-bow-64"},
                      streams={"debounce_s": 0}, trainer={"checkpoint_every": 50, "batch_size": 32},
                      labeler={"label_source": "calibrator", "random_n": 6, "cap": 6, "keep_abstained": KEEP})
    assert s.anchors.backend == "content" and not s.calibrator_file.exists()  # as shipped, before `gpl calibrate`

    with Stack(s) as stack, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # the port a running `gpl up` serves its metrics on
        taken.listen()
        names = ("indexer", "streams", "anchors", "labeler", "trainer")
        stages = Stages({n: stack.make(n, **({"progress": False} if n in ("indexer", "trainer") else {}))
                         for n in names})
        with stages:
            done = subprocess.run([sys.executable, "-m", "gpl.cli", "replay", str(path), "--index-wait", "60"],
                                  env=_cli_env(s, fresh_broker, taken.getsockname()[1]), cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-3000:]
            assert json.loads(done.stdout.strip().splitlines()[-1]) == {"items": ITEMS, "recall": USERS,
                                                                        "exposure": USERS}
            assert "not in event-time order" in done.stderr  # said, and sorted
            streams, labeler, trainer = (stages.stages[n] for n in ("streams", "labeler", "trainer"))
            wait_for(lambda: streams.accounting["joined"] == 2 * USERS, 60,
                     lambda: f"every request joined: {streams.accounting.snapshot()}")
            batches = streams.accounting["unexposed_batches"]
            # out of the box the labeler abstains: it holds what it can, dead-letters the oldest past the bound
            wait_for(lambda: labeler.accounting["abstained"] == batches, 60,
                     lambda: f"every batch abstained on: {labeler.accounting.snapshot()}")
            held = labeler.accounting["abstained"] - labeler.accounting["dlq:abstained"]
            assert held == KEEP and labeler.accounting["labeled"] == 0
            # the gauge as this process's /metrics serves it, relayed from the labeler's own process
            wait_for(lambda: _served("gpl_labeler_abstaining") == 1, 10, "the abstaining gauge at 1 on /metrics")
            fixed_calibrator(s.encoder.model).save(s.calibrator_file)  # `gpl calibrate`
            wait_for(lambda: labeler.accounting["labeled"] == KEEP, 30,
                     lambda: f"the held batches relabelled: {labeler.accounting.snapshot()}")
            wait_for(lambda: _served("gpl_labeler_abstaining") == 0, 10, "the abstaining gauge back at 0")
            samples = drain(s, "samples")
            wait_for(lambda: trainer.accounting["samples"] == sum(len(b["samples"]) for b in samples), 60,
                     lambda: f"the trainer took every sample: {trainer.accounting.snapshot()}")
            unexposed = [decode_unexposed(v) for _, v in _raw(s, "unexposed", batches)]
            dead = [DeadLetter.model_validate(orjson.loads(v)) for _, v in _raw(s, "unexposed.dlq", batches - KEEP)]
        assert not stages.errors
        lab, st, tr = labeler.accounting.snapshot(), streams.accounting.snapshot(), trainer.accounting.snapshot()

    # streams: every request joined, nothing expired, every candidate exposed or unexposed
    assert st["joined"] == 2 * USERS and not {k for k in st if k.startswith(("expired", "late_", "dlq:"))}
    for rid, r in recalls.items():
        shown = {x["item_id"] for x in exposures[rid]["items"]}
        assert shown <= set(r["item_ids"])
    assert {b.request_id: sorted(b.item_ids.tolist()) for b in unexposed} == {
        rid: sorted(set(r["item_ids"]) - {x["item_id"] for x in exposures[rid]["items"]}) for rid, r in recalls.items()}
    assert st["unexposed_candidates"] == USERS * (RECALLED - SHOWN) and st["real_samples"] == USERS * SHOWN

    # labeler: each unexposed candidate pseudo-labelled, sampled out, or dead-lettered with its reason
    pseudo = [x for b in samples for x in b["samples"] if x["source"] == "pseudo"]
    assert lab["candidates"] == st["unexposed_candidates"]
    assert lab["pseudo"] == len(pseudo) == KEEP * 6 and lab["sampled_out"] == KEEP * (RECALLED - SHOWN - 6)
    assert lab["candidates_dlq"] == (batches - KEEP) * (RECALLED - SHOWN)
    assert lab["pseudo"] + lab["sampled_out"] + lab.get("duplicate", 0) + lab["candidates_dlq"] == lab["candidates"]
    assert Counter(d.reason for d in dead) == {"abstained": batches - KEEP} == {
        k.removeprefix("dlq:"): v for k, v in lab.items() if k.startswith("dlq:")}
    relabelled = {b["request_id"] for b in samples if b["samples"][0]["source"] == "pseudo"}
    held_out = {decode_unexposed(base64.b64decode(d.value)).request_id for d in dead}
    assert relabelled | held_out == set(recalls) and not relabelled & held_out
    assert lab["relabelled"] == KEEP and not {k for k in lab if k.endswith(("timed_out", "_at_stop", "released"))}
    # the labeler's identities (workers/labeler/loop.py), from the counts its process reported: nothing left over
    assert lab["in"] == lab["labeled"] + sum(v for k, v in lab.items() if k.startswith("dlq:")) == batches

    # trainer: every sample (real and pseudo) trained or held out, once; no vector was missing
    assert tr["samples"] == USERS * SHOWN + len(pseudo) and "dlq:no_vector" not in tr
    assert tr["samples"] == tr.get("trained", 0) + tr.get("holdout", 0) + tr.get("duplicate", 0)


def _served(name: str) -> float:
    """A metric's value on this process's /metrics (its own registry merged with its child stages')."""
    return sum(x.value for m in MERGED.collect() for x in m.samples if x.name == name)


def _raw(s: Any, topic: str, expect: int) -> list[tuple[bytes | None, bytes]]:
    from tests.helpers import records

    got = [(k, v) for k, v in records(s, topic, expect=expect) if v is not None]
    assert len(got) == expect, (topic, len(got), expect)
    return got
