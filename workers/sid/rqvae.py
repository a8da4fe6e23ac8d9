"""RQ-VAE tokenizer: each frozen item vector gets a hierarchical semantic ID (SID).

Why a learned tokenizer: a sequence model cannot emit 384-d vectors, but it can emit a few discrete
tokens. Residual quantisation makes those tokens *hierarchical*: level 0 picks a coarse region of the
space, level 1 refines the residual left by level 0, and so on, so items that share a prefix are
semantically close and a beam search over prefixes explores the space coarse-to-fine.

Model (all sizes in :class:`RQVAEConfig`)::

    x (unit, in_dim) ─ MLP encoder ─► z (latent_dim)
    r_0 = z;  c_l = argmin_j ||r_l - E_l[j]||;  e_l = E_l[c_l];  r_{l+1} = r_l - e_l     (l < levels)
    z_q = Σ_l e_l  ─ MLP decoder ─► x̂

Loss = ||x̂ - x||² + Σ_l ( ||sg(r_l) - e_l||² + β ||r_l - sg(e_l)||² ), with the straight-through
estimator ``z + sg(z_q - z)`` feeding the decoder (gradients reach the encoder through quantisation).
The second term moves code vectors towards the residuals they serve; the third (commitment, β) keeps
the encoder from drifting away from its codes.

Two guards against the failure everyone meets with VQ models, codebook collapse (a few codes serve
every item, the rest never win an argmin and never get a gradient):

* **k-means initialisation** on the first batch: level l's codebook is k-means (k-means++ seeding) of
  the level-l residuals of that batch, so every code starts where data is.
* **dead-code re-seeding**: every ``dead_check_every`` steps, a code that won no argmin since the last
  check is moved onto a random residual of the current batch at its level (plus a little noise).

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
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gpl.runtime.vectors.normalize import normalize

FORMAT = "gpl-sid-tokenizer/1"
TOKENIZER_FILE = "tokenizer.pt"


@dataclass(frozen=True)
class RQVAEConfig:
    """Shape and training knobs of the RQ-VAE (defaults: MovieLens, all-MiniLM-L6-v2 vectors)."""

    in_dim: int = 384
    hidden: tuple[int, ...] = (256, 128)
    latent_dim: int = 32
    levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25  # commitment weight
    kmeans_iters: int = 25
    dead_check_every: int = 50  # steps between dead-code checks (re-seeding)
    seed: int = 0


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k centres of ``x`` (n, d): k-means++ seeding, then Lloyd iterations; an empty cluster keeps its centre.

    With fewer points than centres, the extra centres are data points plus small noise (still on the
    data, so they can win an argmin later and are not dead from the start).
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n <= k:
        idx = torch.randint(0, n, (k,), generator=generator)
        noise = torch.randn(k, x.shape[1], generator=generator) * (x.std() * 0.01 + 1e-6)
        return x[idx] + noise
    first = int(torch.randint(0, n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        j = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c


@dataclass
class RQOutput:
    recon: torch.Tensor  # (n, in_dim), not normalised
    codes: torch.Tensor  # (n, levels) int64
    recon_loss: torch.Tensor
    quant_loss: torch.Tensor
    residuals: list[torch.Tensor]  # level-l input residuals, detached (for dead-code re-seeding)


class RQVAE(nn.Module):
    """MLP encoder, ``levels`` residual codebooks of ``codebook_size`` codes, MLP decoder."""

    initialized: torch.Tensor
    usage: torch.Tensor

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        dims = [config.in_dim, *config.hidden, config.latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        shape = (config.levels, config.codebook_size, config.latent_dim)
        self.codebooks = nn.Parameter(torch.randn(*shape) * 0.1)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(config.levels, config.codebook_size, dtype=torch.int64))

    def quantize(self, z: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(z_q, codes, codebook + commitment loss, level residuals) of latents ``z``."""
        residual = z
        zq = torch.zeros_like(z)
        codes = []
        residuals = []
        loss = z.new_zeros(())
        for level in range(self.config.levels):
            book = self.codebooks[level]
            residuals.append(residual.detach())
            code = torch.cdist(residual.detach(), book.detach()).argmin(1)
            e = book[code]
            loss = loss + F.mse_loss(e, residual.detach(), reduction="none").sum(1).mean()
            loss = loss + self.config.beta * F.mse_loss(residual, e.detach(), reduction="none").sum(1).mean()
            zq = zq + e
            residual = residual - e
            codes.append(code)
        return zq, torch.stack(codes, 1), loss, residuals

    def forward(self, x: torch.Tensor) -> RQOutput:
        z = self.encoder(x)
        zq, codes, qloss, residuals = self.quantize(z)
        recon = self.decoder(z + (zq - z).detach())  # straight-through
        rloss = F.mse_loss(recon, x, reduction="none").sum(1).mean()
        return RQOutput(recon, codes, rloss, qloss, residuals)

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """k-means of each level's residuals of the batch ``x``, level by level (each refines the last)."""
        residual = self.encoder(x)
        for level in range(self.config.levels):
            c = kmeans(residual, self.config.codebook_size, self.config.kmeans_iters, generator)
            self.codebooks.data[level] = c
            residual = residual - c[torch.cdist(residual, c).argmin(1)]
        self.initialized.fill_(True)

    @torch.no_grad()
    def reseed_dead(self, residuals: list[torch.Tensor], generator: torch.Generator) -> int:
        """Move every code with no use since the last check onto a random batch residual; reset the counts."""
        moved = 0
        for level, res in enumerate(residuals):
            dead = (self.usage[level] == 0).nonzero().flatten()
            if len(dead) and len(res):
                pick = torch.randint(0, res.shape[0], (len(dead),), generator=generator)
                noise = torch.randn(len(dead), res.shape[1], generator=generator) * (res.std() * 0.01 + 1e-6)
                self.codebooks.data[level, dead] = res[pick] + noise
                moved += len(dead)
        self.usage.zero_()
        return moved

    @torch.no_grad()
    def codes_of(self, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """3-level codes (n, levels) of item vectors ``x``."""
        out = [self.quantize(self.encoder(x[s : s + batch]))[1] for s in range(0, x.shape[0], batch)]
        return torch.cat(out) if out else torch.zeros(0, self.config.levels, dtype=torch.int64)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit vectors in the frozen space for codes (n, >= levels); a 4th (suffix) column is ignored."""
        codes = codes[:, : self.config.levels].long()
        zq = torch.zeros(codes.shape[0], self.config.latent_dim)
        for level in range(self.config.levels):
            zq = zq + self.codebooks[level][codes[:, level]]
        return F.normalize(self.decoder(zq), dim=1)


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup: float
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 1% (any step count, even 1)."""
    warm = max(1, int(warmup * total_steps))
    total = max(total_steps, warm + 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_rqvae(
    vectors: np.ndarray,
    config: RQVAEConfig,
    *,
    epochs: int = 150,
    batch_size: int = 1024,
    lr: float = 1e-3,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[RQVAE, dict[str, Any]]:
    """Train from scratch on unit item vectors (n, in_dim); returns the model (eval mode) and a history.

    ``progress(step, stats)`` is called once per epoch (the command wires a tqdm bar to it).
    """
    if vectors.ndim != 2 or vectors.shape[1] != config.in_dim:
        raise ValueError(f"vectors must be (n, {config.in_dim}), got {vectors.shape}")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = RQVAE(config)
    x_all = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n = x_all.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    sched = warmup_cosine(opt, total, 0.05)
    step = 0
    reseeded = 0
    stats: dict[str, float] = {}
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        sums = {"recon": 0.0, "quant": 0.0}
        for s in range(0, n, batch_size):
            xb = x_all[perm[s : s + batch_size]]
            if not bool(model.initialized):
                model.init_codebooks(xb, gen)
            out = model(xb)
            loss = out.recon_loss + out.quant_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                for level in range(config.levels):
                    model.usage[level] += torch.bincount(out.codes[:, level], minlength=config.codebook_size)
            # no re-seeding in the last stretch: a code moved then would have no time to settle
            if step % config.dead_check_every == 0 and step < 0.9 * total:
                reseeded += model.reseed_dead(out.residuals, gen)
            sums["recon"] += float(out.recon_loss.detach()) * len(xb)
            sums["quant"] += float(out.quant_loss.detach()) * len(xb)
        stats = {"epoch": float(epoch + 1), "recon": sums["recon"] / n, "quant": sums["quant"] / n}
        if progress is not None:
            progress(epoch + 1, stats)
    model.eval()
    return model, {"steps": step, "reseeded_codes": reseeded, "final": stats}


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
    one of the two ways an anchor SID becomes a vector (see workers/sid/generator.py).
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
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
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
        path = out / TOKENIZER_FILE
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)  # a reader never sees half a file
        summary = {"format": FORMAT, "encoder_id": self.encoder_id, "fingerprint": self.fingerprint,
                   "items": len(self.item_ids), "config": asdict(self.model.config),
                   "suffix_size": self.suffix_size, "metrics": self.metrics}
        (out / "tokenizer.json").write_text(json.dumps(summary, indent=2))
        return path

    @classmethod
    def load(cls, path: Path | str, encoder_id: str | None = None) -> SIDTokenizer:
        """Load ``tokenizer.pt`` (or a directory holding it); ``encoder_id`` must match when given."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        blob = torch.load(p, weights_only=True)
        if blob.get("format") != FORMAT:
            raise ValueError(f"{p}: not a {FORMAT} artifact (format {blob.get('format')!r})")
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
