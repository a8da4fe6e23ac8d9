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

from gpl.settings import Settings

log = logging.getLogger(__name__)


def sid_dir(settings: Settings) -> Path:
    """``<data_dir>/sid/<encoder id>`` (the id made safe for a directory name)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in settings.encoder.model)
    return settings.data_dir / "sid" / safe


def _from_index(settings: Settings) -> tuple[np.ndarray, np.ndarray] | None:
    """All (ids, vectors) of the encoder's item collection, or None when it is missing or empty."""
    from gpl.vectors import open_index

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
    from gpl.encoder import open_encoder
    from gpl.simulate import load_movielens

    ml = load_movielens()
    texts = [ml.item_text(i, 5) for i in range(ml.n_items)]
    digest = hashlib.blake2b("\x1e".join(texts).encode(), digest_size=8).hexdigest()
    ids_f, vec_f, meta_f = cache_dir / "item_ids.npy", cache_dir / "item_vectors.npy", cache_dir / "items.json"
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
    ids, vecs = movielens_item_vectors(settings, cache_dir or sid_dir(settings), progress=progress)
    return ids, vecs, "movielens-embedded"
