"""Interest anchors for the offline comparison, built from TRAINING-period history only.

Four sources, one shape (:class:`SourceAnchors`: per user the stream's own
:class:`~workers.labeler.anchor_book.UserAnchors`), so the labeling code cannot tell them apart:

* ``text``: an :class:`~workers.anchors.generators.base.AnchorGenerator` (SmolLM2 through transformers, or the
  deterministic MemoryGenerator) writes K interest phrases from the user's last
  ``anchors.history_items`` distinct training clicks (:func:`workers.history.recent_distinct`, the
  worker's rule); the frozen encoder embeds them. LLM answers live in the worker's replay store
  (:mod:`workers.anchors.generation_cache`, same key), so a rerun never asks the LLM twice.
* ``sid``: semantic-ID anchors from workers/anchors/sid, tokenizer and generator trained here when needed
  (see :func:`sid_anchors`).
* ``content`` (no LLM, no training): the streaming ``content`` backend, clusters of those same history
  vectors (:class:`~workers.anchors.vector_anchors.ContentAnchorSource`, :func:`content_anchors`).

:func:`vector_books` builds the books of the vector routes the methods ask for (``gpl-sid``,
and the content anchors of the default GPL rows), so the comparison (gpl/eval/run.py) needs one call for them.

History = clicks (the only positives the stream sees) in the user's training requests, most recent
last. A user without a training click has no history and gets no anchors (no pseudo-labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpl.backends import sid_artifacts
from gpl.eval.dataset import EvalDataset
from gpl.eval.embed import CachedEncoder
from runtime.settings import Settings
from workers.anchors.generation_cache import GenerationCache, cache_key
from workers.anchors.generators.base import AnchorGenerator, AnchorPrompt, Generation
from workers.anchors.sid.generator import SIDAnchorGenerator
from workers.anchors.sid.rqvae import RQVAEConfig, train_rqvae
from workers.anchors.sid.sequence_model import GENERATOR_FILE, load_generator, save_generator, train_generator
from workers.anchors.sid.tokenizer import TOKENIZER_FILE, SIDTokenizer, build_tokenizer
from workers.anchors.vector_anchors import ContentAnchorSource
from workers.labeler.anchor_book import UserAnchors
from workers.labeler.calibrator_fit import content_user_anchors
from workers.labeler.training_log import training_histories

log = logging.getLogger(__name__)


@dataclass
class SourceAnchors:
    """One anchor source's sets, per dense user index (the stream's :class:`UserAnchors`), with its lineage."""

    kind: str  # "llm", "memory", "centroid", "sid", "content"
    model: str
    prompt_hash: str
    users: dict[int, UserAnchors] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # the same source for other histories (cross-fitting builds anchors from some folds only)
    make: Callable[[dict[int, np.ndarray]], dict[int, UserAnchors]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.users)


def pick_users(ds: EvalDataset, histories: dict[int, np.ndarray], cap: int | None) -> list[int]:
    """The users that get generated anchors: those with history, in a fixed pseudo-random order, ≤ cap.

    The order is blake2b(user id), not "most active first": a capped subset must look like the whole
    population, or its metrics would flatter (or punish) the method.
    """
    eligible = sorted(histories, key=lambda u: hashlib.blake2b(ds.users[u].encode(), digest_size=8).digest())
    return eligible if cap is None else eligible[:cap]


def legacy_key(history: list[str], model: str, prompt_hash: str, k: int) -> str:
    """The key of the JSONL cache that ``gpl eval`` kept before it shared the worker's store (migration)."""
    h = hashlib.blake2b("\x1e".join(history).encode(), digest_size=8).hexdigest()
    return f"{h}:{model}:{prompt_hash}:{k}"


