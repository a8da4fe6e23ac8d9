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

The catalogue's SID table, its metrics and the saved artifact are :mod:`workers.anchors.sid.tokenizer`'s
(:class:`~workers.anchors.sid.tokenizer.SIDTokenizer`, :func:`~workers.anchors.sid.tokenizer.build_tokenizer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


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
