"""The SID tokenizer: a trained RQ-VAE (:mod:`workers.anchors.sid.rqvae`) plus the catalogue's SID table.

Why apart from the model: training is one concern (losses, codebook collapse); what the rest of the
project uses is the artifact — each item's SID, the per-prefix centroids, the quality metrics —
loaded by the anchor generator and the evaluation without touching training code.

**Disambiguation.** With 256³ possible codes and ~10k items collisions are rare but not absent; items
sharing the same 3-level code get a 4th token 0, 1, 2, ... in ascending item-id order
(:func:`disambiguate`), so a SID names exactly one item. The 4th token has no embedding: it carries
identity, not meaning, and the decoder ignores it.

Artifacts (:meth:`SIDTokenizer.save`): ``tokenizer.pt`` (state dict, config, encoder id, item ids, SID
table, per-prefix centroids, metrics; loadable with ``torch.load(weights_only=True)``) and a readable
``tokenizer.json``. A tokenizer belongs to one frozen encoder: :meth:`SIDTokenizer.load` refuses
another encoder's id, and the default directory is ``<data_dir>/sid/<encoder id>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from runtime.vectors.normalize import normalize
from workers.anchors.sid.artifact import read_artifact, write_artifact
from workers.anchors.sid.rqvae import RQVAE, RQVAEConfig

FORMAT = "gpl-sid-tokenizer/1"
TOKENIZER_FILE = "tokenizer.pt"


def disambiguate(codes: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Append a suffix column so every row is unique: items sharing a code get 0, 1, 2, ... by item id.

    Returns the (n, levels + 1) table and the suffix vocabulary size (the largest collision group).
    Deterministic: ordering by item id (not by input order) gives the same SIDs for the same catalogue.
    """
    n = codes.shape[0]
    if n == 0:
        return np.zeros((0, codes.shape[1] + 1), np.int64), 1
    order = np.lexsort((item_ids, *codes.T[::-1]))  # by code (level 0 first), then by item id
    sorted_codes = codes[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    suffix_sorted = np.arange(n) - group_start
    suffix = np.empty(n, dtype=np.int64)
    suffix[order] = suffix_sorted
    return np.concatenate([codes.astype(np.int64), suffix[:, None]], axis=1), int(suffix.max()) + 1


def code_usage(codes: np.ndarray, codebook_size: int) -> list[dict[str, float]]:
    """Per level: fraction of codes used by at least one item, and the perplexity of the code histogram.

    Perplexity = exp(entropy): the number of equally used codes that would give the same entropy
    (codebook_size means perfectly even use, 1 means collapse).
    """
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
        p = counts[counts > 0] / max(counts.sum(), 1.0)
        out.append({"used": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return out


def collision_stats(codes: np.ndarray) -> dict[str, float]:
    """How many items share their full code with another item, before disambiguation."""
    if len(codes) == 0:
        return {"collision_rate": 0.0, "unique_codes": 0.0, "max_group": 0.0}
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.ravel()] > 1
    return {"collision_rate": float(shared.mean()), "unique_codes": float(len(counts)),
            "max_group": float(counts.max())}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=1).mean())


@torch.no_grad()
def reconstruction_report(model: RQVAE, vectors: np.ndarray, codes: np.ndarray, seed: int = 0
                          ) -> dict[str, float]:
    """Mean cosine between item vectors and their decoded SIDs, with two references.

    ``recon_cos_random``: decoded uniformly random codes (what the decoder gives without information);
    ``recon_cos_unquantized``: decoder(encoder(x)) without quantisation (the autoencoder's ceiling).
    """
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    c = torch.from_numpy(codes[:, : model.config.levels]).long()
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, model.config.codebook_size, c.shape, generator=g)
    return {
        "recon_cos": _cos(model.decode_codes(c), x),
        "recon_cos_random": _cos(model.decode_codes(rand), x),
        "recon_cos_unquantized": _cos(model.decoder(model.encoder(x)), x),
    }


