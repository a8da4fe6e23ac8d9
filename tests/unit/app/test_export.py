"""``gpl export``: ONNX Runtime agrees with torch, safetensors reloads, the feature spec is enough to serve."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gpl.cli import main
from gpl.commands.export import load_safetensors
from tests.preranker_world import DIM, feed, put_anchors, requests, world_index, world_settings
from workers.trainer import Trainer
from workers.trainer.checkpoints import load_checkpoint

ROWS = 1000


@pytest.fixture(params=[(0, False), (8, False), (0, True)], ids=["ids-content", "with-history", "with-anchors"])
def trained(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(data dir, checkpoint) of a pre-ranker trained on the small world, also published; with and without
    the history input, and with the anchor cross feature (half the users have anchors in the index)."""
    history, anchors = request.param
    s = world_settings(tmp_path, history_items=history, anchor_cross=anchors)
    index = world_index(s)
    if anchors:
        put_anchors(s, index, [f"u{k}" for k in range(0, 40, 2)])
    t = Trainer(s, index, dim=DIM, progress=False)
    ckpt = feed(t, requests(0, 120))
    assert ckpt is not None and t.publisher.area.current() is not None
    return s.data_dir, ckpt


def bucket_from_spec(raw_id: str | int, spec: dict[str, Any]) -> int:
    """A serving team's hashing, written from the spec's fields only."""
    assert spec["hash"] == "blake2b" and spec["digest_to_int"] == "big-endian unsigned"
    if spec["id_encoding"] == "utf-8":
        body = str(raw_id).encode("utf-8")
    else:
        assert spec["id_encoding"] == "uint64 big-endian (8 bytes)"
        body = int(raw_id).to_bytes(8, "big")
    digest = hashlib.blake2b(spec["prefix"].encode("ascii") + body, digest_size=spec["digest_size"]).digest()
    return int.from_bytes(digest, "big") % spec["modulo"]


