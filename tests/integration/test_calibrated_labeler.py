"""The shipped labeler path on the real broker: ``label_source = calibrator`` (every other broker test forces the
fixed map). Abstention without a calibrator (batches held uncommitted, the gauge at 1), the relabelling when one
is written, the bound past which held batches are dead-lettered, a restart re-reading what was held, a rebalance
handing held batches to the next owner, a labeling bug dead-lettered as ``label_error``, and the closed-loop refit
whose new version reaches the lineage.

Items live in the numpy twin of the vector index (tests/helpers.py ``item_index``); the broker is real.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from runtime.settings import Settings
from schemas.events import DeadLetter, Sample, SampleBatch
from tests.helpers import produce, running, wait_for
from tests.integration.test_labeler import (
    ALL_IDS,
    _anchors,
    _batch,
    _committed_everything,
    _index,
    _produce_where,
    _read,
)
from workers.labeler import Labeler
from workers.labeler.calibrator import Calibrator

pytestmark = pytest.mark.integration
FEATURES = ("s1", "s_mean", "log_recall", "user_ctr")
BALANCED = {"batches": 0, "candidates": 0, "anchors": 0}


def _calibrator(s: Settings, intercept: float = -2.0) -> Calibrator:
    """A calibrator for the test's encoder and catalogue, monotone in s1 as fitted ones are."""
    return Calibrator(features=FEATURES, mean=(0.2, 0.2, -2.0, -1.0), scale=(0.2, 0.2, 1.0, 1.0),
                      coef=(1.5, 0.5, 0.3, 0.2), intercept=intercept, monotone="s1", encoder=s.encoder.model,
                      catalogue=s.labeler.catalogue)


def _abstaining() -> float | None:
    return REGISTRY.get_sample_value("gpl_labeler_abstaining")


@pytest.fixture
def calibrated(settings: Settings) -> Settings:
    """The shipped default source (the calibrator), a small draw so every candidate's fate is countable."""
    return settings.with_overrides(labeler={"label_source": "calibrator", "random_n": 4, "cap": 4})


