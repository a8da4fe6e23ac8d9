"""The pre-ranker and its loss: small enough to read in one sitting.

A COLD-style pre-ranker: cheap features of (user, item) go through one small MLP to a click logit.

* user tower input: a hashed user-id embedding, nothing else (the pre-ranker must stay cheap, and the
  pseudo-labels are what teach it about the unexposed part of the space);
* item features: a hashed item-id embedding (memorises popular items) and the item's *frozen* content
  vector from the items collection, projected down (generalises to long-tail and new items, and is the
  same space the GPL anchors live in);
* interactions: the user embedding times the projected content and times the item embedding, so the MLP
  does not have to discover the dot product of a two-tower model on its own;
* behaviour (``history_items`` > 0): the user's recent positives as the unit mean of their frozen vectors
  (:func:`workers.history.history_profile`: the last ``history_items`` distinct clicked items before the
  request), projected, times the projected content, plus the cross feature cos(history, item). A hashed id
  learns a user only from that user's own rows; the history lets every row teach the model how taste
  carries over to similar items — the very relation GPL's anchor labels express, which a student without
  it cannot represent.
* anchors (``anchor_cross``): the candidate's cosine to the user's current interest anchors, best and mean of
  the top two (:mod:`workers.anchor_cross`), straight into the MLP: a COLD-style cross feature that says
  what the anchors know about this candidate at serving time as well, not only through the labels.

Ids are hashed with blake2b, never Python's ``hash()``: the bucket of an id must be the same in every
process and after every restart, or a checkpoint would map users to someone else's row.

The objective is docs/design.md §2: L = Σ_exposed BCE(f, y) + λ · Σ_unexposed w · BCE(f, ỹ), computed per
mini-batch and divided by the batch size (not by Σ weights, which would change an exposed sample's
effective weight with the batch's pseudo share).

Beside it, an optional *rank* term (``trainer.rank_weight`` > 0): per request, the softmax of the
student's logits over that request's pseudo-labeled candidates is pulled towards the softmax of the label
logits, both at ``trainer.rank_temperature`` (listwise distillation, KL · T²). The pointwise term at p ≈ 0.04
turns a whole logit of difference between two candidates into ~0.04 of gradient; the listwise term sees
the *order* the labels put the request's candidates in, whatever their level. It carries no confidence
weight: the margin weight |2p − 1| is lowest exactly where the labels depart from the priors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.settings import TrainerSettings
from workers.anchor_cross import ANCHOR_CROSS_DIM, ANCHOR_CROSS_INPUT


def _bucket(key: bytes, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % buckets


def user_buckets(user_ids: Sequence[str], buckets: int) -> np.ndarray:
    """Stable hash bucket of each user id (int64): the same in every process and run."""
    return np.fromiter((_bucket(b"u:" + u.encode(), buckets) for u in user_ids), np.int64, len(user_ids))


def item_buckets(item_ids: Sequence[int] | np.ndarray, buckets: int) -> np.ndarray:
    """Stable hash bucket of each item id (int64)."""
    ids = np.asarray(item_ids, dtype=np.int64).tolist()
    return np.fromiter((_bucket(b"i:" + int(i).to_bytes(8, "big"), buckets) for i in ids), np.int64, len(ids))


INPUTS = ("user_bucket", "item_bucket", "content")  # the network's inputs without history, in forward()'s order
HISTORY_INPUT = "history"
OUTPUTS = ("logit", "probability")


def model_inputs(cfg: ModelConfig) -> tuple[str, ...]:
    """The exported network's inputs, in forward()'s order: the history and the anchor cross feature only
    when the model reads them."""
    return (*INPUTS, *((HISTORY_INPUT,) if cfg.history_items else ()), *((ANCHOR_CROSS_INPUT,) if cfg.anchor_cross
                                                                         else ()))


def feature_spec(cfg: ModelConfig) -> dict[str, Any]:
    """How a server builds each input of the exported network from raw ids, as data.

    It lives next to :func:`user_buckets` and :func:`item_buckets` so that a change to the hashing
    shows up beside the description a serving team implements (tests re-implement from this spec).
    """
    def hashed(prefix: str, id_encoding: str, source: str) -> dict[str, Any]:
        return {"dtype": "int64", "shape": ["n"], "source": source, "hash": "blake2b", "digest_size": 8,
                "key": f"ascii {prefix!r} followed by the id encoded as {id_encoding}", "prefix": prefix,
                "id_encoding": id_encoding, "digest_to_int": "big-endian unsigned", "modulo": cfg.hash_buckets}

    inputs: dict[str, Any] = {
        "user_bucket": hashed("u:", "utf-8", "user_id (string)"),
        "item_bucket": hashed("i:", "uint64 big-endian (8 bytes)", "item_id (non-negative integer)"),
        "content": {"dtype": "float32", "shape": ["n", cfg.content_dim],
                    "source": "the item's vector in the item collection: normalize(E(item text)) under the "
                              "frozen encoder; the very vector the trainer read, never recomputed"},
    }
    if cfg.history_items:
        inputs[HISTORY_INPUT] = {
            "dtype": "float32", "shape": ["n", cfg.content_dim], "history_items": cfg.history_items,
            "source": f"the user's last {cfg.history_items} distinct clicked items BEFORE the request (most recent "
                      "click of an item counts), their vectors in the item collection averaged and L2-normalised; "
                      "all zeros for a user without clicks (workers/history.py history_profile)"}
    if cfg.anchor_cross:
        inputs[ANCHOR_CROSS_INPUT] = {
            "dtype": "float32", "shape": ["n", ANCHOR_CROSS_DIM], "columns": ["best", "top2_mean"],
            "source": "the user's current anchor set: the points of the anchors collection (settings "
                      "qdrant.anchors_collection) with ids anchor_point_id(user_id, slot) (workers/anchors/policy.py), "
                      "the newest generated_at among them; per candidate the cosines of its item vector (the content "
                      "input) with those anchor vectors: column 0 their max, column 1 the mean of the two largest "
                      "(the max again for a set of one anchor); all zeros for a user without anchors "
                      "(workers/anchor_cross.py anchor_cross)"}
    return {
        "inputs": inputs,
        "outputs": {
            "logit": {"dtype": "float32", "shape": ["n"], "meaning": "click logit"},
            "probability": {"dtype": "float32", "shape": ["n"], "meaning": "sigmoid(logit): click probability"},
        },
    }


def sample_key(sample_id: str) -> int:
    """64-bit signed hash of a sample id: what the trainer's seen-set stores (8 bytes, fits int64)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    hash_buckets: int
    id_dim: int
    hidden: int
    content_dim: int
    seed: int = 0
    history_items: int = 0  # 0: no behaviour input (checkpoints from before it load as such)
    anchor_cross: int = 0  # 1: the anchor cross feature is an input (0 for checkpoints from before it)

    @classmethod
    def from_settings(cls, t: TrainerSettings, content_dim: int) -> ModelConfig:
        return cls(
            hash_buckets=t.hash_buckets,
            id_dim=t.id_dim,
            hidden=t.hidden,
            content_dim=content_dim,
            seed=t.seed,
            history_items=t.history_items,
            anchor_cross=int(t.anchor_cross),
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{k: int(d[k]) for k in ("hash_buckets", "id_dim", "hidden", "content_dim", "seed")},
                   history_items=int(d.get("history_items", 0)), anchor_cross=int(d.get("anchor_cross", 0)))


