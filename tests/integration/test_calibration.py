"""Closed-loop calibration: the pure join (LRU, curves, ECE) and the monitor on the real broker."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import REGISTRY

from gpl.eval import metrics as M
from runtime.settings import Settings
from schemas.events import Lineage, Sample, SampleBatch
from schemas.ids import sample_id
from tests.helpers import drain, produce, running, wait_for
from workers.calibration import CalibrationBook, CalibrationMonitor

G = ("smollm2", "abc", False)


def test_join_matches_offline_ece_and_reliability() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    users = [f"u{i % 50}" for i in range(n)]
    items = list(range(n))
    p = rng.random(n)
    w = rng.random(n)
    y = (rng.random(n) < p**2).astype(float)  # miscalibrated on purpose
    book = CalibrationBook(capacity=10_000)
    book.remember(users, items, p, w, G, [7] * n)
    assert book.join(users, items, y) == n
    snap = book.snapshot()
    g = snap["groups"][0]
    assert g["joined"] == n and snap["pending"] == 0
    assert g["label_ece"] == pytest.approx(M.ece(p, y, 10))
    mp, my, cnt = M.reliability(p, y, 10)
    assert g["reliability"]["count"] == cnt.tolist()
    assert np.allclose(g["reliability"]["predicted"], mp)
    assert np.allclose(g["reliability"]["observed"], my)
    agree = 1.0 - np.abs(y - p)
    assert g["weight_ece"] == pytest.approx(M.ece(w, agree, 10))  # bins by w, compares w with agreement
    assert g["anchor_versions"] == [7, 7]


def test_lru_bound_replacement_and_one_outcome_per_claim() -> None:
    book = CalibrationBook(capacity=3)
    book.remember(["a", "a", "a", "a"], [1, 2, 3, 4], [0.1] * 4, [1.0] * 4, G, [1] * 4)
    assert len(book) == 3 and book.counts["evicted"] == 1  # (a, 1) was the oldest
    book.remember(["a"], [2], [0.9], [0.5], G, [2])  # a newer claim replaces the older one
    assert book.counts["replaced"] == 1 and len(book) == 3
    assert book.join(["a", "a", "a"], [1, 2, 2], [1, 1, 1]) == 1  # (a,1) evicted; (a,2) joins once
    g = book.snapshot()["groups"][0]
    assert g["joined"] == 1 and g["mean_p"] == pytest.approx(0.9) and g["anchor_versions"] == [2, 2]
    assert book.counts["unmatched"] == 2


def _batch(
    user: str,
    rid: str,
    samples: list[tuple[int, float, float, str]],
    *,
    version: int = 5,
    model: str = "smollm2",
    fallback: bool = False,
) -> SampleBatch:
    lineage = Lineage(
        anchor_version=version,
        anchor_model=model,
        prompt_hash="abc",
        encoder="hash-bow-64",
        collection="items__hash-bow-64",
        fallback=fallback,
    )
    return SampleBatch(
        request_id=rid,
        user_id=user,
        ts=1_700_000_000_000,
        samples=[
            Sample.model_validate(
                {
                    "sample_id": sample_id(rid, i, version if src == "pseudo" else 0),
                    "item_id": i,
                    "label": lab,
                    "weight": w,
                    "source": src,
                }
            )
            for i, lab, w, src in samples
        ],
        lineage=lineage if any(s[3] == "pseudo" for s in samples) else None,
    )


def test_observe_groups_by_generator_and_fallback() -> None:
    book = CalibrationBook()
    book.observe(_batch("u1", "r1", [(10, 0.8, 0.6, "pseudo"), (11, 0.2, 0.9, "pseudo")]))
    book.observe(_batch("u1", "r2", [(12, 0.5, 0.1, "pseudo")], fallback=True))
    pseudo, real, joined = book.observe(
        _batch(
            "u1",
            "r3",
            [(10, 1.0, 1.0, "click"), (12, 0.0, 1.0, "exposed-negative"), (99, 0.0, 1.0, "exposed-negative")],
        )
    )
    assert (pseudo, real, joined) == (0, 3, 2)
    groups = {g["fallback"]: g for g in book.snapshot()["groups"]}
    assert groups[False]["joined"] == 1 and groups[False]["observed_rate"] == 1.0
    assert groups[True]["joined"] == 1 and groups[True]["observed_rate"] == 0.0
    assert book.snapshot()["pending"] == 1  # (u1, 11) still waits


@pytest.mark.integration
def test_monitor_on_the_real_broker(settings: Settings) -> None:
    """Pseudo-labels, then real labels of the same pairs, plus a bad message, through the samples topic."""
    first = [_batch(f"u{k}", f"r{k}", [(k, 0.9, 0.8, "pseudo"), (100 + k, 0.1, 0.7, "pseudo")]) for k in range(10)]
    later = [
        _batch(
            f"u{k}",
            f"s{k}",
            [
                (k, float(k % 2), 1.0, "click" if k % 2 else "exposed-negative"),
                (100 + k, 0.0, 1.0, "exposed-negative"),
            ],
        )
        for k in range(10)
    ]
    produce(settings, "samples", [*first])
    monitor = CalibrationMonitor(settings, export_every_s=0.2)
    with running(monitor, "calibration"):
        wait_for(lambda: monitor.accounting["processed"] >= 10, 60, "pseudo batches consumed")
        produce(settings, "samples", [*later, b"{not json"], keys=["x"] * 11)
        wait_for(
            lambda: monitor.accounting["processed"] >= 20 and monitor.accounting["dlq:malformed_json"] == 1,
            60,
            lambda: f"all consumed ({monitor.accounting.snapshot()})",
        )
    snap = monitor.snapshot()
    acc = snap["accounting"]
    assert acc["in"] == 21 and acc["processed"] + acc["dlq:malformed_json"] == 21
    assert acc["joined"] == 20 and acc["pseudo"] == 20 and acc["real"] == 20
    g = snap["groups"][0]
    assert g["joined"] == 20 and g["model"] == "smollm2"
    # p=0.9 on items clicked half the time, p=0.1 on items never clicked: ECE = (10*0.4 + 10*0.1)/20
    assert g["label_ece"] == pytest.approx(0.25)
    labels = {"model": "smollm2", "prompt_hash": "abc", "fallback": "false"}
    assert REGISTRY.get_sample_value("gpl_pseudo_label_ece", labels) == pytest.approx(0.25)
    assert REGISTRY.get_sample_value("gpl_pseudo_label_joined_pairs", labels) == 20
    bin9 = {**labels, "bin": "9"}
    observed = REGISTRY.get_sample_value("gpl_pseudo_label_reliability_observed_ratio", bin9)
    assert observed is not None and math.isclose(observed, 0.5)
    assert REGISTRY.get_sample_value("gpl_pseudo_label_reliability_predicted_ratio", bin9) == pytest.approx(0.9)
    assert REGISTRY.get_sample_value("gpl_pseudo_label_reliability_pairs", bin9) == 10
    dead = drain(settings, "samples.dlq", expect=1)
    assert len(dead) == 1 and dead[0]["reason"] == "malformed_json"


def test_one_outcome_memory_serves_the_monitor_and_the_labelers_recalibration() -> None:
    """Both joins of claims with outcomes keep their claims in workers/labeler/outcome_memory.py: the
    bound, the replacement and one outcome per claim behave the same in each."""
    from workers.labeler.outcome_memory import OutcomeMemory
    from workers.labeler.recalibration import Recalibrator

    memory: OutcomeMemory[float] = OutcomeMemory(2)
    memory.remember("u", 1, 0.1)
    memory.remember("u", 2, 0.2)
    memory.remember("u", 1, 0.3)  # replaces, and (u, 1) is now the newest
    memory.remember("u", 3, 0.4)  # full: (u, 2) is the oldest and goes
    assert (len(memory), memory.replaced, memory.evicted) == (2, 1, 1)
    assert memory.take("u", 2) is None and memory.take("u", 1) == 0.3 and memory.take("u", 1) is None

    recal = Recalibrator(every=10, alert=0.1, capacity=2)
    recal.remember("u", [1, 2, 3], np.array([0.5, 0.5, 0.5]))
    assert isinstance(recal._made, OutcomeMemory) and len(recal._made) == 2 and recal._made.evicted == 1
    assert recal.observe("u", [1, 2, 3], [1.0, 0.0, 1.0]) == 2  # (u, 1) was forgotten: two joins
    assert recal.observe("u", [2, 3], [1.0, 1.0]) == 0  # one outcome per claim
