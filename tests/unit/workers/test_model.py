"""Pure logic of the pre-ranker: hashing, loss weighting, dedup keys, checkpoint files, learnability."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.settings import TrainerSettings
from workers.model import (
    Batch,
    ModelConfig,
    PreRanker,
    item_buckets,
    loss_weights,
    sample_key,
    train_step,
    user_buckets,
    weighted_bce,
)
from workers.trainer.checkpoints import (
    FORMAT,
    LATEST,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank AUC (Mann-Whitney), ties averaged."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def small_config(content_dim: int = 8, seed: int = 0) -> ModelConfig:
    return ModelConfig(hash_buckets=256, id_dim=8, hidden=16, content_dim=content_dim, seed=seed)


# --- hashing and dedup keys ---------------------------------------------------------------------------


def test_hash_buckets_are_stable_across_processes() -> None:
    here = (
        user_buckets(["u1", "u2", "alice"], 1 << 16).tolist(),
        item_buckets([0, 7, 2**62], 1 << 16).tolist(),
        sample_key("r1:42:3"),
    )
    code = (
        "from workers.model import *; print((user_buckets(['u1','u2','alice'], 1<<16).tolist(), "
        "item_buckets([0, 7, 2**62], 1<<16).tolist(), sample_key('r1:42:3')))"
    )
    # another interpreter with another hash seed: Python's hash() would differ, blake2b must not
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=Path(__file__).parents[3],
    )
    assert out.stdout.strip() == repr(here)
    assert all(0 <= b < 1 << 16 for b in here[0] + here[1])
    assert -(2**63) <= here[2] < 2**63


def test_user_and_item_spaces_differ_and_keys_distinguish_samples() -> None:
    assert user_buckets(["7"], 1 << 20)[0] != item_buckets([7], 1 << 20)[0]  # salted apart
    keys = {sample_key(f"r{r}:{i}:0") for r in range(100) for i in range(100)}
    assert len(keys) == 10_000
    assert sample_key("r1:1:0") == sample_key("r1:1:0")


# --- loss weighting ---------------------------------------------------------------------------------


def test_loss_weights_exposed_one_pseudo_lambda_w() -> None:
    w = loss_weights(np.array([False, False, True, True]), np.array([0.3, 2.0, 0.5, 0.0]), 0.4)
    np.testing.assert_allclose(w, [1.0, 1.0, 0.2, 0.0])
    assert w.dtype == np.float32


def test_weighted_bce_matches_the_objective() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    labels = torch.tensor([1.0, 0.0, 0.7, 0.2])  # soft labels for the pseudo part
    weights = torch.tensor([1.0, 1.0, 0.25, 0.1])

    def bce(z: float, y: float) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expect = (
        sum(float(w) * bce(float(z), float(y)) for z, y, w in zip(logits, labels, weights, strict=True)) / 4
    )
    assert float(weighted_bce(logits, labels, weights)) == pytest.approx(expect, rel=1e-6)
    # a zero-weight pseudo sample contributes nothing, whatever its label
    a = weighted_bce(logits, labels, torch.tensor([1.0, 1.0, 0.25, 0.0]))
    b = weighted_bce(logits, torch.tensor([1.0, 0.0, 0.7, 1.0]), torch.tensor([1.0, 1.0, 0.25, 0.0]))
    assert float(a) == pytest.approx(float(b))


def test_lambda_zero_ignores_pseudo_samples() -> None:
    """With λ = 0 a pseudo-only batch yields zero gradient: the exposed-only baseline."""
    model = PreRanker(small_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = Batch(
        ["u1", "u2"],
        np.array([1, 2]),
        np.ones((2, 8), np.float32),
        np.array([1.0, 0.0], np.float32),
        np.array([1.0, 1.0], np.float32),
        np.array([True, True]),
    )
    parts = train_step(model, opt, batch, pseudo_lambda=0.0)
    assert parts["total"] == 0.0 and math.isnan(parts["exposed"]) and parts["pseudo"] > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- model --------------------------------------------------------------------------------------------


def test_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expect_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = (
        PreRanker(small_config(seed=1)),
        PreRanker(small_config(seed=1)),
        PreRanker(small_config(seed=2)),
    )
    assert torch.equal(torch.rand(1), expect_next)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.user_emb.weight, c.user_emb.weight)
    s = a.score(["u1", "u2"], [1, 2], np.ones((2, 8), np.float32))
    assert s.shape == (2,) and s.dtype == np.float32 and ((s > 0) & (s < 1)).all()
    assert a.score([], [], np.zeros((0, 8), np.float32)).shape == (0,)


def test_learns_a_separable_toy_problem() -> None:
    """Users like items whose content vector points their way: held-out AUC must exceed 0.9."""
    rng = np.random.default_rng(0)
    dim, n_users, n_items = 8, 40, 300
    prefs = rng.normal(size=(n_users, dim))
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)

    def draw(n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        u = rng.integers(0, n_users, n)
        i = rng.integers(0, n_items, n)
        y = ((prefs[u] * items[i]).sum(1) > 0).astype(np.float32)
        return [f"user-{k}" for k in u], i, y

    model = PreRanker(ModelConfig(hash_buckets=1024, id_dim=16, hidden=32, content_dim=dim, seed=0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        users, ids, y = draw(128)
        train_step(
            model, opt, Batch(users, ids, items[ids], y, np.ones(128, np.float32), np.zeros(128, bool)), 0.5
        )
    users, ids, y = draw(4000)
    assert auc(y, model.score(users, ids, items[ids])) > 0.9


# --- checkpoint files ---------------------------------------------------------------------------------


def _payload(version: int, model: PreRanker) -> dict[str, object]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return {
        "format": FORMAT,
        "version": version,
        "wall_time": 1.0,
        "model_config": model.cfg.to_dict(),
        "model_state": model.state_dict(),
        "optimizer_state": opt.state_dict(),
        "trainer_settings": TrainerSettings().model_dump(mode="json"),
        "encoder": "hash-bow-64",
        "collection": "items__hash-bow-64",
        "offsets": [["samples", 0, 5], ["samples", 1, 7]],
        "counts": {"real": 3, "pseudo": 4, "duplicates": 1},
        "seen": torch.tensor([5, -3, 2**62], dtype=torch.int64),
    }


def test_checkpoint_round_trip_pointer_and_retention(tmp_path: Path) -> None:
    model = PreRanker(small_config())
    for v in range(1, 5):
        save_checkpoint(tmp_path, _payload(v, model), keep=2)
    assert [v for v, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / LATEST).read_text().strip() == "ckpt-000004.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000003.pt",
        "ckpt-000004.pt",
        LATEST,
    ]  # no temps
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["version"] == 4 and meta["offsets"] == [["samples", 0, 5], ["samples", 1, 7]]
    assert meta["counts"] == {"real": 3, "pseudo": 4, "duplicates": 1} and meta["seen_count"] == 3
    assert "model_state" not in meta and not loaded.training
    x = (["u1", "u9"], [3, 4], np.ones((2, 8), np.float32))
    np.testing.assert_array_equal(loaded.score(*x), model.score(*x))
    assert read_checkpoint(tmp_path / "ckpt-000003.pt")["seen"].tolist() == [5, -3, 2**62]


def test_failed_write_leaves_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = PreRanker(small_config())
    save_checkpoint(tmp_path, _payload(1, model), keep=3)

    def torn(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, _payload(2, model), keep=3)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001.pt", LATEST]
    assert load_checkpoint(tmp_path)[1]["version"] == 1


def test_rejects_foreign_files(tmp_path: Path) -> None:
    torch.save({"format": "something-else"}, tmp_path / "ckpt-000001.pt")
    with pytest.raises(ValueError, match="not a"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "empty-dir-that-does-not-exist")


def test_a_trainer_checkpoint_pickles_no_project_class(tmp_path: Path) -> None:
    """A checkpoint names no class of this project, so moving a module (workers/trainer/ became a package)
    never makes an old checkpoint unreadable: its pickle refers to torch's rebuild functions and storages
    and to collections.OrderedDict only, every part of the trainer's state included."""
    import pickletools
    import zipfile

    from runtime.settings import Settings
    from workers.click_memory import ClickMemory
    from workers.trainer.holdout import Holdout
    from workers.trainer.state import payload
    from workers.trainer.vector_wait import VectorWait, Waiting

    model = PreRanker(small_config())
    holdout, memory, waiting = Holdout(4), ClickMemory(3), VectorWait(4, 60)
    holdout.add("u1", 3, 1.0, [1, 2], [0.5, 0.25])
    memory.add("u1", 100, [1, 2])
    waiting.add(Waiting(7, 99, 1.0, "samples", 0, 5, b"{}", (1, 2)))
    path = save_checkpoint(tmp_path, payload(
        Settings(), version=1, model=model, opt=torch.optim.Adam(model.parameters()), offsets={("samples", 0): 6},
        counts={"real": 1}, seen={5}, holdout=holdout, memory=memory, waiting=waiting), keep=1)
    with zipfile.ZipFile(path) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(pickled))
    names = {str(arg) for op, arg, _ in ops if op.name == "GLOBAL"}  # torch writes protocol 2: GLOBAL ops
    assert names and {n.split(" ")[0] for n in names} <= {"torch", "torch._utils", "collections"}
    assert not any(op.name == "STACK_GLOBAL" for op, _, _ in ops)
    assert read_checkpoint(path)["vector_wait"] == waiting.state()
