"""``gpl anchors train-tokenizer | train-generator | evaluate-sid``: semantic-ID anchors from scratch.

Where the item vectors come from: the item collection of the frozen encoder in the vector index (what
the indexer wrote), so SIDs live in exactly the space the labeler matches in. When that collection is
empty or missing (a fresh checkout, no stream run yet), the MovieLens catalogue is embedded with the
same frozen encoder, with the simulator's item text (``MovieLens.item_text``, 5 tags: what
``gpl.simulate`` puts in its ItemEvents, hence what the indexer would embed), and cached as ``.npy``
next to the artifacts; the cache is reused only for the same encoder and the same texts.

Artifacts land in ``<data_dir>/sid/<encoder id>/`` (``tokenizer.pt``, ``generator.pt`` and their JSON
summaries): a new encoder gets new SIDs, never a mix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpl.backends import open_index, sid_artifacts, sid_dir
from runtime.settings import Settings

log = logging.getLogger(__name__)
__all__ = ["sid_dir", "item_vectors", "train_tokenizer", "train_generator", "evaluate_dir", "register"]


def _from_index(settings: Settings) -> tuple[np.ndarray, np.ndarray] | None:
    """All (ids, vectors) of the encoder's item collection, or None when it is missing or empty."""
    name = settings.encoder.collection
    try:
        with open_index(settings) as index:
            try:
                if index.count(name) == 0:
                    return None
            except KeyError:
                return None
            ids, vecs = [], []
            for pts in index.scroll(name, batch=2048):
                ids.append(pts.ids)
                vecs.append(pts.vectors)
    except Exception as e:  # an unreachable server or a locked engine: say so, then fall back
        log.warning("item vectors: cannot read %s from the index (%s); embedding MovieLens instead", name, e)
        return None
    return np.concatenate(ids).astype(np.int64), np.concatenate(vecs).astype(np.float32)


