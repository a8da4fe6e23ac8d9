"""Interest anchors for the offline comparison, built from TRAINING-period history only.

Three sources, one shape (:class:`AnchorBook`: per user K unit vectors, their log-probs and the
history they came from), so the labeling code (workers/labeling.py) cannot tell them apart:

* ``text``: an :class:`~workers.generators.AnchorGenerator` (SmolLM2 through transformers, or the
  deterministic MemoryGenerator) writes K interest phrases from the user's last
  ``anchors.history_items`` distinct training clicks; the frozen encoder embeds them. LLM answers are
  cached on disk by (history digest, model, prompt hash, K), so a rerun never asks the LLM twice.
* ``centroid`` (ablation, no LLM): one anchor, the normalised mean of those same history vectors.
* ``sid``: semantic-ID anchors from workers/sid when it is importable and trained (see
  :func:`sid_anchors`).

History = clicks (the only positives the stream sees) in the user's training requests, most recent
last. A user without a training click has no history and gets no anchors (no pseudo-labels).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpl.eval.dataset import EvalDataset
from gpl.eval.embed import CachedEncoder
from gpl.runtime.settings import Settings
from workers.generators.base import AnchorGenerator, AnchorPrompt, Generation

log = logging.getLogger(__name__)


@dataclass
class UserAnchors:
    vectors: np.ndarray  # (K, dim) float32, unit rows
    logprobs: np.ndarray  # (K,) float32
    history: np.ndarray  # dense item indices the anchors were generated from
    texts: list[str] = field(default_factory=list)
    fallback: bool = False


@dataclass
class AnchorBook:
    """Anchors per dense user index, with the lineage the labeler would put in a SampleBatch."""

    kind: str  # "llm", "memory", "centroid", "sid"
    model: str
    prompt_hash: str
    users: dict[int, UserAnchors] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)


def training_histories(ds: EvalDataset, n: int) -> dict[int, np.ndarray]:
    """Per user: the last ``n`` distinct items clicked in training requests (dense ids, most recent last)."""
    rows = np.flatnonzero(ds.exposed & (ds.label == 1) & ~ds.row_test)
    req = ds.row_request[rows]
    order = np.lexsort((ds.position[rows], ds.req_ts[req], ds.req_user[req]))
    rows, req = rows[order], req[order]
    users = ds.req_user[req]
    out: dict[int, np.ndarray] = {}
    bounds = np.flatnonzero(np.diff(users)) + 1
    for chunk, u_rows in zip(np.split(np.arange(len(rows)), bounds), np.split(users, bounds), strict=True):
        if not len(chunk):
            continue
        items = ds.item[rows[chunk]].tolist()
        recent = list(dict.fromkeys(reversed(items)))[:n]  # newest first, duplicates dropped
        out[int(u_rows[0])] = np.asarray(recent[::-1], np.int64)
    return out


def pick_users(ds: EvalDataset, histories: dict[int, np.ndarray], cap: int | None) -> list[int]:
    """The users that get generated anchors: those with history, in a fixed pseudo-random order, ≤ cap.

    The order is blake2b(user id), not "most active first": a capped subset must look like the whole
    population, or its metrics would flatter (or punish) the method.
    """
    eligible = sorted(histories, key=lambda u: hashlib.blake2b(ds.users[u].encode(), digest_size=8).digest())
    return eligible if cap is None else eligible[:cap]


class GenerationCache:
    """Append-only JSONL of generations keyed by (history digest, model, prompt hash, K)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._m: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self._m[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by an interrupted run: that user is generated again

    @staticmethod
    def key(history: list[str], model: str, prompt_hash: str, k: int) -> str:
        h = hashlib.blake2b("\x1e".join(history).encode(), digest_size=8).hexdigest()
        return f"{h}:{model}:{prompt_hash}:{k}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self._m.get(key)

    def put(self, key: str, gen: Generation) -> None:
        rec = {
            "key": key,
            "anchors": gen.anchors,
            "logprobs": [float(x) for x in gen.logprobs],
            "fallback": gen.fallback,
            "tokens": gen.tokens,
            "attempts": gen.attempts,
        }
        self._m[key] = rec
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def __len__(self) -> int:
        return len(self._m)


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
    batch: int = 8,
    progress: bool = True,
) -> AnchorBook:
    """Generate (or take from the cache) K anchor texts per user and embed them."""
    prompts: dict[int, tuple[str, AnchorPrompt]] = {}
    for u in users:
        texts = [ds.item_text[i] for i in histories[u].tolist()]
        prompts[u] = (
            cache.key(texts, generator.model, generator.prompt_hash, k),
            AnchorPrompt(ds.users[u], texts, k),
        )
    todo = [u for u in users if cache.get(prompts[u][0]) is None]
    hits = len(users) - len(todo)
    bar = tqdm(total=len(todo), desc=f"anchors ({generator.model})", unit="user", disable=not progress or not todo)
    for s in range(0, len(todo), batch):
        part = todo[s : s + batch]
        gens = generator.generate([prompts[u][1] for u in part])
        for u, g in zip(part, gens, strict=True):
            cache.put(prompts[u][0], g)
        bar.update(len(part))
    bar.close()
    book = AnchorBook(kind=kind, model=generator.model, prompt_hash=generator.prompt_hash)
    recs = {u: cache.get(prompts[u][0]) for u in users}
    all_texts = [t for r in recs.values() if r for t in r["anchors"]]
    vecs = encoder.encode(all_texts, desc="embed anchors")
    row = 0
    fallback = tokens = 0
    for u, r in recs.items():
        if not r or not r["anchors"]:
            continue
        n = len(r["anchors"])
        book.users[u] = UserAnchors(
            vectors=vecs[row : row + n],
            logprobs=np.asarray(r["logprobs"], np.float32),
            history=histories[u],
            texts=list(r["anchors"]),
            fallback=bool(r["fallback"]),
        )
        row += n
        fallback += bool(r["fallback"])
        tokens += int(r.get("tokens", 0))
    book.info = {
        "users": len(book.users),
        "generated_now": len(todo),
        "cache_hits": hits,
        "fallback_users": fallback,
        "tokens": tokens,
        "mean_anchors": float(np.mean([len(a.texts) for a in book.users.values()])) if book.users else 0.0,
    }
    return book


