"""A fitted collaborative space in the stream's path: `gpl space fit` writes it, encoder.space names the
collection after it, the indexer stores each fitted item's own vector and places new items by content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpl.cli import main
from gpl.eval.dataset import load_dataset
from gpl.eval.movielens import build_movielens
from runtime.collab_space import CollabSpace
from runtime.encoder import HashEncoder, SpaceEncoder, encode_items, open_encoder
from runtime.settings import load
from runtime.vectors.memory import MemoryIndex
from schemas.events import ItemEvent
from workers.indexer import Indexer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("space")
    ds_dir = build_movielens(tmp / "ml", users=40, max_requests_per_user=12, candidates=60)
    rc = main(["--data-dir", str(tmp / "data"), "--set", "encoder.model=hash-bow-64", "space", "fit", str(ds_dir),
               "--dim", "8"])
    assert rc == 0
    (path,) = (tmp / "data" / "spaces").glob("collab-svd8-*.npz")
    return ds_dir, path


def test_the_command_writes_a_named_versioned_space_the_settings_point_at(fitted: tuple[Path, Path],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _, path = fitted
    space = CollabSpace.load(path)
    assert path.stem == space.name and space.content_id == "hash-bow-64"
    s = load(env={"GPL_ENCODER__SPACE": str(path)}, encoder={"model": "hash-bow-64"})
    assert s.encoder.collection == f"items__hash-bow-64__{space.name}"
    enc = open_encoder(s.encoder)
    assert isinstance(enc, SpaceEncoder) and enc.dim == 8 and enc.id == f"hash-bow-64__{space.name}"


def test_indexed_items_get_their_fitted_vectors_and_new_items_their_placement(fitted: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    ds_dir, path = fitted
    ds = load_dataset(ds_dir)
    s = load(env={}, data_dir=str(tmp_path), encoder={"model": "hash-bow-64", "space": str(path)})
    enc = open_encoder(s.encoder)
    space = CollabSpace.load(path)
    clicked = int(np.argmax(np.bincount(ds.item[ds.exposed & (ds.label == 1)], minlength=ds.n_items)))
    known_id, text = int(ds.item_ids[clicked]), ds.item_text[clicked]
    new = ItemEvent(item_id=10**12, text="a film nobody has clicked yet", category="Drama", ts=1)
    index = MemoryIndex()
    idx = Indexer(s, index, enc)
    idx.index_items([ItemEvent(item_id=known_id, text=text, category="x", ts=1), new])
    got = index.retrieve(s.encoder.collection, np.asarray([known_id, new.item_id]))
    by_id = dict(zip(got.ids.tolist(), got.vectors, strict=True))
    at = int(np.flatnonzero(space.item_ids == known_id)[0])
    assert np.allclose(by_id[known_id], space.vectors[at], atol=1e-6)  # its clicks placed it, not its text
    placed = space.place(HashEncoder(64).encode([new.text]))[0]
    assert np.allclose(by_id[new.item_id], placed, atol=1e-6)
    # anchors (texts) go through the same adapter, so they land in the items' space
    assert np.allclose(enc.encode([new.text])[0], placed, atol=1e-6)
    assert np.allclose(encode_items(HashEncoder(64), np.asarray([1]), ["x"]), HashEncoder(64).encode(["x"]))


def test_a_space_under_another_encoder_or_renamed_is_refused(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = fitted
    with pytest.raises(ValueError, match="refit the space"):
        open_encoder(load(env={}, encoder={"model": "hash-other", "space": str(path)}).encoder)
    renamed = tmp_path / "mine.npz"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="keep the name"):
        open_encoder(load(env={}, encoder={"model": "hash-bow-64", "space": str(renamed)}).encoder)
    with pytest.raises(FileNotFoundError, match="gpl space fit"):
        open_encoder(load(env={}, encoder={"model": "hash-bow-64", "space": str(tmp_path / "none.npz")}).encoder)
