"""The publishing gate: held-out real labels, gate decisions, the published area, rollback."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gpl.cli import main
from schemas.events import Sample, SampleBatch
from schemas.ids import sample_id
from tests.preranker_world import DIM, LINEAGE, feed, requests, world_index, world_settings
from workers.labeler.calibrator import binary_auc
from workers.model import sample_key
from workers.trainer import Trainer
from workers.trainer.checkpoints import load_checkpoint
from workers.trainer.gate import Scores, decide, gauc
from workers.trainer.holdout import is_holdout
from workers.trainer.metrics import CHECKPOINT_TIME, PUBLISH_DECISIONS, PUBLISH_TIME


def scores(auc: float, g: float, rows: int = 500) -> Scores:
    return Scores(auc=auc, gauc=g, rows=rows, positives=rows // 4, gauc_users=10)


def test_holdout_share_is_deterministic() -> None:
    keys = [sample_key(f"r{n}:{i}") for n in range(500) for i in range(20)]
    held = [is_holdout(k, 0.1) for k in keys]
    assert held == [is_holdout(k, 0.1) for k in keys]  # the same answer every time (no RNG, no process salt)
    assert 0.08 < sum(held) / len(keys) < 0.12
    assert not any(is_holdout(k, 0.0) for k in keys)
    # a larger share only adds samples: the slice of a smaller one stays held out
    assert all(is_holdout(k, 0.2) for k, h in zip(keys, held, strict=True) if h)


def test_decide() -> None:
    margin, need = 0.01, 100
    assert decide(scores(0.9, 0.9, rows=99), None, margin, need)[0] == "insufficient"
    assert decide(scores(math.nan, 0.9), None, margin, need)[0] == "insufficient"  # one class only
    # nothing published: the candidate must beat a constant scorer
    assert decide(scores(0.7, 0.6), None, margin, need)[0] == "published"
    assert decide(scores(0.7, 0.5), None, margin, need)[0] == "refused"
    assert decide(scores(0.7, math.nan), None, margin, need)[0] == "published"  # no user with both classes
    published = scores(0.80, 0.75)
    assert decide(scores(0.795, 0.745), published, margin, need)[0] == "published"  # within the margin
    outcome, reason = decide(scores(0.785, 0.76), published, margin, need)
    assert outcome == "refused" and "AUC 0.7850" in reason and "GAUC" not in reason
    outcome, reason = decide(scores(0.85, 0.70), published, margin, need)
    assert outcome == "refused" and reason.startswith("GAUC 0.7000")


def test_gauc_weights_users_by_rows_and_skips_one_class_users() -> None:
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.6, 0.5])
    y = np.array([1, 0, 1, 0, 0, 1, 1], np.float32)
    users = ["a", "a", "b", "b", "c", "c", "d"]  # a: 1.0, b: 0.0, c: 0.0, d: one class
    value, counted = gauc(s, y, users)
    assert counted == 3 and value == pytest.approx(2 * 1.0 / 6)


def test_gauc_equals_the_per_user_loop_with_ties() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    s = np.round(rng.normal(size=n), 1)  # many ties, within and across users
    y = (rng.random(n) < 0.3).astype(np.float32)
    users = [f"u{k}" for k in rng.integers(0, 200, n)]
    want_total, want_weight, want_users = 0.0, 0, 0
    for u in set(users):
        rows = [k for k, x in enumerate(users) if x == u]
        a = binary_auc(s[rows], y[rows])
        if not math.isnan(a):
            want_total, want_weight, want_users = want_total + a * len(rows), want_weight + len(rows), want_users + 1
    value, counted = gauc(s, y, users)
    assert counted == want_users > 100 and value == pytest.approx(want_total / want_weight, abs=1e-12)
    assert math.isnan(gauc(s, np.zeros(n, np.float32), users)[0])


def test_held_out_samples_are_never_trained_and_survive_a_restart(tmp_path: Path) -> None:
    s = world_settings(tmp_path, publish=False)
    index = world_index(s)
    t = Trainer(s, index, dim=DIM, progress=False)
    batches = requests(0, 60)
    t._fetch_vectors({sample.item_id for b in batches for sample in b.samples})
    for b in batches:
        t._admit(b)
    expect = [(b.user_id, x.item_id, x.label) for b in batches for x in b.samples
              if is_holdout(sample_key(x.sample_id), s.trainer.holdout_fraction)]
    assert [r[:3] for r in t.holdout.rows] == expect and t.counts["holdout"] == len(expect) > 0
    assert t.counts["samples"] == sum(len(b.samples) for b in batches)  # counted as admitted ...
    assert len(t._pending) == t.counts["samples"] - len(expect)  # ... but never buffered for training
    t.checkpoint()

    again = Trainer(s, index, progress=False)
    assert list(again.holdout.rows) == list(t.holdout.rows)
    again._admit(batches[0])  # a replay: duplicates, held-out ones included, and nothing held twice
    assert again.counts["duplicates"] == len(batches[0].samples) and len(again.holdout) == len(t.holdout)


def sabotage(trainer: Trainer) -> None:
    """Flip the sign of the output layer: the same network ranking upside down."""
    assert trainer.model is not None
    with torch.no_grad():
        trainer.model.mlp[2].weight.neg_()
        trainer.model.mlp[2].bias.neg_()


def test_worse_is_refused_better_published_and_rollback_restores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    s = world_settings(tmp_path)
    t = Trainer(s, world_index(s), dim=DIM, progress=False)
    area = t.publisher.area
    cli = ["--data-dir", str(s.data_dir), "publish"]
    refused_before = PUBLISH_DECISIONS.labels(outcome="refused")._value.get()

    # 1: nothing published yet; the first checkpoint beats a constant scorer and is published
    ckpt1 = feed(t, requests(0, 150))
    assert ckpt1 is not None and area.current() == area.directory / "model-000001.pt"
    first = area.decisions()[-1]
    assert first["outcome"] == "published" and first["published"] is None
    assert first["candidate_scores"]["auc"] > 0.8 and first["candidate_scores"]["rows"] >= 50
    # the clocks of the stalled-checkpoint and stalled-publication alerts (deploy/base/alerts.yaml)
    assert CHECKPOINT_TIME._value.get() >= first["at"] - 60 and PUBLISH_TIME._value.get() == first["at"]

    # the serving copy: the model and its lineage, without the optimizer and the seen-set
    served, meta = load_checkpoint(area.directory / "model-000001.pt")
    trained, meta1 = load_checkpoint(ckpt1)
    assert meta["seen_count"] == meta1["seen_count"] == len(t.seen) and meta["config_hash"] == meta1["config_hash"]
    assert all(torch.equal(a, b) for a, b in zip(served.state_dict().values(), trained.state_dict().values(),
                                                  strict=True))
    assert (area.directory / "model-000001.pt").stat().st_size < ckpt1.stat().st_size / 2

    # 2: a worse checkpoint is refused; the pointer stays, the decision and its figures are recorded
    sabotage(t)
    t._dirty = True
    with caplog.at_level(logging.INFO, logger="workers.trainer.publish"):
        assert t.checkpoint() is not None
    worse = area.decisions()[-1]
    assert worse["candidate"] == 2 and worse["outcome"] == "refused" and worse["published"] == 1
    assert worse["candidate_scores"]["auc"] < worse["published_scores"]["auc"] - s.trainer.publish_margin
    # refused beyond the slice's noise: the paired bootstrap's upper bound is below -margin, and recorded
    assert worse["interval"]["auc"][2] < -s.trainer.publish_margin and worse["interval"]["resamples"] > 0
    assert area.current() == area.directory / "model-000001.pt" and not (area.directory / "model-000002.pt").exists()
    assert PUBLISH_DECISIONS.labels(outcome="refused")._value.get() == refused_before + 1
    assert any("checkpoint 2 refused for serving" in r.getMessage() for r in caplog.records)

    # 3: repaired and trained on more data: published over version 1
    sabotage(t)
    feed(t, requests(150, 150))
    better = area.decisions()[-1]
    assert better["candidate"] == 3 and better["outcome"] == "published" and better["published"] == 1
    assert better["candidate_scores"]["auc"] >= better["published_scores"]["auc"] - s.trainer.publish_margin
    assert area.current() == area.directory / "model-000003.pt"
    assert [e["version"] for e in area.stack()] == [1, 3]

    # 4: `gpl publish --list`, then `--rollback` restores the previous pointer; a second has nothing left
    assert main([*cli, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "* model-000003.pt" in listed and "  model-000001.pt" in listed and '"outcome": "refused"' in listed
    assert main([*cli, "--rollback"]) == 0
    assert area.current() == area.directory / "model-000001.pt" and [e["version"] for e in area.stack()] == [1]
    assert area.history()[-1]["event"] == "rollback" and area.history()[-1]["version"] == 3
    assert main([*cli, "--rollback"]) == 1 and area.current() == area.directory / "model-000001.pt"

    # 5: the running trainer gates its next checkpoint against the restored model, not the rolled-back one
    feed(t, requests(300, 20))
    assert area.decisions()[-1]["published"] == 1


def test_published_files_are_pruned_beyond_the_rollback_depth(tmp_path: Path) -> None:
    s = world_settings(tmp_path, keep_published=2, publish_margin=1.0)  # margin 1: every measured one passes
    t = Trainer(s, world_index(s), dim=DIM, progress=False)
    for k in range(4):
        feed(t, requests(60 * k, 60))
    area = t.publisher.area
    assert [e["version"] for e in area.stack()] == [1, 2, 3, 4]
    assert sorted(p.name for p in area.directory.glob("model-*.pt")) == ["model-000003.pt", "model-000004.pt"]
    assert area.rollback()["version"] == 3
    with pytest.raises(FileNotFoundError, match="pruned"):
        area.rollback()


def test_a_request_relabeled_by_newer_anchors_is_trained_once(tmp_path: Path) -> None:
    """After a restart the labeler may label the same unexposed batch again with a newer anchor set: the
    sample ids differ by anchor version, but the (request, item) example is trained at most once."""
    s = world_settings(tmp_path, publish=False)
    t = Trainer(s, world_index(s), dim=DIM, progress=False)

    def pseudo(version: int) -> SampleBatch:
        return SampleBatch(request_id="r1", user_id="u1", ts=1_700_000_000_000, lineage=LINEAGE, samples=[
            Sample(sample_id=sample_id("r1", i, version), item_id=i, label=0.4, weight=0.5, source="pseudo")
            for i in (3, 4, 5)])

    t._fetch_vectors({3, 4, 5})
    t._admit(pseudo(1))
    t._admit(pseudo(2))
    assert (t.counts["pseudo"], t.counts["duplicates"]) == (3, 3)
