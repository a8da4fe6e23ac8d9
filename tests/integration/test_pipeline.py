"""End to end on the real stack: a small event file through every stage, exact outcomes asserted.

Real Tansu broker, real embedded Qdrant engine (qdrant-edge), real faust streams processor, real
workers; only the two heavy models are replaced by their in-memory twins (HashEncoder, MemoryGenerator)
so the test stays fast — the LLM and the sentence encoder have their own tests.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from gpl.simulate import SimConfig, load_movielens, simulate, write_jsonl
from gpl.stack import Stack, Stages
from runtime.broker import Broker
from schemas.events import ExposureEvent, RecallEvent
from tests.fixtures.settings import make_settings
from tests.helpers import drain, wait_for
from workers.labeler.calibrator import Calibrator
from workers.labeler.features import FEATURES

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[2] / "data" / "movielens-small"


def fixed_calibrator(encoder: str) -> Calibrator:
    """A calibrator over every feature the labeler computes, with fixed coefficients (no fit needed here)."""
    return Calibrator(features=FEATURES, mean=(0.3, 0.2, 0.2, 0.3, -3.0, -4.0, -1.5), scale=(0.2,) * 4 + (1.0,) * 3,
                      coef=(0.8, 0.1, 0.2, 0.3, 0.5, 0.2, 0.4), intercept=-2.0, monotone="s1", encoder=encoder,
                      catalogue="")


# the shipped calibrated default on both brokers by default; the old fixed map end to end in `make test-all`
@pytest.mark.parametrize("label_source", [pytest.param("map", marks=pytest.mark.slow), "calibrator"])
def test_event_file_through_all_stages(tmp_path: Path, any_broker: Broker, label_source: str) -> None:
    from gpl.replay import replay_jsonl
    from workers.trainer.checkpoints import latest_checkpoint

    sim = simulate(load_movielens(DATA), SimConfig(seed=3, users=6, candidates=40, max_requests_per_user=6,
                                                   exposure_first_fraction=0.3))
    events = tmp_path / "events.jsonl"
    write_jsonl(sim, events)
    s = make_settings(tmp_path, any_broker, partitions=3,
                      encoder={"model": "hash-bow-64"}, anchors={"backend": "memory", "k": 3},
                      streams={"debounce_s": 0, "join_wait_s": 30},
                      labeler={"wait_for_anchors_s": 60, "top_n": 5, "random_n": 5, "cap": 8,
                               "label_source": label_source},
                      trainer={"checkpoint_every": 50, "batch_size": 32})
    calibrator = fixed_calibrator("hash-bow-64").save(s.calibrator_file) if label_source == "calibrator" else None
    recalls = {e.request_id: e for t, e in sim.events if isinstance(e, RecallEvent)}
    exposures = {e.request_id: e for t, e in sim.events if isinstance(e, ExposureEvent)}
    real_expected = [it for e in exposures.values() for it in e.items]

    with Stack(s) as stack:
        names = ("indexer", "streams", "anchors", "labeler", "trainer")
        stages = Stages({n: stack.make(n, **({"progress": False} if n in ("indexer", "trainer") else {}))
                         for n in names})
        with stages:
            replay_jsonl(s, events, topics={"items"}, progress=False)
            wait_for(lambda: stack.index.count(s.encoder.collection) == len(sim.items), 120, "items indexed")
            replay_jsonl(s, events, topics={"recall", "exposure"}, progress=False)
            streams = stages.stages["streams"]
            wait_for(lambda: streams.accounting["joined"] == 2 * len(recalls), 120,
                     lambda: f"all requests joined: {streams.accounting.snapshot()}")
            labeler = stages.stages["labeler"]
            wait_for(lambda: labeler.accounting["labeled"] == streams.accounting["unexposed_batches"], 120,
                     lambda: f"all unexposed batches labeled: {labeler.accounting.snapshot()}")
            samples = drain(s, "samples")
            trainer = stages.stages["trainer"]
            wait_for(lambda: trainer.counts["messages"] == len(samples), 120,  # type: ignore[attr-defined]
                     lambda: f"trainer to consume all samples: {trainer.counts}")  # type: ignore[attr-defined]
            # the labeler reads samples for the real labels and skips its own batches by their header
            wait_for(lambda: labeler.accounting["own_pseudo_skipped"] == labeler.accounting["labeled"], 60,
                     lambda: f"labeler to skip its own batches: {labeler.accounting.snapshot()}")
            labeler_counts = labeler.accounting.snapshot()
            if calibrator is not None:  # real labels reach the labeler too (they feed its priors)
                wait_for(lambda: labeler.accounting["real_labels_seen"] >= len(real_expected), 60,
                         lambda: f"labeler to see the real labels: {labeler.accounting.snapshot()}")
                labeler_counts = labeler.accounting.snapshot()
        assert not stages.errors
        trained = dict(trainer.counts)  # type: ignore[attr-defined]
        unexposed = drain(s, "unexposed", expect=len(recalls))
        anchors = drain(s, "anchors")

    # which candidates were unexposed: exactly recall − exposure, per request
    want = {}
    for rid, r in recalls.items():
        shown = {it.item_id for it in exposures[rid].items}
        rest = [c.item_id for c in r.candidates if c.item_id not in shown]
        if rest:
            want[rid] = rest
    assert {u["request_id"]: u["item_ids"] for u in unexposed} == want
    # every exposed item got exactly one real label
    real = Counter((b["request_id"], x["item_id"]) for b in samples for x in b["samples"] if x["source"] != "pseudo")
    assert set(real) == {(rid, it.item_id) for rid, e in exposures.items() for it in e.items}
    assert set(real.values()) == {1}
    # pseudo-labels exist for every user with anchors, and carry their lineage
    anchored = {a["user_id"] for a in anchors}
    assert anchored
    pseudo = [b for b in samples if any(x["source"] == "pseudo" for x in b["samples"])]
    assert anchored <= {b["user_id"] for b in pseudo}
    lineage = pseudo[0]["lineage"]
    assert lineage["encoder"] == "hash-bow-64" and lineage["anchor_version"] >= 1 and lineage["prompt_hash"]
    if calibrator is not None:  # the calibrated path: its version in every label's lineage, real labels counted
        version = fixed_calibrator("hash-bow-64").version
        assert {b["lineage"]["calibrator"] for b in pseudo} == {version} and version in lineage["label_map"]
        assert labeler_counts["real_labels_seen"] == sum(len(e.items) for e in exposures.values())
        assert labeler_counts.get("abstained", 0) == 0
    else:
        assert lineage.get("calibrator", "") == ""
    x = next(x for x in pseudo[0]["samples"] if x["source"] == "pseudo")
    assert 0 <= x["label"] <= 1 and x["weight"] >= 0 and x["matched_anchor"] is not None and x["confidence"]
    # a checkpoint appeared, covering every sample
    ckpt = latest_checkpoint(s.checkpoints_dir)
    assert ckpt is not None
    assert trained["samples"] == sum(len(b["samples"]) for b in samples)

    # a restarted trainer resumes from its checkpoint without re-counting
    with Stack(s) as stack:
        again = Stages({"trainer": stack.make("trainer", progress=False)})
        with again:
            time.sleep(8)
        assert again.stages["trainer"].counts["samples"] == trained["samples"]  # type: ignore[attr-defined]
        assert again.stages["trainer"].counts["duplicates"] == trained["duplicates"]  # type: ignore[attr-defined]