class PreRanker(nn.Module):
    """f(u, i) -> click logit from hashed ids, the frozen content vector and (optionally) the user's history."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.id_dim
        h = 2 * d + 1 if cfg.history_items else 0  # projected history, history x content, cos(history, item)
        h += ANCHOR_CROSS_DIM if cfg.anchor_cross else 0  # best and top-2 mean anchor cosine, as they are
        # Same seed, same initial weights, without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.user_emb = nn.Embedding(cfg.hash_buckets, d)
            self.item_emb = nn.Embedding(cfg.hash_buckets, d)
            self.content = nn.Linear(cfg.content_dim, d)
            self.mlp = nn.Sequential(nn.Linear(5 * d + h, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))
            # small id embeddings: an unseen id starts near "no opinion" instead of N(0, 1) noise
            nn.init.normal_(self.user_emb.weight, std=0.05)
            nn.init.normal_(self.item_emb.weight, std=0.05)
            # created last: a model without history draws exactly the weights it always drew
            self.history = nn.Linear(cfg.content_dim, d) if cfg.history_items else None

    def forward(self, users: torch.Tensor, items: torch.Tensor, vectors: torch.Tensor,
                history: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n,) from user buckets (n,), item buckets (n,), content vectors (n, content_dim) and, for a
        model with ``history_items``, history profiles (n, content_dim; zeros for a user without clicks), for
        a model with ``anchor_cross``, the anchor cross feature (n, 2; zeros for a user without anchors)."""
        u = self.user_emb(users)
        i = self.item_emb(items)
        c = self.content(vectors)
        parts = [u, i, c, u * c, u * i]
        if self.history is not None:
            if history is None:
                raise ValueError("this pre-ranker reads the user's history: pass the history profiles")
            hp = self.history(history)
            parts += [hp, hp * c, (history * vectors).sum(1, keepdim=True)]
        if self.cfg.anchor_cross:
            if anchor is None:
                raise ValueError("this pre-ranker reads the anchor cross feature: pass it (workers/anchor_cross.py)")
            parts.append(anchor)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)

    def logits(
        self, user_ids: Sequence[str], item_ids: Sequence[int] | np.ndarray, item_vectors: np.ndarray,
        history: np.ndarray | None = None, anchor: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Hash the raw ids and run the network (with grad; training goes through here too)."""
        b = self.cfg.hash_buckets
        return self(
            torch.from_numpy(user_buckets(user_ids, b)),
            torch.from_numpy(item_buckets(item_ids, b)),
            torch.as_tensor(np.asarray(item_vectors, dtype=np.float32)),
            None if history is None else torch.as_tensor(np.asarray(history, dtype=np.float32)),
            None if anchor is None else torch.as_tensor(np.asarray(anchor, dtype=np.float32)),
        )

    @torch.no_grad()
    def score(
        self, user_ids: Sequence[str], item_ids: Sequence[int] | np.ndarray, item_vectors: np.ndarray,
        history: np.ndarray | None = None, anchor: np.ndarray | None = None,
    ) -> np.ndarray:
        """Click probabilities (float32, n) for inference and offline evaluation."""
        was_training = self.training
        self.eval()
        try:
            if len(user_ids) == 0:
                return np.zeros(0, np.float32)
            p = torch.sigmoid(self.logits(user_ids, item_ids, item_vectors, history, anchor))
            return p.numpy().astype(np.float32)
        finally:
            self.train(was_training)


def loss_weights(is_pseudo: np.ndarray, weight: np.ndarray, pseudo_lambda: float) -> np.ndarray:
    """Per-sample weight of the objective: 1 for exposed samples, λ·w for pseudo-labeled ones."""
    return np.where(np.asarray(is_pseudo, bool), pseudo_lambda * np.asarray(weight, np.float32), 1.0).astype(
        np.float32
    )


def whole_logit(p: float | np.ndarray) -> np.ndarray:
    """logit(p), p clamped to [1e-6, 1 − 1e-6] as the rank term clamps it: the offset of a label that is all
    prior (its residual is then constant and the request carries no order)."""
    q = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


def listwise_kl(logits: torch.Tensor, labels: torch.Tensor, group: torch.Tensor, temperature: float,
                offset: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over groups of KL(softmax((logit(ỹ) − o)/T) ‖ softmax((f − o)/T)) · T², per group of rows
    (``group``: int64 ids, any order; ``o`` the ``offset``, 0 when None).

    With ``o`` the priors' part of each label's logit the term ranks by the *residual* over the priors:
    its optimum is still f = logit(ỹ) + c, but popular candidates no longer hold most of the target's mass.
    Groups of one row, and groups whose target has no spread (a residual of priors-only labels is constant),
    carry no order and are left out; 0 when no group is left."""
    if logits.numel() == 0:
        return logits.sum()
    _, g = torch.unique(group, return_inverse=True)
    n_groups = int(g.max()) + 1
    size = torch.zeros(n_groups, dtype=logits.dtype).index_add_(0, g, torch.ones_like(logits))
    y = labels.clamp(1e-6, 1 - 1e-6)
    o = offset if offset is not None else torch.zeros_like(logits)
    t = (torch.logit(y) - o) / temperature
    s = (logits - o) / temperature
    t_max = torch.full((n_groups,), -torch.inf, dtype=t.dtype).scatter_reduce(0, g, t, "amax")
    t_min = torch.full((n_groups,), torch.inf, dtype=t.dtype).scatter_reduce(0, g, t, "amin")
    # a spread under 1e-3 logits is float noise, not an order (a priors-only residual in float32)
    ordered = (size >= 2) & ((t_max - t_min) * temperature > 1e-3)
    keep = ordered[g]
    if not bool(keep.any()):
        return logits.sum() * 0.0

    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        mx = torch.full((n_groups,), -torch.inf, dtype=x.dtype).scatter_reduce(0, g, x.detach(), "amax")
        e = torch.exp(x - mx[g])
        return x - mx[g] - torch.log(torch.zeros(n_groups, dtype=x.dtype).index_add(0, g, e))[g]

    lq, ls = log_softmax(t), log_softmax(s)
    per_row = torch.exp(lq) * (lq - ls)
    per_group = torch.zeros(n_groups, dtype=logits.dtype).index_add(0, g, torch.where(keep, per_row, 0.0))
    return per_group[ordered].mean() * temperature**2


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·BCE(logit, label) / n: soft labels allowed (ỹ in [0, 1])."""
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (weights * per).sum() / max(int(logits.shape[0]), 1)


@dataclass
class Batch:
    """One mini-batch as arrays; ``weight`` is the sample's own confidence w (used only for pseudo)."""

    user_ids: list[str]
    item_ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, content_dim)
    labels: np.ndarray  # float32 (n,)
    weight: np.ndarray  # float32 (n,)
    is_pseudo: np.ndarray  # bool (n,)
    history: np.ndarray | None = None  # float32 (n, content_dim): for a model with history_items
    group: np.ndarray | None = None  # int64 (n,): the row's request, for the rank term (pseudo rows only)
    offset: np.ndarray | None = None  # float32 (n,): each label's prior part (trainer.rank_target=residual)
    anchor: np.ndarray | None = None  # float32 (n, 2): the anchor cross feature, for a model with anchor_cross

    def __len__(self) -> int:
        return len(self.user_ids)