def centroid_anchors(histories: dict[int, np.ndarray], users: list[int], item_vectors: np.ndarray) -> AnchorBook:
    """One anchor per user: the normalised centroid of the history vectors (the no-LLM ablation)."""
    book = AnchorBook(kind="centroid", model="history-centroid", prompt_hash="-")
    for u in users:
        c = item_vectors[histories[u]].mean(axis=0)
        nrm = float(np.linalg.norm(c))
        if nrm == 0:
            continue
        book.users[u] = UserAnchors(
            vectors=(c / nrm)[None, :].astype(np.float32),
            logprobs=np.zeros(1, np.float32),
            history=histories[u],
            texts=["<centroid>"],
        )
    book.info = {"users": len(book.users)}
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


def sid_anchors(
    settings: Settings,
    ds: EvalDataset,
    histories: dict[int, np.ndarray],
    users: list[int],
    *,
    k: int,
    cache_dir: Path | None,
    epochs: int = 8,
    progress: bool = True,
) -> AnchorBook | str:
    """Semantic-ID anchors (workers/sid), or why they are not available (a string for the table).

    The SID *tokenizer* (RQ-VAE over item vectors, no user data) is taken from ``gpl anchors
    train-tokenizer``'s artifacts. The SID *generator* is retrained here on TRAINING-period click
    sequences: the artifact of ``gpl anchors train-generator`` learned from every MovieLens rating but
    each user's last, i.e. from the test period too, and anchors from it would leak the answers. The
    retrained generator is cached by (tokenizer fingerprint, sequences, epochs). Each user's anchors
    come from beam search over their training clicks (the generator reads the most recent ones).
    """
    try:
        gen_mod = importlib.import_module("workers.sid.generator")
        rq = importlib.import_module("workers.sid.rqvae")
        sid_cmd = importlib.import_module("gpl.commands.sid")
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        return f"not available (workers.sid not importable: {type(e).__name__}: {e})"
    directory = sid_cmd.sid_dir(settings)
    try:
        tok = rq.SIDTokenizer.load(directory, settings.encoder.model)
    except FileNotFoundError:
        return f"not available (no SID tokenizer in {directory}; run gpl anchors train-tokenizer)"
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return f"not available (SID tokenizer in {directory} unusable: {e})"
    seqs = training_click_sequences(ds)
    spec = json.dumps(
        {"tok": tok.fingerprint, "seqs": sorted((ds.users[u], s) for u, s in seqs.items()), "epochs": epochs},
        sort_keys=True,
    )
    key = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
    art = cache_dir / f"sid-generator-{key}" if cache_dir is not None else None
    trained = None
    if art is not None and (art / gen_mod.GENERATOR_FILE).is_file():
        trained, _ = gen_mod.load_generator(art, tok)
        history = {"cached": str(art)}
    if trained is None:
        bar = tqdm(total=epochs, desc="SID generator (training clicks)", unit="epoch", disable=not progress)
        trained, history = gen_mod.train_generator(
            tok, list(seqs.values()), epochs=epochs, progress=lambda _e, _s: bar.update(1)
        )
        bar.close()
        if art is not None:
            gen_mod.save_generator(trained, tok, art, history)
    gen = gen_mod.SIDAnchorGenerator(tok, trained)
    book = AnchorBook(kind="sid", model=str(gen.model), prompt_hash=str(gen.prompt_hash))
    missing = 0
    for u in tqdm(users, desc="SID anchors", unit="user", disable=not progress, leave=False):
        try:
            got = gen.generate_anchors(seqs.get(u, []), k)
        except (KeyError, ValueError):
            got = []
        if not got:
            missing += 1
            continue
        vecs = np.stack([np.asarray(v, np.float32) for v, _, _ in got])
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        book.users[u] = UserAnchors(
            vectors=vecs,
            logprobs=np.asarray([lp for _, lp, _ in got], np.float32),
            history=histories[u],
            texts=[sid for _, _, sid in got],
        )
    book.info = {
        "users": len(book.users),
        "no_anchors": missing,
        "generator": history,
        "tokenizer": tok.fingerprint,
    }
    return book


__all__ = [
    "UserAnchors",
    "AnchorBook",
    "training_histories",
    "pick_users",
    "GenerationCache",
    "text_anchors",
    "centroid_anchors",
    "sid_anchors",
    "training_click_sequences",
]