def raw_rows(n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    users = [f"user-{k}" for k in rng.integers(0, 5000, n)]
    items = rng.integers(0, 2**40, n, dtype=np.int64)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return users, items, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def history_from_spec(n: int, spec: dict[str, Any]) -> np.ndarray:
    """A serving team's history input, built as the spec says: the unit mean of the vectors of the user's
    last ``history_items`` distinct clicks (here drawn at random), zeros for a user without clicks."""
    assert spec["dtype"] == "float32" and spec["shape"] == ["n", DIM] and "distinct clicked items" in spec["source"]
    rng = np.random.default_rng(11)
    out = np.zeros((n, DIM), np.float32)
    for r in range(n):
        k = int(rng.integers(0, spec["history_items"] + 1))  # 0: a user without clicks
        if k:
            clicked = rng.normal(size=(k, DIM)).astype(np.float32)
            clicked /= np.linalg.norm(clicked, axis=1, keepdims=True)
            m = clicked.mean(axis=0)
            out[r] = m / np.linalg.norm(m)
    return out


def anchor_cross_from_spec(vectors: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """A serving team's anchor cross feature, built as the spec says from a user's anchor vectors (here
    2-4 random unit anchors per row): max cosine and mean of the two largest; zeros for a user without."""
    assert spec["dtype"] == "float32" and spec["shape"] == ["n", 2] and spec["columns"] == ["best", "top2_mean"]
    assert "anchors collection" in spec["source"] and "anchor_point_id" in spec["source"]
    rng = np.random.default_rng(13)
    out = np.zeros((len(vectors), 2), np.float32)
    for r, v in enumerate(vectors):
        k = int(rng.integers(0, 5))  # 0: a user without anchors
        if k:
            a = rng.normal(size=(k, DIM)).astype(np.float32)
            cos = sorted((a / np.linalg.norm(a, axis=1, keepdims=True)) @ v, reverse=True)
            out[r] = (cos[0], (cos[0] + cos[min(1, k - 1)]) / 2)
    return out


def export(data_dir: Path, source: Path, fmt: str, out: Path) -> dict[str, Any]:
    assert main(["--data-dir", str(data_dir), "export", str(source), "--format", fmt, "--out", str(out)]) == 0
    spec: dict[str, Any] = json.loads((out / "feature_spec.json").read_text())
    return spec


def test_onnx_matches_torch_on_1000_rows_built_from_the_spec(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, ckpt = trained
    spec = export(data_dir, ckpt, "onnx", tmp_path / "onnx")
    onnx.checker.check_model(str(tmp_path / "onnx" / "model.onnx"))

    users, items, vectors = raw_rows(ROWS)
    inputs = spec["inputs"]
    feed_ = {
        "user_bucket": np.array([bucket_from_spec(u, inputs["user_bucket"]) for u in users], np.int64),
        "item_bucket": np.array([bucket_from_spec(int(i), inputs["item_bucket"]) for i in items], np.int64),
        "content": vectors,
    }
    model, _ = load_checkpoint(ckpt)
    history = None
    if model.cfg.history_items:  # the history input is in the spec and in the graph, built from the spec
        history = feed_["history"] = history_from_spec(ROWS, inputs["history"])
    else:
        assert "history" not in inputs
    anchor = None
    if model.cfg.anchor_cross:  # the anchor cross feature is in the spec and in the graph, built from the spec
        anchor = feed_["anchor_cross"] = anchor_cross_from_spec(vectors, inputs["anchor_cross"])
    else:
        assert "anchor_cross" not in inputs
    session = ort.InferenceSession(str(tmp_path / "onnx" / spec["files"]["weights"]),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs) and [i.type for i in session.get_inputs()] == [
        "tensor(int64)", "tensor(int64)", "tensor(float)", *(["tensor(float)"] if history is not None else []),
        *(["tensor(float)"] if anchor is not None else [])]
    logit, prob = session.run(["logit", "probability"], feed_)

    want_prob = model.score(users, items, vectors, history, anchor)  # the repository's own hashing and forward pass
    with torch.no_grad():
        want_logit = model.logits(users, items, vectors, history, anchor).numpy()
    diff = float(max(np.abs(prob - want_prob).max(), np.abs(logit - want_logit).max()))
    print(f"ONNX Runtime vs torch, {ROWS} rows: max abs diff {diff:.3g}")
    assert diff < 1e-5
    assert spec["parity"]["rows"] == ROWS and spec["parity"]["max_abs_diff"] < 1e-5
    assert np.std(want_prob) > 0.05  # a trained model, not a constant: the comparison means something


def test_safetensors_round_trip_and_lineage(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, ckpt = trained
    spec = export(data_dir, ckpt, "safetensors", tmp_path / "st")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["feature_spec.json", "model.safetensors"]
    model, meta = load_checkpoint(ckpt)
    reloaded = load_safetensors(tmp_path / "st")
    assert reloaded.cfg == model.cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    users, items, vectors = raw_rows(200)
    hist = vectors[::-1].copy() if model.cfg.history_items else None
    anc = vectors[:, :2].copy() if model.cfg.anchor_cross else None
    assert np.array_equal(reloaded.score(users, items, vectors, hist, anc),
                          model.score(users, items, vectors, hist, anc))
    assert spec["tensors"] == {k: list(v.shape) for k, v in model.state_dict().items()}
    # weights only: a fraction of the checkpoint, which also holds optimizer moments, seen-set and holdout
    assert (tmp_path / "st" / "model.safetensors").stat().st_size < ckpt.stat().st_size / 2

    lineage = spec["lineage"]
    assert lineage["version"] == meta["version"] and lineage["config_hash"] == meta["config_hash"]
    assert lineage["offsets"] == meta["offsets"] and lineage["counts"] == meta["counts"]
    assert lineage["steps"] == meta["counts"]["steps"] > 0 and lineage["seen_count"] == meta["seen_count"]
    assert spec["encoder"]["id"] == meta["encoder"] and spec["encoder"]["collection"] == meta["collection"]
    assert spec["hash_buckets"] == model.cfg.hash_buckets == spec["inputs"]["user_bucket"]["modulo"]
    assert spec["inputs"]["content"]["shape"] == ["n", DIM] and spec["dims"]["content"] == DIM


def test_export_of_the_published_area_takes_its_current_model(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, ckpt = trained
    spec = export(data_dir, data_dir / "checkpoints" / "published", "safetensors", tmp_path / "pub")
    assert spec["lineage"]["checkpoint"].endswith("published/model-000001.pt")
    assert spec["lineage"]["version"] == load_checkpoint(ckpt)[1]["version"]


def test_exported_files_are_readable_alike_and_times_in_ms(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """model.safetensors was written 0600 beside a 0644 spec; lineage.wall_time was in seconds."""
    import time

    from workers.trainer.checkpoints import read_checkpoint

    data_dir, ckpt = trained
    export(data_dir, ckpt, "safetensors", tmp_path / "st")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "st").iterdir()}
    assert modes["model.safetensors"] == modes["feature_spec.json"] == 0o644, modes
    now_ms = time.time() * 1000
    meta = load_checkpoint(ckpt)[1]
    assert isinstance(meta["wall_time"], int) and now_ms - 600_000 < meta["wall_time"] <= now_ms
    spec = json.loads((tmp_path / "st" / "feature_spec.json").read_text())
    assert spec["lineage"]["wall_time"] == meta["wall_time"]
    # a checkpoint written before (epoch seconds) still loads, its time read in ms
    old = read_checkpoint(ckpt) | {"wall_time": 1_700_000_000.5}
    old.pop("path")
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")[1]["wall_time"] == 1_700_000_000_500