def test_abstains_holds_then_relabels_when_the_calibrator_is_written(calibrated: Settings,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    s = calibrated
    assert not s.calibrator_file.exists()
    labeler = Labeler(s, _index(s))
    with running(labeler, "labeler"), caplog.at_level(logging.ERROR, logger="workers.labeler"):
        wait_for(lambda: _abstaining() == 1, 20, "the abstaining gauge at 1")
        # the first-run hint: what is missing and the one command that fits it
        assert any("labeler abstains" in r.getMessage() and "calibrate DIR" in r.getMessage() for r in caplog.records)
        produce(s, "anchors", [_anchors(s, "u1", ["running shoes"]), _anchors(s, "u2", ["fantasy dragons"])])
        produce(s, "unexposed", [_batch("u1", "r0"), _batch("u2", "r1"), _batch("u1", "r2"), _batch("u2", "r3")])
        wait_for(lambda: len(labeler.held) == 4, 30, "four batches held while abstaining")
        time.sleep(1.0)  # several loops and commits: nothing labeled, nothing committed past the held batches
        assert labeler.accounting["labeled"] == 0 and _read(s, "samples", expect=0, timeout=1.0) == []
        assert not _committed_everything(s)
        assert labeler.balance() == BALANCED and _abstaining() == 1

        cal = _calibrator(s)
        cal.save(s.calibrator_file)  # what `gpl calibrate` does: picked up on the next loop
        wait_for(lambda: labeler.accounting["labeled"] == 4, 30, "the held batches relabelled")
        assert _abstaining() == 0
        wait_for(lambda: _committed_everything(s), 20, "offsets committed to the end")
        samples = [SampleBatch.model_validate(x) for x in _read(s, "samples", expect=4)]
    assert sorted(b.request_id for b in samples) == ["r0", "r1", "r2", "r3"]
    for b in samples:
        assert b.lineage is not None and b.lineage.calibrator == cal.version
        assert len(b.samples) == 4 and all(0 < smp.label < 1 for smp in b.samples)
    acc = labeler.accounting.snapshot()
    assert (acc["in"], acc["abstained"], acc["relabelled"], acc["labeled"]) == (4, 4, 4, 4)
    assert acc["pseudo"] + acc["sampled_out"] + acc.get("duplicate", 0) == acc["candidates"] == 4 * len(ALL_IDS)
    assert len(labeler.held) == 0 and labeler.balance() == BALANCED


def test_past_the_bound_held_batches_are_dead_lettered_and_a_restart_relabels_the_rest(calibrated: Settings) -> None:
    s = calibrated.with_overrides(labeler={"keep_abstained": 2})
    first = Labeler(s, _index(s))
    with running(first, "labeler-1"):
        produce(s, "anchors", [_anchors(s, "u1", ["running shoes"])])
        produce(s, "unexposed", [_batch("u1", f"r{i}") for i in range(5)])  # one user: one partition, in order
        wait_for(lambda: first.accounting["abstained"] == 5, 30, "five abstentions")
        dead = [DeadLetter.model_validate(x) for x in _read(s, "unexposed.dlq", expect=3)]
    assert sorted(d.reason for d in dead) == ["abstained"] * 3 and {d.topic for d in dead} == {"unexposed"}
    acc = first.accounting.snapshot()
    assert acc["dlq:abstained"] == 3 and acc["candidates_dlq"] == 3 * len(ALL_IDS)
    assert acc["abstained_at_stop"] == 2 and acc["candidates_abstained_at_stop"] == 2 * len(ALL_IDS)
    assert first.balance() == BALANCED

    _calibrator(s).save(s.calibrator_file)
    second = Labeler(s, _index(s))  # the two held batches were not committed: read again, labeled now
    with running(second, "labeler-2"):
        wait_for(lambda: second.accounting["labeled"] == 2, 30, "the two held batches labeled after the restart")
        samples = [SampleBatch.model_validate(x) for x in _read(s, "samples", expect=2)]
        wait_for(lambda: _committed_everything(s), 20, "offsets committed to the end")
    assert sorted(b.request_id for b in samples) == ["r3", "r4"]  # the newest two; r0..r2 are in the DLQ
    assert second.accounting["in"] == 2 and second.balance() == BALANCED


def test_a_labeling_bug_goes_to_the_dlq_as_label_error(calibrated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    s = calibrated
    _calibrator(s).save(s.calibrator_file)
    labeler = Labeler(s, _index(s))

    def broken(self: Calibrator, x: np.ndarray) -> np.ndarray:
        raise FloatingPointError("a bug in the calibrated labels")

    with running(labeler, "labeler"):
        produce(s, "anchors", [_anchors(s, "u1", ["running shoes"])])
        wait_for(lambda: labeler.anchor_accounting["accepted"] == 1 and _abstaining() == 0, 20, "anchors taken")
        with monkeypatch.context() as m:
            m.setattr(Calibrator, "logit", broken)
            produce(s, "unexposed", [_batch("u1", "r-bug")])
            wait_for(lambda: labeler.accounting["dlq:label_error"] == 1, 30, "the batch dead-lettered")
        produce(s, "unexposed", [_batch("u1", "r-ok")])
        wait_for(lambda: labeler.accounting["labeled"] == 1, 30, "the next batch labeled")
        wait_for(lambda: _committed_everything(s), 20, "offsets committed to the end")
        dead = [DeadLetter.model_validate(x) for x in _read(s, "unexposed.dlq", expect=1)]
    assert [(d.reason, d.stage) for d in dead] == [("label_error", "labeler")]
    assert "a bug in the calibrated labels" in dead[0].error
    acc = labeler.accounting.snapshot()
    assert acc["candidates_dlq"] == len(ALL_IDS) and acc["in"] == 2 and acc.get("abstained", 0) == 0
    assert labeler.balance() == BALANCED


def test_real_labels_met_by_pseudo_labels_refit_the_calibrator(calibrated: Settings) -> None:
    s = calibrated.with_overrides(labeler={"random_n": len(ALL_IDS), "cap": len(ALL_IDS), "recalibrate_every": 5})
    cal = _calibrator(s, intercept=-4.0)  # claims clicks are rare ...
    cal.save(s.calibrator_file)
    labeler = Labeler(s, _index(s))
    with running(labeler, "labeler"):
        produce(s, "anchors", [_anchors(s, "u1", ["running shoes"])])
        produce(s, "unexposed", [_batch("u1", "r0")])
        wait_for(lambda: labeler.accounting["labeled"] == 1, 30, "r0 labeled")
        # ... and every one of them is later shown to the user, two in three clicked
        clicks = SampleBatch(request_id="r-real", user_id="u1", ts=int(time.time() * 1000),
                             samples=[Sample(sample_id=f"r-real:{i}", item_id=i, label=float(i % 3 > 0), weight=1.0,
                                             source="click" if i % 3 else "exposed-negative") for i in ALL_IDS])
        produce(s, "samples", [clicks])
        wait_for(lambda: labeler.accounting["recalibrated"] == 1, 30, "a closed-loop refit")
        produce(s, "unexposed", [_batch("u1", "r1")])
        wait_for(lambda: labeler.accounting["labeled"] == 2, 30, "r1 labeled")
        batches = {b.request_id: b for b in map(SampleBatch.model_validate, _read(s, "samples", expect=3))
                   if b.samples and b.samples[0].source == "pseudo"}
    assert labeler.accounting["closed_loop_joins"] == len(ALL_IDS)
    before, after = batches["r0"].lineage, batches["r1"].lineage
    assert before is not None and after is not None and before.calibrator == cal.version != after.calibrator
    assert np.mean([x.label for x in batches["r1"].samples]) > np.mean([x.label for x in batches["r0"].samples])
    assert labeler.balance() == BALANCED


def test_a_rebalance_hands_held_batches_to_the_next_owner(calibrated: Settings) -> None:
    """Two labelers in one group: on the rebalance the first one's held batches are released uncommitted
    (counted ``released``) and read again by whichever owns their partition next, and every batch is labeled
    once, by one of them, when the calibrator is written."""
    s = calibrated
    users = [f"u{i}" for i in range(6)]  # keys that land on both partitions
    first = Labeler(s, _index(s))
    with running(first, "labeler-1"):
        produce(s, "anchors", [_anchors(s, u, ["running shoes"]) for u in users])
        where = _produce_where(s, "unexposed", [_batch(u, f"r-{u}") for u in users])
        assert {p for p, _ in where.values()} == {0, 1}
        wait_for(lambda: len(first.held) == len(users), 30, "every batch held by the first labeler")
        second = Labeler(s, _index(s))
        with running(second, "labeler-2"):
            # a rebalance revokes (the range assignor: all of the first's partitions), each owner reads again
            wait_for(lambda: first.accounting["released"] > 0 and len(second.held) > 0
                     and len(first.held) + len(second.held) == len(users), 60,
                     lambda: f"a partition handed over: {first.accounting.snapshot()} {second.accounting.snapshot()}")
            _calibrator(s).save(s.calibrator_file)
            wait_for(lambda: first.accounting["labeled"] + second.accounting["labeled"] == len(users), 30,
                     "every batch labeled by one of them")
            wait_for(lambda: _committed_everything(s), 20, "offsets committed to the end")
            samples = [SampleBatch.model_validate(x) for x in _read(s, "samples", expect=len(users))]
    assert sorted(b.request_id for b in samples) == sorted(f"r-{u}" for u in users)  # each once
    a, b = first.accounting.snapshot(), second.accounting.snapshot()
    assert a["candidates_released"] == a["released"] * len(ALL_IDS) and b["labeled"] > 0
    assert a["in"] - a["released"] == a["labeled"] and b["in"] == b["labeled"]  # what was released, read again
    assert first.balance() == second.balance() == BALANCED