def movielens_item_vectors(settings: Settings, cache_dir: Path, *, progress: bool = True
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Embed the MovieLens catalogue with the frozen encoder, cached as .npy under ``cache_dir``."""
    from gpl.simulate import load_movielens
    from runtime.encoder import open_encoder

    ml = load_movielens()
    texts = [ml.item_text(i, 5) for i in range(ml.n_items)]
    digest = hashlib.blake2b("\x1e".join(texts).encode(), digest_size=8).hexdigest()
    ids_f, vec_f = cache_dir / "item_ids.npy", cache_dir / "item_vectors.npy"
    meta_f = cache_dir / "items.json"
    if ids_f.exists() and vec_f.exists() and meta_f.exists():
        meta = json.loads(meta_f.read_text())
        if meta.get("encoder") == settings.encoder.model and meta.get("texts") == digest:
            return np.load(ids_f), np.load(vec_f)
    encoder = open_encoder(settings.encoder)
    chunk = 512
    parts = []
    for s in tqdm(range(0, len(texts), chunk), desc="embed items", unit="batch", disable=not progress):
        parts.append(encoder.encode(texts[s : s + chunk]))
    vectors = np.concatenate(parts).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(ids_f, ml.item_ids.astype(np.int64))
    np.save(vec_f, vectors)
    meta_f.write_text(json.dumps({"encoder": settings.encoder.model, "texts": digest, "items": len(texts)}))
    return ml.item_ids.astype(np.int64), vectors


def item_vectors(settings: Settings, cache_dir: Path | None = None, *, progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, str]:
    """(item ids, unit vectors, source): the index's item collection, else embedded MovieLens (cached)."""
    got = _from_index(settings)
    if got is not None:
        return got[0], got[1], "index"
    ids, vecs = movielens_item_vectors(settings, cache_dir or sid_artifacts(settings), progress=progress)
    return ids, vecs, "movielens-embedded"


# ------------------------------------------------------------------------------------------- training


def _bar(total: int, desc: str, enabled: bool) -> tuple[Any, Any]:
    bar = tqdm(total=total, desc=desc, unit="epoch", disable=not enabled)

    def update(epoch: int, stats: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix({k: round(v, 4) for k, v in stats.items() if k != "epoch"})

    return bar, update


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def train_tokenizer(settings: Settings, out_dir: Path | None = None, epochs: int = 150, *,
                    batch_size: int = 1024, lr: float = 3e-3, latent_dim: int = 64, seed: int = 0,
                    threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the RQ-VAE on the catalogue's frozen vectors, assign SIDs, save; returns the metrics."""
    from workers.anchors.sid.rqvae import RQVAEConfig, train_rqvae
    from workers.anchors.sid.tokenizer import build_tokenizer

    _threads(threads)
    out = out_dir or sid_artifacts(settings)
    ids, vecs, source = item_vectors(settings, out, progress=progress)
    cfg = RQVAEConfig(in_dim=vecs.shape[1], latent_dim=latent_dim, hidden=(512, 256), seed=seed)
    t0 = time.perf_counter()
    bar, update = _bar(epochs, "train tokenizer", progress)
    with bar:
        model, hist = train_rqvae(vecs, cfg, epochs=epochs, batch_size=batch_size, lr=lr, progress=update)
    train_s = time.perf_counter() - t0
    tok = build_tokenizer(model, ids, vecs, settings.encoder.model,
                          {"train": hist, "train_seconds": round(train_s, 1), "vectors": source,
                           "epochs": epochs})
    tok.save(out)
    return {**tok.metrics, "fingerprint": tok.fingerprint, "dir": str(out)}


def train_generator(settings: Settings, out_dir: Path | None = None, epochs: int = 8, *,
                    batch_size: int = 64, lr: float = 3e-3, subsample_t: float = 1e-3,
                    users: int | None = None, evaluate: bool = True, ks: tuple[int, ...] = (4, 8),
                    topn: int = 10, seed: int = 0, threads: int | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Train the SID sequence model on MovieLens positives (last positive per user held out), save it,
    and (``evaluate``) measure HR@K×``topn`` against the baselines on the held-out items.

    ``users`` keeps the first N users (smoke runs). Needs ``train_tokenizer`` first (same directory).
    """
    from gpl.simulate import load_movielens
    from gpl.simulate.movielens import positive_sequences
    from workers.anchors.sid.sequence_model import GeneratorConfig, save_generator
    from workers.anchors.sid.sequence_model import train_generator as fit
    from workers.anchors.sid.split import leave_last_out
    from workers.anchors.sid.tokenizer import SIDTokenizer

    _threads(threads)
    out = out_dir or sid_artifacts(settings)
    tok = SIDTokenizer.load(out, settings.encoder.model)
    seqs = positive_sequences(load_movielens())
    if users is not None:
        seqs = {u: seqs[u] for u in sorted(seqs)[:users]}
    split = leave_last_out(seqs)
    cfg = GeneratorConfig(level_sizes=tok.level_sizes, seed=seed)
    t0 = time.perf_counter()
    bar, update = _bar(epochs, "train generator", progress)
    with bar:
        model, hist = fit(tok, list(split.train.values()), config=cfg, epochs=epochs, batch_size=batch_size,
                          lr=lr, subsample_t=subsample_t, progress=update)
    metrics: dict[str, Any] = {"train": hist, "train_seconds": round(time.perf_counter() - t0, 1),
                               "test_users": len(split.test)}
    save_generator(model, tok, out, metrics)
    if evaluate:
        metrics["eval"] = evaluate_dir(settings, out, ks=ks, topn=topn, users=users, progress=progress)
    return {**metrics, "dir": str(out)}


def evaluate_dir(settings: Settings, out_dir: Path | None = None, *, ks: tuple[int, ...] = (4, 8),
                 topn: int = 10, users: int | None = None, beam_width: int = 16, progress: bool = True
                 ) -> dict[str, Any]:
    """Load the artifacts of ``out_dir``, run :func:`workers.anchors.sid.evaluate.evaluate_sid`, write eval.json."""
    from gpl.simulate import load_movielens
    from gpl.simulate.movielens import positive_sequences
    from workers.anchors.sid.evaluate import evaluate_sid
    from workers.anchors.sid.generator import SIDAnchorGenerator
    from workers.anchors.sid.split import leave_last_out

    out = out_dir or sid_artifacts(settings)
    gen = SIDAnchorGenerator.load(out, settings.encoder.model, beam_width=max(beam_width, *ks))
    ids, vecs, _ = item_vectors(settings, out, progress=progress)
    seqs = positive_sequences(load_movielens())
    if users is not None:
        seqs = {u: seqs[u] for u in sorted(seqs)[:users]}
    test = leave_last_out(seqs).test
    with tqdm(total=len(test), desc="evaluate", unit="user", disable=not progress) as bar:
        res = evaluate_sid(gen, ids, vecs, test, ks=ks, topn=topn, progress=bar.update)
    (out / "eval.json").write_text(json.dumps(res, indent=2))
    return res


# ------------------------------------------------------------------------------------------------ CLI


def run_train_tokenizer(args: argparse.Namespace, settings: Settings) -> int:
    res = train_tokenizer(settings, args.out, args.epochs, batch_size=args.batch_size, lr=args.lr,
                          latent_dim=args.latent_dim, seed=args.seed, threads=args.threads)
    print(json.dumps(res, indent=2))
    return 0


def run_train_generator(args: argparse.Namespace, settings: Settings) -> int:
    res = train_generator(settings, args.out, args.epochs, batch_size=args.batch_size, lr=args.lr,
                          subsample_t=args.subsample_t, users=args.users, evaluate=not args.no_eval,
                          ks=tuple(args.k or (4, 8)), topn=args.topn, seed=args.seed, threads=args.threads)
    print(json.dumps(res, indent=2))
    return 0


def run_evaluate_sid(args: argparse.Namespace, settings: Settings) -> int:
    _threads(args.threads)
    res = evaluate_dir(settings, args.out, ks=tuple(args.k or (4, 8)), topn=args.topn, users=args.users)
    print(json.dumps(res, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``anchors`` with ``train-tokenizer``, ``train-generator`` and ``evaluate-sid`` under it."""
    anchors = sub.add_parser("anchors", help="semantic-ID anchors: train the tokenizer and the generator")
    leaves = anchors.add_subparsers(dest="anchors_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, default=None, help="artifacts (default <data_dir>/sid/<encoder>)")
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")

    tok = leaves.add_parser("train-tokenizer", help="RQ-VAE over the item vectors -> semantic IDs")
    common(tok)
    tok.add_argument("--epochs", type=int, default=150, help="passes over the item vectors")
    tok.add_argument("--batch-size", type=int, default=1024, help="item vectors per optimiser step")
    tok.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    tok.add_argument("--latent-dim", type=int, default=64,
                     help="width of the RQ-VAE latent that the codebooks quantise")
    tok.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the shuffling")
    tok.set_defaults(run=run_train_tokenizer)

    gen = leaves.add_parser("train-generator", help="transformer over users' positive SID sequences")
    common(gen)
    gen.add_argument("--epochs", type=int, default=8, help="passes over the users' SID sequences")
    gen.add_argument("--batch-size", type=int, default=64, help="sequences per optimiser step")
    gen.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    gen.add_argument("--subsample-t", type=float, default=1e-3, help="popularity downsampling t (0: off)")
    gen.add_argument("--users", type=int, default=None, help="first N users only (smoke runs)")
    gen.add_argument("--no-eval", action="store_true", help="skip the held-out hit-rate evaluation")
    gen.add_argument("--k", type=int, action="append", help="anchors per user to evaluate (repeatable)")
    gen.add_argument("--topn", type=int, default=10, help="hit rate counted in the top N items per anchor")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the shuffling")
    gen.set_defaults(run=run_train_generator)

    ev = leaves.add_parser("evaluate-sid", help="held-out HR@K x topn of SID anchors vs baselines")
    common(ev)
    ev.add_argument("--k", type=int, action="append", help="anchors per user to evaluate (repeatable)")
    ev.add_argument("--topn", type=int, default=10, help="hit rate counted in the top N items per anchor")
    ev.add_argument("--users", type=int, default=None, help="first N users only (smoke runs)")
    ev.set_defaults(run=run_evaluate_sid)
