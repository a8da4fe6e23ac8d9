"""The demo's output (issue 22, item 6): gate decisions summed up in one line, the closed-loop line
consistent with the labeler's calibration-drift warning, faust's back-pressure warnings counted instead
of printed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from gpl.demo import closed_loop_counts, gate_summary
from gpl.demo_report import _calibration_lines, _gate_line
from runtime.faust_config import FAUST_PRODUCER_LOGGER, count_backpressure
from runtime.kafka import Accounting
from runtime.metrics import PRODUCER_BACKPRESSURE
from runtime.settings import load
from workers.labeler.calibrator import Calibrator
from workers.labeler.recalibration import Recalibrator
from workers.trainer.gate import Decision, Scores
from workers.trainer.published_area import PublishedArea


def test_closed_loop_line_agrees_with_the_labelers_drift_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The labeler's refit warns of drift and counts it; the summary line reads the same counts (the
    accounting child processes relay), never "none met"."""
    r = Recalibrator(every=500, alert=0.05)
    items = list(range(600))
    r.remember("u1", items, np.full(600, 0.9))
    acc = Accounting("labeler")
    acc.add("closed_loop_joins", r.observe("u1", items[:500], [0.0] * 500))  # real labels say no: drift
    with caplog.at_level(logging.WARNING):
        r.refit(Calibrator(features=("log_recall",), mean=(0.0,), scale=(1.0,), coef=(0.0,), intercept=0.0,
                           monotone="none", encoder="hash", catalogue="test"))
    acc.add("closed_loop_drift" if r.drifting else "closed_loop_calibrated")
    assert r.drifting and any("calibration drift" in m for m in caplog.messages)
    counts = closed_loop_counts({"labeler": acc.snapshot(), "calibration": {"joined": 0}})
    text = "\n".join(_calibration_lines({"groups": []}, counts))
    assert "no pseudo-labeled item was exposed later" not in text
    assert "500 of its pseudo-labels" in text and "1 of 1 intercept refits found calibration drift" in text
    assert "agree" in _calibration_lines(None, closed_loop_counts({}))[0]


def test_gate_decisions_are_one_summary_line(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path))
    area = PublishedArea(s.checkpoints_dir / "published")
    sc = Scores(0.7, 0.7, 1000, 200, 80)
    for v, outcome in enumerate(("published", "refused", "published", "refused", "insufficient"), 1):
        area.record(Decision(candidate=v, published=1, outcome=outcome, reason=f"why {v}", margin=0.005,
                             candidate_scores=sc, published_scores=sc, at=time.time()))
    g = gate_summary(s)
    assert g["decisions"] == 5 and g["by_outcome"] == {"published": 2, "refused": 2, "insufficient": 1}
    line = _gate_line(g)
    assert "5 checkpoints: 2 published, 2 refused, 1 insufficient" in line and "last refusal: why 4" in line


def test_faust_backpressure_is_counted_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    count_backpressure()
    count_backpressure()  # idempotent: one filter
    before = PRODUCER_BACKPRESSURE._value.get()
    log = logging.getLogger(FAUST_PRODUCER_LOGGER)
    with caplog.at_level(logging.INFO):
        log.warning("producer buffer full size 1001")
        log.warning("producer buffer full size 1002")
        log.warning("something else")
        logging.getLogger("mode.timers").warning("Timer %s is overlapping (interval=%r runtime=%r)", "commit", 2.8, 3.2)
    assert PRODUCER_BACKPRESSURE._value.get() == before + 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["something else"]


def test_a_second_demo_trains_from_scratch_and_keeps_the_last_runs_checkpoints(tmp_path: Path) -> None:
    """The demo streams the same world each run with deterministic sample ids: trainers resumed from the last
    run's checkpoints skipped every sample as seen and the summary showed the old model."""
    from gpl.demo import fresh_trainer_state
    from runtime.settings import load

    s = load(env={}, data_dir=str(tmp_path))
    assert fresh_trainer_state(s) is None  # nothing to move on a first run
    for run in ("first", "second"):
        s.checkpoints_dir.mkdir()
        (s.checkpoints_dir / "ckpt-000001.pt").write_text(run)
        moved = fresh_trainer_state(s)
        assert moved == tmp_path / "checkpoints.previous" and not s.checkpoints_dir.exists()
        assert (moved / "ckpt-000001.pt").read_text() == run  # the latest earlier run is kept, once
