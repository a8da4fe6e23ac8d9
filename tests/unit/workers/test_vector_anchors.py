"""Vector anchor backends: content clustering, the SID source and its refusals, the worker with either.

Everything in memory (MemoryIndex, HashEncoder) with untrained or tiny models: what is tested is the
seam and the arithmetic, not anchor quality (tests/unit/workers/test_sid.py trains the SID models).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpl.backends import make_generator
from runtime.encoder import HashEncoder
from runtime.settings import Settings, load
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.events import AnchorRequest, ItemEvent
from tests.helpers import item_index
from workers.anchors import AnchorWorker
from workers.anchors.policy import anchor_point_id
from workers.anchors.sid.beam import SIDTrie, beam_search, beam_search_many
from workers.anchors.sid.decode import extend, prefill, reorder
from workers.anchors.sid.generator import SIDAnchorGenerator
from workers.anchors.sid.rqvae import RQVAE, RQVAEConfig
from workers.anchors.sid.sequence_model import BOS, GeneratorConfig, SIDTransformer, save_generator
from workers.anchors.sid.source import SIDAnchorSource, SIDArtifactError, load_sid_generator
from workers.anchors.sid.tokenizer import SIDTokenizer, build_tokenizer
from workers.anchors.vector_anchors import ContentAnchorSource, VectorAnchorSource, cluster_count, spherical_kmeans

TOPICS = ["running shoes trail", "fantasy dragons novel", "cast iron cooking", "jazz vinyl records"]
ITEMS = [ItemEvent(item_id=100 + i, text=f"{TOPICS[i % 4]} item {i}") for i in range(40)]


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.asarray(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _req(user: str, history: list[int]) -> AnchorRequest:
    return AnchorRequest(user_id=user, reason="new_positives", ts=1000, history=history)


# -------------------------------------------------------------------------------------------- content


def test_cluster_count_rule() -> None:
    assert [cluster_count(n, 4) for n in range(0, 11)] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert cluster_count(8, 2) == 2


def test_spherical_kmeans_is_deterministic_and_finds_the_groups() -> None:
    rng = np.random.default_rng(0)
    axes = np.eye(8)[:3] * 5
    x = _unit((axes[[0, 0, 1, 1, 2, 2, 0, 1]] + rng.normal(size=(8, 8)) * 0.1).tolist())
    c1, a1 = spherical_kmeans(x, 3)
    c2, a2 = spherical_kmeans(x.copy(), 3)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(c1, c2)
    assert len({tuple(a1[[0, 1, 6]]), tuple(a1[[2, 3, 7]]), tuple(a1[[4, 5]])}) == 3  # one group each
    assert a1[0] == a1[1] == a1[6] and a1[2] == a1[3] == a1[7] and a1[4] == a1[5]
    assert a1[7] == 0  # the first centre is the most recent row's
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)


def test_content_anchors_order_shares_and_labels() -> None:
    src = ContentAnchorSource()
    x = _unit([[1, 0, 0], [0.9, 0.1, 0], [1, 0.05, 0], [0, 1, 0], [0, 0.95, 0.1], [0, 0, 1]])
    (a,) = src.anchor_vectors([[1, 2, 3, 4, 5, 6]], [x], 4)
    assert len(a) == 3  # min(K=4, ceil(6/2))
    assert a.labels == ["cluster 1 of 3 (3 items)", "cluster 2 of 3 (2 items)", "cluster 3 of 3 (1 item)"]
    np.testing.assert_allclose(np.exp(a.logprobs), [3 / 6, 2 / 6, 1 / 6], atol=1e-9)
    np.testing.assert_allclose(a.vectors[0], x[:3].sum(0) / np.linalg.norm(x[:3].sum(0)), atol=1e-6)
    assert isinstance(src, VectorAnchorSource)


def test_content_anchors_degenerate_histories() -> None:
    src = ContentAnchorSource()
    one, dup, empty, zero = src.anchor_vectors(
        [[1], [1, 2, 3, 4], [], [5, 6]],
        [_unit([[0, 1, 0]]), _unit([[1, 1, 0]] * 4), np.zeros((0, 3), np.float32), np.zeros((2, 3), np.float32)],
        4)
    assert len(one) == 1 and one.logprobs == [0.0] and one.labels == ["cluster 1 of 1 (1 item)"]
    assert len(dup) == 1 and dup.labels == ["cluster 1 of 1 (4 items)"]  # identical vectors: one direction
    assert len(empty) == 0 and empty.detail and empty.vectors.shape == (0, 3)
    assert len(zero) == 0 and "zero" in zero.detail
    assert src.model.startswith("content-kmeans-") and src.prompt_hash == ContentAnchorSource().prompt_hash


def test_worker_with_content_backend_publishes_normal_sets(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path), anchors={"backend": "content", "k": 3, "history_items": 4})
    enc = HashEncoder()
    index = item_index(ITEMS, s.encoder.collection, enc)
    src = make_generator(s)
    w = AnchorWorker(s, index, enc, src)
    assert w.cache is None  # deterministic: no replay cache
    sets, skipped = w._generate([_req("runner", [100, 101, 104, 999]), _req("ghost", [998])])
    assert skipped["ghost"][0] == "unknown_items"
    (runner,) = sets
    assert runner.history == [100, 101, 104]  # unknown ids dropped, most recent last
    assert runner.model == src.model and runner.encoder == enc.id
    assert [a.text for a in runner.anchors] == ["cluster 1 of 2 (2 items)", "cluster 2 of 2 (1 item)"]
    v = index.retrieve(s.encoder.collection, runner.history).vectors  # items 100 and 104 share a topic
    expect = v[0] + v[2]
    np.testing.assert_allclose(runner.anchors[0].vector, expect / np.linalg.norm(expect), atol=1e-5)
    np.testing.assert_allclose(runner.anchors[1].vector, v[1], atol=1e-5)
    assert runner.anchors[0].logprob == pytest.approx(np.log(2 / 3))
    pts = index.retrieve(s.qdrant.anchors_collection, [anchor_point_id("runner", i) for i in range(3)],
                         with_payload=True)
    assert [p["slot"] for p in pts.payloads] == [0, 1]
    assert pts.payloads[0]["model"] == src.model and pts.payloads[0]["prompt_hash"] == src.prompt_hash
    np.testing.assert_allclose(pts.vectors[1], runner.anchors[1].vector, atol=1e-6)


# ------------------------------------------------------------------------------------------------ SID


def _tokenizer(encoder: HashEncoder, items: list[ItemEvent] = ITEMS) -> SIDTokenizer:
    """An untrained RQ-VAE with k-means codebooks: structure enough for SIDs, in milliseconds."""
    torch.manual_seed(0)
    x = encoder.encode([it.text for it in items])
    model = RQVAE(RQVAEConfig(in_dim=encoder.dim, hidden=(32,), latent_dim=8, levels=3, codebook_size=4,
                              kmeans_iters=5)).eval()
    model.init_codebooks(torch.from_numpy(x), torch.Generator().manual_seed(0))
    return build_tokenizer(model, np.asarray([it.item_id for it in items]), x, encoder.id)


def _artifacts(directory: Path, tok: SIDTokenizer) -> SIDTransformer:
    torch.manual_seed(0)
    net = SIDTransformer(GeneratorConfig(level_sizes=tok.level_sizes, d_model=16, layers=2, heads=2, ff=32,
                                         context_items=6)).eval()
    tok.save(directory)
    save_generator(net, tok, directory)
    return net


def _sid_settings(tmp_path: Path, sid: Path, **anchors: object) -> Settings:
    return load(env={}, data_dir=str(tmp_path),
                anchors={"backend": "sid", "k": 3, "sid_dir": str(sid), "beam_width": 4, **anchors},
                encoder={"model": "hash-bow-64"})


def test_worker_with_sid_backend(tmp_path: Path) -> None:
    enc = HashEncoder()
    tok = _tokenizer(enc)
    _artifacts(tmp_path / "sid", tok)
    s = _sid_settings(tmp_path, tmp_path / "sid")
    index = item_index(ITEMS, s.encoder.collection, enc)
    src = make_generator(s, index=index, encoder_dim=enc.dim)
    assert isinstance(src, SIDAnchorSource)
    w = AnchorWorker(s, index, enc, src)
    index.upsert(s.encoder.collection, Points(np.asarray([5000], np.int64), enc.encode(["new film"]),
                                              [{"text": "new film"}]))  # indexed after the tokenizer
    sets, skipped = w._generate([_req("a", [100, 101, 102]), _req("b", [5000])])
    assert skipped["b"][0] == "unknown_items" and "SID" in skipped["b"][1]
    (a,) = sets
    assert a.model == src.model and 1 <= len(a.anchors) <= 3
    for anchor in a.anchors:
        assert anchor.text.startswith("sid:") and anchor.logprob <= 0
        sid = tuple(int(c) for c in anchor.text[4:].split("-"))
        np.testing.assert_allclose(anchor.vector, tok.vector_of_prefix(sid, "centroid"), atol=1e-5)
    assert index.count(s.qdrant.anchors_collection) == len(a.anchors)


def test_sid_artifacts_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    enc = HashEncoder()
    with pytest.raises(SIDArtifactError, match=r"tokenizer\.pt is missing.*train-tokenizer"):
        make_generator(_sid_settings(tmp_path, tmp_path / "none"))
    tok = _tokenizer(enc)
    _artifacts(tmp_path / "sid", tok)
    with pytest.raises(SIDArtifactError, match="another-encoder"):
        load_sid_generator(tmp_path / "sid", "another-encoder")
    with pytest.raises(SIDArtifactError, match="384-d"):
        load_sid_generator(tmp_path / "sid", enc.id, 384)
    other = [ItemEvent(item_id=9000 + i, text=it.text) for i, it in enumerate(ITEMS)]
    s = _sid_settings(tmp_path, tmp_path / "sid")
    with pytest.raises(SIDArtifactError, match="another catalogue"):
        make_generator(s, index=item_index(other, s.encoder.collection, enc))
    make_generator(s, index=MemoryIndex())  # nothing indexed yet: nothing to contradict
    retrained = _tokenizer(enc, ITEMS[:-1])  # generator.pt stays the old tokenizer's
    retrained.save(tmp_path / "sid")
    with pytest.raises(SIDArtifactError, match="generator.*tokenizer"):
        load_sid_generator(tmp_path / "sid", enc.id)
    (tmp_path / "sid" / "tokenizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(SIDArtifactError, match="unreadable"):
        load_sid_generator(tmp_path / "sid", enc.id)


def test_incremental_decoding_matches_the_full_forward() -> None:
    torch.manual_seed(1)
    cfg = GeneratorConfig(level_sizes=(5, 4, 3), d_model=16, layers=2, heads=4, ff=32, context_items=4)
    net = SIDTransformer(cfg).eval()
    ctxs = [[BOS], [BOS, 2, 7, 11], [BOS, 3, 8, 12, 6, 9, 13]]
    codes = torch.tensor([[[1, 2], [4, 0]], [[0, 3], [2, 1]], [[3, 3], [1, 1]]])  # (U, W, 2)
    cache, first = prefill(net, ctxs)
    _, past = extend(net, cache, codes[..., 0], None)
    swap = torch.tensor([[1, 0]] * 3)  # beams reordered between steps, as the search does
    second, _ = extend(net, cache, codes[..., 1][:, [1, 0]], reorder(past, swap))
    for u, ctx in enumerate(ctxs):
        full = net.last_logits(torch.tensor([ctx]), torch.tensor([len(ctx)]))[0]
        torch.testing.assert_close(first[u], full[2:7], atol=1e-5, rtol=1e-4)
        for w in range(2):
            src = int(swap[u, w])
            seq = [*ctx, cfg.offsets[0] + int(codes[u, src, 0]), cfg.offsets[1] + int(codes[u, w ^ 1, 1])]
            full = net.last_logits(torch.tensor([seq]), torch.tensor([len(seq)]))[0]
            torch.testing.assert_close(second[u, w], full[cfg.offsets[2] : cfg.offsets[2] + 3], atol=1e-5,
                                       rtol=1e-4)


def test_batched_beam_search_is_exact_and_batch_independent() -> None:
    """With beams as wide as the trie, the search must return the exact top K of all valid SIDs."""
    sids = np.array([[0, 1, 0], [0, 1, 2], [0, 3, 1], [2, 0, 0], [2, 2, 1], [4, 3, 2], [4, 0, 1]])
    cfg = GeneratorConfig(level_sizes=(5, 4, 3), d_model=16, layers=2, heads=4, ff=32, context_items=4)
    torch.manual_seed(2)
    net = SIDTransformer(cfg).eval()
    trie = SIDTrie(sids)
    ctxs = [[BOS], [BOS, 2, 7, 11], [BOS, 6, 8, 12, 2, 10, 13]]
    banned = [set(), {(0, 1, 2), (4, 3, 2)}, {(2, 0, 0)}]
    many = beam_search_many(net, trie, ctxs, 4, beam_width=8, banned=banned, chunk=2)
    for ctx, ban, got in zip(ctxs, banned, many, strict=True):
        alone = beam_search(net, trie, ctx, 4, beam_width=8, banned=ban)  # padding only changes rounding
        assert [s for s, _ in got] == [s for s, _ in alone]
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in alone], atol=1e-5)
        exact = {}
        for sid in (tuple(r) for r in sids.tolist() if tuple(r) not in ban):
            lp = 0.0
            for d in range(3):
                seq = [*ctx, *(cfg.offsets[j] + sid[j] for j in range(d))]
                with torch.no_grad():
                    logits = net.last_logits(torch.tensor([seq]), torch.tensor([len(seq)]))[0].double()
                prefix = sid[:d]
                ok = [c for c in trie.next_codes(prefix).tolist()
                      if d < 2 or prefix + (c,) not in ban]
                lv = logits[[cfg.offsets[d] + c for c in ok]]
                lp += float(lv[ok.index(sid[d])] - torch.logsumexp(lv, 0))
            exact[sid] = lp
        best = sorted(exact.items(), key=lambda kv: -kv[1])[:4]
        assert [s for s, _ in got] == [s for s, _ in best]
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in best], atol=1e-5)


def test_sid_source_batches_users_like_single_calls(tmp_path: Path) -> None:
    enc = HashEncoder()
    tok = _tokenizer(enc)
    net = _artifacts(tmp_path, tok)
    src = SIDAnchorSource(SIDAnchorGenerator(tok, net, beam_width=4))
    hists = [[100, 101], [102, 103, 104, 105, 106, 107, 108], [999], [110]]
    many = src.anchor_vectors(hists, [np.zeros((len(h), enc.dim), np.float32) for h in hists], 3)
    assert len(many[2]) == 0 and "SID" in many[2].detail
    for h, got in zip(hists, many, strict=True):
        (one,) = src.anchor_vectors([h], [np.zeros((len(h), enc.dim), np.float32)], 3)
        assert one.labels == got.labels
        np.testing.assert_allclose(one.logprobs, got.logprobs, atol=1e-6)
