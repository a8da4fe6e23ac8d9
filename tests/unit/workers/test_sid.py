"""Semantic-ID anchors on small synthetic data: tokenizer, generator, beam search, artifacts, evaluation.

Synthetic catalogue: 12 well-separated clusters of unit vectors, each with 4 sub-clusters, so a
3-level residual quantiser has structure to find. Synthetic users walk inside one or two clusters, so
a sequence model has something to learn. Everything is seeded and small (the module runs in seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.anchors.sid.beam import SIDTrie, beam_search
from workers.anchors.sid.evaluate import evaluate_sid
from workers.anchors.sid.generator import BOS, SIDAnchorGenerator
from workers.anchors.sid.rqvae import RQVAEConfig, train_rqvae
from workers.anchors.sid.sequence_model import (
    GeneratorConfig,
    SIDTransformer,
    keep_probability,
    load_generator,
    save_generator,
    train_generator,
)
from workers.anchors.sid.split import leave_last_out
from workers.anchors.sid.tokenizer import SIDTokenizer, build_tokenizer, code_usage, collision_stats, disambiguate

DIM = 32
N_ITEMS = 384
CFG = RQVAEConfig(in_dim=DIM, hidden=(64,), latent_dim=12, levels=3, codebook_size=16, kmeans_iters=10,
                  dead_check_every=10, seed=0)


def _catalogue(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, DIM)) * 3
    subs = rng.normal(size=(12, 4, DIM))
    cluster = np.arange(N_ITEMS) % 12
    sub = (np.arange(N_ITEMS) // 12) % 4
    x = centres[cluster] + subs[cluster, sub] + 0.3 * rng.normal(size=(N_ITEMS, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(N_ITEMS, dtype=np.int64) * 7 + 100  # sparse, non-dense ids as at the edge
    return ids, x.astype(np.float32), cluster


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _catalogue()


@pytest.fixture(scope="module")
def tokenizer(catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> SIDTokenizer:
    torch.set_num_threads(1)
    ids, x, _ = catalogue
    model, hist = train_rqvae(x, CFG, epochs=60, batch_size=128, lr=3e-3)
    return build_tokenizer(model, ids, x, "test-encoder", {"train": hist})


def _users(catalogue: tuple[np.ndarray, np.ndarray, np.ndarray], n: int = 80, length: int = 14
           ) -> dict[int, list[int]]:
    """Users who like one cluster and walk through its items in a fixed order (learnable next item)."""
    ids, _, cluster = catalogue
    rng = np.random.default_rng(1)
    users = {}
    for u in range(n):
        c = int(rng.integers(12))
        members = ids[cluster == c]
        start = int(rng.integers(len(members)))
        users[u] = [int(members[(start + j) % len(members)]) for j in range(length)]
    return users


@pytest.fixture(scope="module")
def generator(tokenizer: SIDTokenizer, catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]
              ) -> SIDAnchorGenerator:
    split = leave_last_out(_users(catalogue))
    cfg = GeneratorConfig(level_sizes=tokenizer.level_sizes, d_model=32, layers=1, heads=2, ff=64,
                          context_items=8)
    model, _ = train_generator(tokenizer, list(split.train.values()), config=cfg, epochs=4, batch_size=32,
                               lr=5e-3, subsample_t=0.0)
    return SIDAnchorGenerator(tokenizer, model, beam_width=8)


# ------------------------------------------------------------------------------------------ tokenizer


def test_rqvae_beats_random_codes(tokenizer: SIDTokenizer) -> None:
    m = tokenizer.metrics
    assert m["recon_cos"] > m["recon_cos_random"] + 0.2, m
    assert m["recon_cos"] > 0.6, m


def test_codebook_usage_floor(tokenizer: SIDTokenizer) -> None:
    usage = tokenizer.metrics["usage"]
    assert len(usage) == 3
    for level in usage:  # 384 items over 16 codes: a collapsed level would use a handful
        assert level["used"] >= 0.75, usage
        assert level["perplexity"] >= 8, usage


def test_disambiguation_makes_sids_unique(tokenizer: SIDTokenizer) -> None:
    assert len(np.unique(tokenizer.sids, axis=0)) == len(tokenizer.sids)
    assert tokenizer.sids.shape[1] == 4
    assert tokenizer.suffix_size == int(tokenizer.sids[:, 3].max()) + 1


def test_disambiguate_orders_by_item_id() -> None:
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 2, 3], [0, 0, 1]])
    ids = np.array([50, 10, 20, 40, 30])
    sids, size = disambiguate(codes, ids)
    assert size == 3
    assert sids[:, 3].tolist() == [2, 0, 0, 1, 0]  # ids 20 < 40 < 50 share (1,2,3)
    assert collision_stats(codes) == {"collision_rate": 0.6, "unique_codes": 3.0, "max_group": 3.0}
    assert code_usage(np.array([[0], [0], [1], [1]]), 4)[0] == pytest.approx({"used": 0.5, "perplexity": 2.0})


def test_tokenizer_round_trip(tokenizer: SIDTokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path)
    back = SIDTokenizer.load(tmp_path, "test-encoder")
    assert back.fingerprint == tokenizer.fingerprint
    np.testing.assert_array_equal(back.sids, tokenizer.sids)
    codes = torch.from_numpy(tokenizer.sids[:20])
    np.testing.assert_allclose(back.model.decode_codes(codes).numpy(),
                               tokenizer.model.decode_codes(codes).numpy(), atol=1e-6)
    assert back.metrics["recon_cos"] == tokenizer.metrics["recon_cos"]
    with pytest.raises(ValueError, match="encoder"):
        SIDTokenizer.load(tmp_path, "another-encoder")


# ------------------------------------------------------------------------------------------ generator


def test_keep_probability_downsamples_only_frequent_items() -> None:
    counts = np.array([1000, 10, 10, 0] + [10] * 96)
    p = keep_probability(counts, 1e-2)
    f = 1000 / counts.sum()
    assert p[0] == pytest.approx(np.sqrt(1e-2 / f) + 1e-2 / f)
    assert p[0] < 1 and (p[1:] == 1).all()
    assert (keep_probability(counts, 0.0) == 1).all()


def test_beam_search_valid_distinct_descending(generator: SIDAnchorGenerator,
                                               catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids = catalogue[0]
    trie = SIDTrie(generator.tokenizer.sids)
    full = {tuple(r) for r in generator.tokenizer.sids.tolist()}
    for history in ([int(i) for i in ids[:5]], [int(ids[40])], []):
        ctx = generator.context(history)
        for depth in (3, 4):
            out = beam_search(generator.net, trie, ctx, 6, beam_width=8, depth=depth)
            assert len(out) == 6
            sids = [s for s, _ in out]
            assert len(set(sids)) == 6
            lps = [lp for _, lp in out]
            assert lps == sorted(lps, reverse=True) and lps[0] <= 0
            for s in sids:
                assert trie.is_valid(s)
                assert any(f[:depth] == s for f in full)
    assert not trie.is_valid((999,))


def test_beam_search_returns_fewer_when_few_sids_exist() -> None:
    sids = np.array([[0, 1, 2, 0], [0, 1, 2, 1], [3, 0, 0, 0]])
    cfg = GeneratorConfig(level_sizes=(4, 4, 4, 2), d_model=16, layers=1, heads=2, ff=32, context_items=4)
    torch.manual_seed(0)
    net = SIDTransformer(cfg).eval()
    out = beam_search(net, SIDTrie(sids), [BOS], 5, beam_width=5, depth=4)
    assert sorted(s for s, _ in out) == sorted(tuple(r) for r in sids.tolist())
    probs = np.exp([lp for _, lp in out])
    assert probs.sum() == pytest.approx(1.0)  # renormalised over valid codes: a full distribution


def test_anchor_generator_outputs(generator: SIDAnchorGenerator,
                                  catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids = catalogue[0]
    anchors = generator.generate_anchors([int(i) for i in ids[:6]], 4)
    assert len(anchors) == 4
    for vec, lp, sid in anchors:
        assert vec.shape == (DIM,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-4
        assert lp <= 0 and sid.startswith("sid:") and len(sid.split("-")) == 3
    assert [a.text for a in generator.anchors([int(i) for i in ids[:6]], 4)] == [s for _, _, s in anchors]
    assert generator.generate_anchors([123456789], 2)  # unknown history: unconditional beams, no crash


def test_generator_round_trip(generator: SIDAnchorGenerator, tmp_path: Path,
                              catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    generator.tokenizer.save(tmp_path)
    save_generator(generator.net, generator.tokenizer, tmp_path, {"note": "test"})
    back = SIDAnchorGenerator.load(tmp_path, "test-encoder", beam_width=8)
    history = [int(i) for i in catalogue[0][10:16]]
    a, b = generator.generate_anchors(history, 3), back.generate_anchors(history, 3)
    assert [s for _, _, s in a] == [s for _, _, s in b]
    np.testing.assert_allclose([lp for _, lp, _ in a], [lp for _, lp, _ in b], atol=1e-5)
    assert back.prompt_hash == generator.prompt_hash
    other = build_tokenizer(generator.tokenizer.model, catalogue[0][:-1], catalogue[1][:-1], "test-encoder")
    with pytest.raises(ValueError, match="tokenizer"):
        load_generator(tmp_path, other)


def test_generator_learns_and_evaluates(generator: SIDAnchorGenerator,
                                        catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, x, _ = catalogue
    split = leave_last_out(_users(catalogue))
    res = evaluate_sid(generator, ids, x, split.test, ks=(2, 4), topn=10)
    assert res["users"] == len(split.test) and res["skipped"] == 0
    for k in (2, 4):
        row = res[f"k{k}"]
        assert set(row) >= {"hr_sid_centroid", "hr_sid_decoded", "hr_recent", "hr_popular", "sid_code_hit"}
        assert all(0.0 <= v <= 1.0 for key, v in row.items() if key.startswith("hr_"))
    # users stay in one cluster: anchors from their history must beat the no-signal floor
    assert res["k4"]["hr_sid_centroid"] > res["k4"]["hr_popular"]
    assert res["k4"]["hr_sid_centroid"] >= res["k2"]["hr_sid_centroid"]


# ------------------------------------------------------------------------------------------- commands


def test_cli_registration() -> None:
    from gpl.commands.sid import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["anchors", "train-tokenizer", "--epochs", "3"])
    assert args.epochs == 3 and callable(args.run)
    args = parser.parse_args(["anchors", "train-generator", "--epochs", "2", "--users", "10"])
    assert args.users == 10 and callable(args.run)
    assert callable(parser.parse_args(["anchors", "evaluate-sid"]).run)


def test_exclude_history_bans_fully_consumed_codes(generator: SIDAnchorGenerator,
                                                   catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids = catalogue[0]
    tok = generator.tokenizer
    free = SIDAnchorGenerator(tok, generator.net, beam_width=8, exclude_history=False)
    history = [int(i) for i in ids[:6]]
    first = free.generate_sids(history, 6)
    # put every item of the free run's semantic codes into the history: none may come back
    taken = {s for s, _ in first}
    extra = [int(i) for i, row in zip(tok.item_ids.tolist(), tok.sids.tolist(), strict=True)
             if tuple(row[:3]) in taken]
    again = generator.generate_sids(history + extra, 6)
    assert not taken & {s for s, _ in again}
    assert generator.banned(history + extra) >= taken
    assert free.banned(history + extra) == set()


def test_commands_end_to_end_on_movielens(tmp_path: Path) -> None:
    """The command path on the real MovieLens catalogue with the hashing encoder (fast, no model files)."""
    from gpl.commands.sid import evaluate_dir, sid_dir, train_generator, train_tokenizer
    from runtime.settings import EncoderSettings, Settings

    settings = Settings(data_dir=tmp_path, encoder=EncoderSettings(model="hash-bow-64"))
    tok = train_tokenizer(settings, epochs=2, progress=False)
    out = sid_dir(settings)
    assert out == tmp_path / "sid" / "hash-bow-64"
    assert (out / "tokenizer.pt").exists() and (out / "item_vectors.npy").exists()
    assert tok["items"] == 9742 and tok["vectors"] == "movielens-embedded"
    gen = train_generator(settings, epochs=1, users=12, ks=(2,), progress=False)
    assert gen["eval"]["users"] == gen["test_users"] > 0
    again = evaluate_dir(settings, ks=(2,), users=12, progress=False)
    assert again["k2"] == gen["eval"]["k2"]  # artifacts reload to the same anchors