def make_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam, fused when this torch build supports it on CPU (same update rule, ~2.5x faster over the dense
    hash-bucket embedding tables: measured 9 ms vs 24 ms a step)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


@dataclass(frozen=True)
class RankTerm:
    """The listwise term of the objective: its weight beside the pointwise loss and its temperature."""

    weight: float = 0.0
    temperature: float = 1.0
    target: str = "label"  # "label": the labels' logits; "residual": minus each label's priors part

    @classmethod
    def from_settings(cls, t: TrainerSettings) -> RankTerm:
        return cls(t.rank_weight, t.rank_temperature, t.rank_target)


def objective_step(opt: torch.optim.Optimizer, logits: torch.Tensor, labels: np.ndarray, is_pseudo: np.ndarray,
                   weight: np.ndarray, pseudo_lambda: float, *, group: np.ndarray | None = None,
                   rank: RankTerm | None = None, offset: np.ndarray | None = None) -> dict[str, float]:
    """One optimizer step on L = Σ_exposed BCE(f, y) + λ · Σ_pseudo w · BCE(f, ỹ), given the batch's logits.

    The trainer and ``gpl eval`` (whose KD teacher has other inputs than the pre-ranker) both step through
    here, so every method of the comparison optimises exactly the stream's objective. Returns ``total``
    (the optimised value), the unweighted mean BCE of the ``exposed`` and ``pseudo`` parts and the
    listwise ``rank`` term (NaN when a part is absent). ``group`` (the row's request) and ``rank`` add the
    listwise term over each request's pseudo rows.
    """
    y = torch.from_numpy(np.asarray(labels, np.float32))
    pseudo_np = np.asarray(is_pseudo, bool)
    w = torch.from_numpy(loss_weights(pseudo_np, weight, pseudo_lambda))
    loss = weighted_bce(logits, y, w)
    ranked = float("nan")
    if rank is not None and rank.weight > 0 and group is not None and pseudo_np.any():
        sel = torch.from_numpy(pseudo_np)
        off = None
        if rank.target == "residual":
            if offset is None:
                raise ValueError("trainer.rank_target=residual needs each pseudo-label's prior logit")
            off = torch.from_numpy(np.asarray(offset, np.float32)[pseudo_np])
        term = listwise_kl(logits[sel], y[sel], torch.from_numpy(np.asarray(group, np.int64)[pseudo_np]),
                           rank.temperature, off)
        ranked = float(term.detach())
        loss = loss + rank.weight * term
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        per = F.binary_cross_entropy_with_logits(logits.detach(), y, reduction="none")
        pseudo = torch.from_numpy(pseudo_np)
        return {
            "total": float(loss.detach()),
            "exposed": float(per[~pseudo].mean()) if bool((~pseudo).any()) else float("nan"),
            "pseudo": float(per[pseudo].mean()) if bool(pseudo.any()) else float("nan"),
            "rank": ranked,
        }


def train_step(
    model: PreRanker, opt: torch.optim.Optimizer, batch: Batch, pseudo_lambda: float, rank: RankTerm | None = None
) -> dict[str, float]:
    """One step of the pre-ranker on a :class:`Batch` (see :func:`objective_step`)."""
    model.train()
    logits = model.logits(batch.user_ids, batch.item_ids, batch.vectors, batch.history, batch.anchor)
    return objective_step(opt, logits, batch.labels, batch.is_pseudo, batch.weight, pseudo_lambda,
                          group=batch.group, rank=rank, offset=batch.offset)