def prefix_centroids(sids: np.ndarray, vectors: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct depth-prefixes (m, depth) and the unit mean vector of the items under each (m, dim)."""
    prefixes, inverse = np.unique(sids[:, :depth], axis=0, return_inverse=True)
    inverse = inverse.ravel()
    sums = np.zeros((len(prefixes), vectors.shape[1]), np.float64)
    np.add.at(sums, inverse, vectors)
    return prefixes.astype(np.int64), normalize(sums)


@dataclass
class SIDTokenizer:
    """A trained RQ-VAE plus the catalogue's SID table, tied to one frozen encoder.

    ``sids[r]`` is the SID of ``item_ids[r]``: ``levels`` semantic codes then the collision suffix.
    ``centroids`` are the unit mean item vectors of every distinct ``levels``-prefix (``prefixes``),
    one of the two ways an anchor SID becomes a vector (see workers/anchors/sid/generator.py).
    """

    model: RQVAE
    encoder_id: str
    item_ids: np.ndarray  # int64 (n,)
    sids: np.ndarray  # int64 (n, levels + 1)
    suffix_size: int
    prefixes: np.ndarray  # int64 (m, levels)
    centroids: np.ndarray  # float32 (m, dim)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._row = {int(i): r for r, i in enumerate(self.item_ids.tolist())}
        self._prefix_row = {tuple(p): r for r, p in enumerate(self.prefixes.tolist())}

    @property
    def levels(self) -> int:
        return self.model.config.levels

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Vocabulary size of each SID position: codebook size per level, then the suffix size."""
        return (*([self.model.config.codebook_size] * self.levels), self.suffix_size)

    @property
    def fingerprint(self) -> str:
        """Hash of (encoder, item ids, SID table): a generator trained on these SIDs records it."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.encoder_id.encode())
        h.update(np.ascontiguousarray(self.item_ids, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.sids, np.int64).tobytes())
        return h.hexdigest()

    def row_of(self, item_id: int) -> int | None:
        return self._row.get(int(item_id))

    def sid_of(self, item_id: int) -> tuple[int, ...] | None:
        r = self._row.get(int(item_id))
        return None if r is None else tuple(int(c) for c in self.sids[r])

    def vector_of_prefix(self, prefix: tuple[int, ...], mode: str) -> np.ndarray:
        """The vector an anchor SID stands for: ``decoded`` (RQ-VAE decoder) or ``centroid`` of its items.

        Only the ``levels`` semantic codes matter: a suffix names one item among identical codes, and
        both modes give every item under one semantic code the same vector.
        """
        head = tuple(int(c) for c in prefix[: self.levels])
        if len(head) < self.levels:
            raise ValueError(f"an anchor SID needs {self.levels} semantic codes, got {head}")
        if mode == "centroid":
            row = self._prefix_row.get(head)
            if row is None:
                raise KeyError(f"no item has the semantic code {head}")
            return self.centroids[row]
        if mode == "decoded":
            return self.model.decode_codes(torch.tensor([head])).numpy()[0]
        raise ValueError(f"unknown anchor vector mode {mode!r}")

    # --------------------------------------------------------------------------------- artifacts

    def save(self, out_dir: Path | str) -> Path:
        blob = {
            "format": FORMAT,
            "config": asdict(self.model.config),
            "state_dict": self.model.state_dict(),
            "encoder_id": self.encoder_id,
            "item_ids": torch.from_numpy(np.ascontiguousarray(self.item_ids, np.int64)),
            "sids": torch.from_numpy(np.ascontiguousarray(self.sids, np.int64)),
            "suffix_size": self.suffix_size,
            "prefixes": torch.from_numpy(np.ascontiguousarray(self.prefixes, np.int64)),
            "centroids": torch.from_numpy(np.ascontiguousarray(self.centroids, np.float32)),
            "metrics_json": json.dumps(self.metrics),
        }
        summary = {"format": FORMAT, "encoder_id": self.encoder_id, "fingerprint": self.fingerprint,
                   "items": len(self.item_ids), "config": asdict(self.model.config),
                   "suffix_size": self.suffix_size, "metrics": self.metrics}
        return write_artifact(out_dir, TOKENIZER_FILE, blob, summary)

    @classmethod
    def load(cls, path: Path | str, encoder_id: str | None = None) -> SIDTokenizer:
        """Load ``tokenizer.pt`` (or a directory holding it); ``encoder_id`` must match when given."""
        p, blob = read_artifact(path, TOKENIZER_FILE, FORMAT)
        if encoder_id is not None and blob["encoder_id"] != encoder_id:
            raise ValueError(f"{p} was trained on encoder {blob['encoder_id']!r}, not {encoder_id!r}: "
                             "SIDs from another frozen space mean nothing here")
        cfg = dict(blob["config"])
        cfg["hidden"] = tuple(cfg["hidden"])
        model = RQVAE(RQVAEConfig(**cfg))
        model.load_state_dict(blob["state_dict"])
        model.eval()
        return cls(model=model, encoder_id=blob["encoder_id"], item_ids=blob["item_ids"].numpy(),
                   sids=blob["sids"].numpy(), suffix_size=int(blob["suffix_size"]),
                   prefixes=blob["prefixes"].numpy(), centroids=blob["centroids"].numpy(),
                   metrics=json.loads(blob["metrics_json"]))


def build_tokenizer(model: RQVAE, item_ids: np.ndarray, vectors: np.ndarray, encoder_id: str,
                    extra_metrics: dict[str, Any] | None = None) -> SIDTokenizer:
    """Assign SIDs to the catalogue with a trained model, disambiguate, and measure the result."""
    item_ids = np.asarray(item_ids, np.int64)
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("item ids must be unique")
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    codes = model.codes_of(x).numpy()
    sids, suffix_size = disambiguate(codes, item_ids)
    prefixes, centroids = prefix_centroids(sids, np.asarray(vectors, np.float32), model.config.levels)
    metrics: dict[str, Any] = {
        "items": len(item_ids),
        **reconstruction_report(model, vectors, codes, seed=model.config.seed),
        **collision_stats(codes),
        "suffix_size": suffix_size,
        "usage": code_usage(codes, model.config.codebook_size),
        **(extra_metrics or {}),
    }
    return SIDTokenizer(model, encoder_id, item_ids, sids, suffix_size, prefixes, centroids, metrics)