def migrate_legacy_cache(path: Path, cache: GenerationCache, keys: dict[str, str]) -> int:
    """Copy generations of the old JSONL cache into the shared store under their new keys.

    The JSONL stored a digest of the history, not the history itself, so entries can only be moved for
    prompts whose texts are known again: ``keys`` maps legacy key → new key for the prompts at hand. What
    moved is not asked of the LLM again; the file stays until every run that could need it has migrated.
    """
    if not path.is_file():
        return 0
    moved: list[tuple[str, Generation]] = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            new = keys.get(rec["key"])
            if new is not None:
                moved.append((new, Generation(anchors=list(rec["anchors"]),
                                              logprobs=[float(x) for x in rec["logprobs"]], raw="",
                                              tokens=int(rec.get("tokens", 0)), parsed_first_try=True,
                                              attempts=int(rec.get("attempts", 1)), fallback=bool(rec["fallback"]))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by an interrupted run: that user is generated again
    cache.put_many(moved)
    return len(moved)


def text_anchors(
    ds: EvalDataset,
    histories: dict[int, np.ndarray],
    users: list[int],
    generator: AnchorGenerator,
    encoder: CachedEncoder,
    cache: GenerationCache,
    *,
    k: int,
    kind: str,
    legacy: Path | None = None,
    batch: int = 8,
    progress: bool = True,
) -> SourceAnchors:
    """Generate (or take from the shared replay store) K anchor texts per user and embed them.

    The store and its key are the streaming worker's (:mod:`workers.anchors.generation_cache`): an anchor set
    generated by ``gpl eval`` answers the same prompt in the stream and the other way round. Entries of
    the old eval-only JSONL cache (``legacy``) are migrated on first use.
    """
    model, ph = generator.model, generator.prompt_hash
    prompts: dict[int, tuple[str, AnchorPrompt]] = {}
    legacy_keys: dict[str, str] = {}
    for u in users:
        texts = [ds.item_text[i] for i in histories[u].tolist()]
        key = cache_key(texts, k, model, ph)
        prompts[u] = (key, AnchorPrompt(ds.users[u], texts, k))
        legacy_keys[legacy_key(texts, model, ph, k)] = key
    migrated = migrate_legacy_cache(legacy, cache, legacy_keys) if legacy is not None else 0
    stored = cache.get_many([key for key, _ in prompts.values()])
    todo = [u for u in users if prompts[u][0] not in stored]
    hits = len(users) - len(todo)
    bar = tqdm(total=len(todo), desc=f"anchors ({model})", unit="user", disable=not progress or not todo)
    for s in range(0, len(todo), batch):
        part = todo[s : s + batch]
        gens = generator.generate([prompts[u][1] for u in part])
        fresh = [(prompts[u][0], g) for u, g in zip(part, gens, strict=True)]
        cache.put_many(fresh)
        stored.update(fresh)
        bar.update(len(part))
    bar.close()
    book = SourceAnchors(kind=kind, model=model, prompt_hash=ph)
    gens_of = {u: stored[prompts[u][0]] for u in users if stored[prompts[u][0]].anchors}
    vecs = encoder.encode([t for g in gens_of.values() for t in g.anchors], desc="embed anchors")
    row = 0
    fallback = tokens = 0
    for u, g in gens_of.items():
        n = len(g.anchors)
        book.users[u] = UserAnchors.of(vecs[row : row + n], np.asarray(g.logprobs, np.float32), history=histories[u],
                                       user_id=ds.users[u], model=model, prompt_hash=ph, fallback=g.fallback,
                                       texts=tuple(g.anchors))
        row += n
        fallback += bool(g.fallback)
        tokens += int(g.tokens)
    book.info = {
        "users": len(book.users),
        "generated_now": len(todo),
        "cache_hits": hits,
        "migrated_from_legacy_cache": migrated,
        "fallback_users": fallback,
        "tokens": tokens,
        "mean_anchors": float(np.mean([len(a.texts) for a in book.users.values()])) if book.users else 0.0,
    }
    return book


def training_click_sequences(ds: EvalDataset) -> dict[int, list[int]]:
    """Per user all clicked item ids (dataset ids, not dense) of training requests, oldest first."""
    rows = np.flatnonzero(ds.exposed & (ds.label == 1) & ~ds.row_test)
    req = ds.row_request[rows]
    order = np.lexsort((ds.position[rows], ds.req_ts[req], ds.req_user[req]))
    out: dict[int, list[int]] = {}
    users = ds.req_user[req[order]].tolist()
    for u, i in zip(users, ds.item_ids[ds.item[rows[order]]].tolist(), strict=True):
        out.setdefault(int(u), []).append(int(i))
    return out


# Eval trains the tokenizer with fewer epochs than ``gpl anchors train-tokenizer`` (150). Measured on the
# MovieLens catalogue (9.7k MiniLM vectors, one idle core): 40 epochs take 28 s, recon_cos 0.74 (random
# codes 0.49) against 0.80 after 150 epochs (~2.5 min); anchors use the codes' item centroids, not the
# decoder, so the codes' grouping matters more than the reconstruction.
TOKENIZER_EPOCHS = 40
MIN_ARTIFACT_COVERAGE = 0.95
VECTOR_METHODS = {"gpl-sid": "sid"}


def eval_tokenizer(settings: Settings, ds: EvalDataset, item_vectors: np.ndarray, cache_dir: Path | None, *,
                   epochs: int = TOKENIZER_EPOCHS, progress: bool = True) -> tuple[SIDTokenizer, dict[str, Any]]:
    """The SID tokenizer for the dataset's catalogue, and where it came from.

    ``gpl anchors train-tokenizer``'s artifact when it exists and knows (nearly) every item of the
    dataset; else an RQ-VAE trained here on the catalogue's item vectors — no user data, so nothing of
    the test period can leak — cached under ``cache_dir`` by (encoder, item ids and vectors, config).
    """
    directory = sid_artifacts(settings)
    if (directory / TOKENIZER_FILE).is_file():
        try:
            tok = SIDTokenizer.load(directory, settings.encoder.model)
            known = float(np.mean([tok.row_of(int(i)) is not None for i in ds.item_ids.tolist()]))
            if known >= MIN_ARTIFACT_COVERAGE and tok.centroids.shape[1] == item_vectors.shape[1]:
                return tok, {"source": str(directory), "catalogue_coverage": known}
            log.info("SID tokenizer %s covers %.0f%% of %s: training one for this catalogue", directory,
                     100 * known, ds.name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            log.warning("SID tokenizer in %s unusable (%s): training one for this catalogue", directory, e)
    cfg = RQVAEConfig(in_dim=int(item_vectors.shape[1]), latent_dim=64, hidden=(512, 256), seed=0)
    h = hashlib.blake2b(digest_size=8)
    h.update(settings.encoder.model.encode())
    h.update(np.ascontiguousarray(ds.item_ids, np.int64).tobytes())
    h.update(np.ascontiguousarray(item_vectors, np.float32).tobytes())
    h.update(json.dumps({"config": repr(cfg), "epochs": epochs, "batch": 1024, "lr": 3e-3}).encode())
    art = cache_dir / f"sid-tokenizer-{h.hexdigest()}" if cache_dir is not None else None
    if art is not None and (art / TOKENIZER_FILE).is_file():
        return SIDTokenizer.load(art, settings.encoder.model), {"source": str(art), "cached": True}
    bar = tqdm(total=epochs, desc="SID tokenizer (item vectors)", unit="epoch", disable=not progress)
    model, hist = train_rqvae(item_vectors, cfg, epochs=epochs, batch_size=1024, lr=3e-3,
                              progress=lambda _e, _s: bar.update(1))
    bar.close()
    tok = build_tokenizer(model, ds.item_ids, item_vectors, settings.encoder.model, {"train": hist, "epochs": epochs})
    if art is not None:
        tok.save(art)
    return tok, {"source": str(art) if art is not None else "trained (not cached)", "cached": False,
                 "epochs": epochs}


def sid_anchors(
    settings: Settings,
    ds: EvalDataset,
    histories: dict[int, np.ndarray],
    users: list[int],
    *,
    k: int,
    cache_dir: Path | None,
    item_vectors: np.ndarray,
    epochs: int = 8,
    tokenizer_epochs: int = TOKENIZER_EPOCHS,
    progress: bool = True,
) -> SourceAnchors:
    """Semantic-ID anchors (workers/anchors/sid), everything they need trained here when missing.

    The *tokenizer* comes from :func:`eval_tokenizer` (item vectors only). The *generator* is always
    retrained here on TRAINING-period click sequences: the artifact of ``gpl anchors train-generator``
    learned from every MovieLens rating but each user's last, i.e. from the test period too, and
    anchors from it would leak the answers. The retrained generator is cached by (tokenizer
    fingerprint, sequences, epochs). Each user's anchors come from one batched beam search over their
    training clicks (the generator reads the most recent ones).
    """
    tok, tok_info = eval_tokenizer(settings, ds, item_vectors, cache_dir, epochs=tokenizer_epochs, progress=progress)
    seqs = training_click_sequences(ds)
    spec = json.dumps(
        {"tok": tok.fingerprint, "seqs": sorted((ds.users[u], s) for u, s in seqs.items()), "epochs": epochs},
        sort_keys=True,
    )
    key = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
    art = cache_dir / f"sid-generator-{key}" if cache_dir is not None else None
    trained = None
    if art is not None and (art / GENERATOR_FILE).is_file():
        trained, _ = load_generator(art, tok)
        history: dict[str, Any] = {"cached": str(art)}
    if trained is None:
        bar = tqdm(total=epochs, desc="SID generator (training clicks)", unit="epoch", disable=not progress)
        trained, history = train_generator(
            tok, list(seqs.values()), epochs=epochs, progress=lambda _e, _s: bar.update(1)
        )
        bar.close()
        if art is not None:
            save_generator(trained, tok, art, history)
    gen = SIDAnchorGenerator(tok, trained)
    book = SourceAnchors(kind="sid", model=str(gen.model), prompt_hash=str(gen.prompt_hash))
    todo = [u for u in users if any(tok.row_of(i) is not None for i in seqs.get(u, []))]
    for s in tqdm(range(0, len(todo), 256), desc="SID anchors", unit="batch", disable=not progress, leave=False):
        part = todo[s : s + 256]
        for u, got in zip(part, gen.generate_anchors_many([seqs[u] for u in part], k), strict=True):
            if got:
                book.users[u] = UserAnchors.of(np.stack([np.asarray(v, np.float32) for v, _, _ in got]),
                                               np.asarray([lp for _, lp, _ in got], np.float32),
                                               history=histories[u], user_id=ds.users[u], model=str(gen.model),
                                               prompt_hash=str(gen.prompt_hash), texts=tuple(sid for _, _, sid in got))
    def make(hists: dict[int, np.ndarray]) -> dict[int, UserAnchors]:
        """SID anchors from other histories (recent distinct clicks) with the same generator."""
        out: dict[int, UserAnchors] = {}
        todo = [u for u, h in hists.items() if any(tok.row_of(int(i)) is not None for i in ds.item_ids[h].tolist())]
        for s in range(0, len(todo), 256):
            part = todo[s : s + 256]
            got_all = gen.generate_anchors_many([ds.item_ids[hists[u]].tolist() for u in part], k)
            for u, got in zip(part, got_all, strict=True):
                if got:
                    out[u] = UserAnchors.of(np.stack([np.asarray(v, np.float32) for v, _, _ in got]),
                                            np.asarray([lp for _, lp, _ in got], np.float32), history=hists[u],
                                            user_id=ds.users[u], model=str(gen.model),
                                            prompt_hash=str(gen.prompt_hash), texts=tuple(sid for _, _, sid in got))
        return out

    book.make = make
    book.info = {
        "users": len(book.users),
        "no_anchors": len(users) - len(book.users),
        "generator": history,
        "tokenizer": {"fingerprint": tok.fingerprint, **tok_info},
    }
    return book


def content_anchors(ds: EvalDataset, histories: dict[int, np.ndarray], users: list[int], item_vectors: np.ndarray,
                    *, k: int) -> SourceAnchors:
    """The streaming ``content`` backend's anchors: k-means clusters of each user's history vectors
    (:func:`~workers.labeler.calibrator_fit.content_user_anchors`, the calibrator fit's default source)."""
    src = ContentAnchorSource()
    book = SourceAnchors(kind="content", model=src.model, prompt_hash=src.prompt_hash)
    book.users = content_user_anchors(ds.users, {u: histories[u] for u in users}, item_vectors, k=k)

    def make(hists: dict[int, np.ndarray]) -> dict[int, UserAnchors]:
        return content_user_anchors(ds.users, hists, item_vectors, k=k)

    book.make = make
    book.info = {"users": len(book.users),
                 "mean_anchors": float(np.mean([len(a.texts) for a in book.users.values()])) if book.users else 0.0}
    return book


def vector_books(settings: Settings, ds: EvalDataset, histories: dict[int, np.ndarray], users: list[int],
                 item_vectors: np.ndarray, methods: list[str], *, cache_dir: Path | None, sid_epochs: int,
                 progress: bool = True) -> tuple[dict[str, SourceAnchors], dict[str, str]]:
    """Books of the vector routes ``methods`` ask for (:data:`VECTOR_METHODS`), and why any is missing."""
    books: dict[str, SourceAnchors] = {}
    unavailable: dict[str, str] = {}
    k = settings.anchors.k
    if any(m.startswith("gpl") and m not in ("gpl-sid", "gpl-text") for m in methods):  # the content routes
        books["content"] = content_anchors(ds, histories, users, item_vectors, k=k)
    if "gpl-sid" in methods:
        try:
            books["sid"] = sid_anchors(settings, ds, histories, users, k=k, cache_dir=cache_dir,
                                       item_vectors=item_vectors, epochs=sid_epochs, progress=progress)
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a catalogue too small for the tokenizer
            log.exception("SID anchors failed")
            unavailable["gpl-sid"] = f"not available (SID anchors failed: {e})"
    return books, unavailable


__all__ = [
    "SourceAnchors",
    "training_histories",
    "pick_users",
    "legacy_key",
    "migrate_legacy_cache",
    "text_anchors",
    "sid_anchors",
    "eval_tokenizer",
    "content_anchors",
    "vector_books",
    "VECTOR_METHODS",
    "training_click_sequences",
]
