"""gpl eval's vector routes: SID without manual steps (tokenizer trained and cached), content anchors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpl.eval.anchor_sources import content_anchors, pick_users, sid_anchors, training_histories
from gpl.eval.dataset import EvalDataset, load_dataset
from gpl.eval.movielens import build_movielens
from runtime.encoder import HashEncoder
from runtime.settings import Settings, load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> EvalDataset:
    out = tmp_path_factory.mktemp("ds") / "ml-tiny"
    return load_dataset(build_movielens(out, users=8, max_requests_per_user=6, candidates=40))


def _settings(tmp_path: Path) -> Settings:
    return load(env={}, data_dir=str(tmp_path), encoder={"model": "hash-bow-64"}, anchors={"k": 3})


def test_sid_anchors_train_the_tokenizer_when_missing_and_cache_it(tiny: EvalDataset, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    settings = _settings(tmp_path)
    vecs = HashEncoder().encode(tiny.item_text)
    hist = training_histories(tiny, settings.anchors.history_items)
    users = pick_users(tiny, hist, None)
    kw: dict[str, Any] = {"k": 3, "cache_dir": tmp_path / "cache", "item_vectors": vecs, "epochs": 1,
                          "tokenizer_epochs": 1, "progress": False}
    first = sid_anchors(settings, tiny, hist, users, **kw)
    tok = first.info["tokenizer"]
    assert tok["cached"] is False and tok["source"].startswith(str(tmp_path / "cache" / "sid-tokenizer-"))
    assert first.users and all(len(a.texts) <= 3 and a.texts[0].startswith("sid:") for a in first.users.values())
    again = sid_anchors(settings, tiny, hist, users, **kw)
    assert again.info["tokenizer"]["cached"] is True and "cached" in again.info["generator"]
    assert {u: a.texts for u, a in again.users.items()} == {u: a.texts for u, a in first.users.items()}


def test_content_anchors_for_eval(tiny: EvalDataset) -> None:
    vecs = HashEncoder().encode(tiny.item_text)
    hist = training_histories(tiny, 8)
    users = pick_users(tiny, hist, None)
    book = content_anchors(tiny, hist, users, vecs, k=3)
    assert book.kind == "content" and len(book) == len(users)
    for u, a in book.users.items():
        assert 1 <= len(a.texts) <= min(3, -(-len(hist[u]) // 2))
        np.testing.assert_allclose(np.exp(a.logprobs).sum(), 1.0, atol=1e-5)  # cluster shares


def test_bench_anchors_cli_registration() -> None:
    from gpl.cli import build_parser

    args = build_parser().parse_args(["bench", "anchors", "--backends", "sid,content", "--repeats", "2"])
    assert args.backends == "sid,content" and args.repeats == 2 and callable(args.run)
