"""Texts → frozen-space vectors for the evaluation, cached on disk per encoder.

Why a cache: embedding the MovieLens catalogue with all-MiniLM-L6-v2 takes minutes on two CPU cores,
and every rerun of ``gpl eval`` (other seeds, other methods) needs the very same vectors. The frozen
encoder makes that safe: under one encoder id a text always has one vector (docs/design.md §2), so a cache
keyed by (encoder id, text) never goes stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpl.eval.dataset import EvalDataset
from runtime.collab_space import CollabConfig, CollabSpace, fit_collab_space
from runtime.encoder import Encoder
from runtime.vectors.normalize import normalize


class CachedEncoder:
    """Wraps an :class:`~runtime.encoder.Encoder`; remembers every vector in ``<dir>/<encoder>.npz``."""

    def __init__(self, encoder: Encoder, directory: Path | None, *, progress: bool = True, chunk: int = 256) -> None:
        self.encoder = encoder
        self.id = encoder.id
        self.dim = encoder.dim
        self.progress = progress
        self.chunk = chunk
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in encoder.id)
        self.path = directory / f"vectors-{safe}.npz" if directory is not None else None
        self._known: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as z:
                texts, vecs = z["texts"].tolist(), z["vectors"]
            if vecs.ndim == 2 and vecs.shape[1] == self.dim:
                self._known = dict(zip(texts, vecs, strict=True))

    def encode(self, texts: list[str], desc: str = "embed") -> np.ndarray:
        """float32 (n, dim), L2-normalised; only texts never seen under this encoder are computed."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._known))
        if todo:
            bar = tqdm(total=len(todo), desc=desc, unit="text", disable=not self.progress, leave=False)
            for n, s in enumerate(range(0, len(todo), self.chunk), 1):
                part = todo[s : s + self.chunk]
                vecs = np.asarray(self.encoder.encode(part), np.float32)
                self._known.update(zip(part, vecs, strict=True))
                bar.update(len(part))
                if n % 16 == 0:  # an interrupted run keeps what it embedded
                    self._save()
            bar.close()
            self._save()
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = np.stack([self._known[t] for t in texts]).astype(np.float32)
        return normalize(out)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        texts = list(self._known)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            texts=np.asarray(texts, dtype=str),
            vectors=np.stack([self._known[t] for t in texts]).astype(np.float32),
        )
        tmp.replace(self.path)


def text_digest(texts: list[str]) -> str:
    return hashlib.blake2b("\x1e".join(texts).encode(), digest_size=8).hexdigest()


__all__ = ["CachedEncoder", "text_digest"]


def training_collab_space(ds: EvalDataset, content: np.ndarray, cfg: CollabConfig | None = None,
                          content_id: str = "") -> CollabSpace:
    """The collaborative frozen space of ``ds`` fitted on its training requests' clicks only (test clicks never
    shape a vector), with the content vectors as the adapter's input for items those clicks miss."""
    click = ds.exposed & (ds.label == 1) & ~ds.is_test[ds.row_request]
    return fit_collab_space(ds.row_user[click], ds.item[click], ds.n_items, content, cfg, item_ids=ds.item_ids,
                            content_id=content_id)
