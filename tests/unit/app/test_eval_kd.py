"""The distillation baselines (gpl/eval/kd.py): fair KD labels like GPL, UKD's teacher adapts to the unexposed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpl.eval.anchor_sources import SourceAnchors
from gpl.eval.context import Context
from gpl.eval.dataset import EvalDataset, load_dataset
from gpl.eval.kd import KD_FEATURES, Baselines, ClickAdaptiveUKD, FairKD, _GradReverse
from gpl.eval.methods import uniform_unexposed
from gpl.eval.pseudo import gpl_labels
from gpl.simulate.semisynth import OracleConfig, build_semisynth
from runtime.encoder import HashEncoder
from runtime.settings import Settings, load
from workers.labeler.calibrator import Calibrator
from workers.labeler.training_log import row_folds

TINY_TRAINER = {"hash_buckets": 1024, "id_dim": 8, "hidden": 16, "batch_size": 64}


def _settings(tmp_path: Path) -> Settings:
    return load(env={}, data_dir=str(tmp_path / "data"), encoder={"model": "hash-bow-64"}, trainer=TINY_TRAINER,
                anchors={"backend": "memory"}, labeler={"top_n": 0, "random_n": 20, "cap": 20})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> EvalDataset:
    d = tmp_path_factory.mktemp("kd")
    return load_dataset(build_semisynth(d / "ss", users=40, oracle=OracleConfig(steps=60), cache_dir=d / "c"))


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.ones(3, requires_grad=True)
    _GradReverse.apply(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))


def test_fair_kd_labels_the_labelers_draw_through_a_cross_fitted_calibrator(world: EvalDataset,
                                                                            tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    vecs = HashEncoder().encode(world.item_text)
    ctx = Context(world, vecs, settings, epochs=1)
    fair = FairKD(ctx, settings, progress=False)
    assert fair.calibrator is not None, fair.fit.reason
    assert fair.calibrator.features == KD_FEATURES and fair.calibrator.monotone == "teacher_logit"
    # cross-fitting: the calibration rows are every exposed training row, each scored once
    assert fair.fit.cv["rows"] == float((row_folds(world, ~world.is_test) >= 0).sum())
    kd = Baselines(ctx, settings, ["kd", "kd-raw"], progress=False)
    kd.train_teacher(0)
    extra, soft = kd.rows("kd", 0, uniform_unexposed(ctx, settings.labeler.cap, 0))
    # the same candidates as GPL's priors-only labels for the same seed: the labeler's own per-request draw
    priors_cal = Calibrator(features=("log_recall",), mean=(0.0,), scale=(1.0,), coef=(0.0,), intercept=-3.0,
                            monotone="", encoder="hash-bow-64", catalogue=settings.labeler.catalogue, fitted_at=0.0,
                            info={})
    no_anchors = SourceAnchors(kind="content", model="", prompt_hash="")
    gpl = gpl_labels(world, vecs, no_anchors, settings.labeler, priors_cal, 0)
    assert np.array_equal(np.sort(soft.rows), np.sort(gpl.rows))
    assert (~world.exposed[soft.rows]).all() and (~world.is_test[world.row_request[soft.rows]]).all()
    assert np.allclose(soft.w, np.abs(2 * soft.p - 1))  # the labeler's margin weight
    assert extra.pseudo.all() and len(extra) == len(soft.rows)
    # calibrated: its mean label sits nearer the unexposed truth rate than the raw teacher's
    _, raw = kd.rows("kd-raw", 0, uniform_unexposed(ctx, settings.labeler.cap, 0))
    truth = float((world.label[soft.rows] == 1).mean())
    assert abs(soft.p.mean() - truth) < abs(raw.p.mean() - truth)


def test_ukd_teacher_gives_soft_labels_and_uncertainty_weights(world: EvalDataset, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    ctx = Context(world, HashEncoder().encode(world.item_text), settings, epochs=1)
    drawn = uniform_unexposed(ctx, 10, 0)
    soft = ClickAdaptiveUKD(ctx, 0, ctx.train_unexposed, progress=False).labels(drawn)
    assert np.array_equal(soft.rows, drawn)
    assert ((soft.p > 0) & (soft.p < 1)).all() and ((soft.w > 0) & (soft.w <= 1)).all()
    assert soft.w.std() > 0 and soft.info["mean_head_gap"] > 0  # the two heads disagree, unevenly


def test_the_teachers_are_reproducible_whatever_the_global_generators_did(world: EvalDataset, tmp_path: Path) -> None:
    """Dropout draws from torch's global generator: training seeds it (forked), so a rerun — or a run after
    other code moved the global generator — gives the same teacher and the same labels."""
    settings = _settings(tmp_path)
    ctx = Context(world, HashEncoder().encode(world.item_text), settings, epochs=1)
    drawn = uniform_unexposed(ctx, 10, 0)

    def labels_after(noise: int) -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(noise)  # whatever ran before in this process
        torch.rand(noise + 1)
        kd = Baselines(ctx, settings, ["kd-raw"], progress=False)
        kd.train_teacher(0)
        ukd = ClickAdaptiveUKD(ctx, 0, ctx.train_unexposed, progress=False).labels(drawn)
        return kd.rows("kd-raw", 0, drawn)[1].p, ukd.p

    (kd1, ukd1), (kd2, ukd2) = labels_after(1), labels_after(99)
    assert np.array_equal(kd1, kd2) and np.array_equal(ukd1, ukd2)
