"""A semi-synthetic, unbiased MovieLens benchmark: a fitted click oracle inside the funnel simulator.

Why: on the plain MovieLens funnel (``gpl eval movielens``) ~95% of unexposed candidates have no label
and the labels that exist say "liked given watched", so neither pseudo-labels nor the entire-space
ranking can be scored against what the user would have clicked. The debiasing literature's answer
(Schnabel et al. 2016; Saito et al. 2020) is an *oracle* that gives every (user, item) pair a click
probability, from which every label, exposed or not, is drawn: then the truth is known everywhere.

Oracle
    Logistic matrix factorisation on the FULL user × item matrix of MovieLens-small (610 × 9,742):
    ``logit(u, i) = mu + b_u + b_i + <p_u, q_i>``, target 1 iff the user rated the item ≥ 4.0 and 0 for
    every other cell (rated lower *or never rated*), unweighted Bernoulli likelihood + L2, full-batch
    Adam (300 steps, lr 0.05). Rank 64 and L2 1e-6 (:data:`RANK`, :data:`L2`) were chosen once on a 10%
    random cell hold-out by log-loss (rank 16/32/64 × L2 1e-6/3e-6; 64, 1e-6 had log-loss 0.02754, AUC
    0.957; 1e-7 overfits); :func:`select_oracle` reruns that grid (3 min), the build fits once (~40 s)
    and caches the logits by (ratings digest, config).
    Why "rated ≥ 4 among all films" and not "among rated films": a click needs wanting *and* liking;
    an oracle fitted on rated pairs only would make obscure well-liked films as clickable as the
    blockbusters of the user's genre. Why no item content in the oracle: the method under test scores
    by content similarity, an oracle on the same vectors would hand it the answer.
    Click probability ``P = sigmoid(logit + c)`` with one global offset ``c`` so that the mean P over all
    simulated recall candidates is ``target_ctr`` (0.05).

Labels
    ONE Bernoulli draw ``Z(u, i) ~ P(u, i)`` per (user, item) pair (seed 10007 + seed): the click when
    the pair is exposed, the truth when not (the dataset format keys truth by (user, item); a repeated
    impression gets the same answer — a clicked item that reappears unexposed is a sure positive).

Funnel (reused, not rewritten)
    :func:`gpl.simulate.simulate` makes the requests, the 200-candidate recall and the biased exposure
    of TRAINING requests exactly as for ``gpl eval movielens``; the split is the same per-user rule
    (each user's last 20% of requests, ≥ 1, are test). TEST requests get **uniform random exposure**
    (10 of the recall, random positions, seed 20011 + seed): an A/B-like slice, so ``ex_*`` metrics are
    unbiased there. ``truth.jsonl`` holds Z for every (user, candidate) pair of every request.

Measured (seed 0): 12,027 requests (9,417 train / 2,610 test); mean P over candidates 0.050; CTR of
the biased training exposures 0.26 vs 0.038 for the random test exposures; truth known for 100% of
unexposed candidates, 4.1% of them positive.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gpl.simulate.export import built_with
from gpl.simulate.funnel import SimConfig, simulate
from gpl.simulate.movielens import DEFAULT_PATH, MovieLens, load_movielens
from schemas.events import ExposureEvent, RecallEvent

FORMAT = "gpl-eval-dataset/1"
RANK = 64  # chosen on a 10% cell hold-out (module docstring; select_oracle reruns the grid)
L2 = 1e-6
GRID = ((16, 1e-6), (32, 1e-6), (32, 3e-6), (64, 1e-6))


@dataclass(frozen=True)
class OracleConfig:
    rank: int = RANK
    l2: float = L2  # on factors and biases, relative to the mean per-cell log-loss
    steps: int = 300
    lr: float = 0.05
    seed: int = 0
    threshold: float = 4.0


def _targets(ml: MovieLens, threshold: float) -> np.ndarray:
    y = np.zeros((ml.n_users, ml.n_items), np.float32)
    pos = ml.r_rating >= threshold
    y[ml.r_user[pos], ml.r_item[pos]] = 1.0
    return y


def fit_lmf(y: np.ndarray, mask: np.ndarray | None, cfg: OracleConfig) -> np.ndarray:
    """Full-batch logistic MF on ``y`` (cells where ``mask`` is True, all when None); the (U, I) logits."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    n_u, n_i = y.shape
    target = torch.from_numpy(y)
    m = torch.from_numpy(mask.astype(np.float32)) if mask is not None else None
    n = float(mask.sum()) if mask is not None else float(n_u * n_i)
    base = float(np.clip(y[mask].mean() if mask is not None else y.mean(), 1e-6, 1 - 1e-6))
    mu = torch.tensor([math.log(base / (1 - base))], requires_grad=True)
    bu = torch.zeros(n_u, requires_grad=True)
    bi = torch.zeros(n_i, requires_grad=True)
    p = (0.01 * torch.randn(n_u, cfg.rank, generator=g)).requires_grad_()
    q = (0.01 * torch.randn(n_i, cfg.rank, generator=g)).requires_grad_()
    opt = torch.optim.Adam([mu, bu, bi, p, q], lr=cfg.lr)
    for _ in range(cfg.steps):
        z = mu + bu[:, None] + bi[None, :] + p @ q.T
        ll = torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="none")
        if m is not None:
            ll = ll * m
        loss = ll.sum() / n + cfg.l2 * ((p**2).sum() + (q**2).sum() + (bu**2).sum() + (bi**2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (mu + bu[:, None] + bi[None, :] + p @ q.T).numpy().astype(np.float32)


def select_oracle(ml: MovieLens, cfg: OracleConfig = OracleConfig(), grid: tuple[tuple[int, float], ...] = GRID
                  ) -> list[dict[str, float]]:
    """Held-out log-loss and AUC of each (rank, l2) on a 10% random cell hold-out (how RANK/L2 were chosen)."""
    from workers.labeling.calibrator import binary_auc, logloss

    y = _targets(ml, cfg.threshold)
    held = np.random.default_rng(cfg.seed).random(y.shape) < 0.1
    out = []
    for rank, l2 in grid:
        z = fit_lmf(y, ~held, replace(cfg, rank=rank, l2=l2))[held].astype(np.float64)
        p = 1 / (1 + np.exp(-z))
        out.append({"rank": rank, "l2": l2, "heldout_logloss": logloss(p, y[held]),
                    "heldout_auc": binary_auc(z, y[held])})
    return out


def oracle_logits(ml: MovieLens, cfg: OracleConfig, cache_dir: Path | None) -> np.ndarray:
    """The oracle fitted on every cell, cached under ``cache_dir`` by (ratings digest, config)."""
    h = hashlib.blake2b(digest_size=8)
    for a in (ml.user_ids, ml.item_ids, ml.r_user, ml.r_item, ml.r_rating):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    path = cache_dir / f"oracle-{h.hexdigest()}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        return np.load(path)
    logits = fit_lmf(_targets(ml, cfg.threshold), None, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, logits)
        tmp.replace(path)
    return logits


def offset_for(logits: np.ndarray, target: float) -> float:
    """Global offset c with mean(sigmoid(logits + c)) == target (bisection; the mean is monotone in c)."""
    lo, hi = -20.0, 20.0
    z = logits.astype(np.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 / (1 + np.exp(-(z + mid)))).mean() < target else (lo, mid)
    return (lo + hi) / 2


def build_semisynth(out_dir: Path | str, *, seed: int = 0, target_ctr: float = 0.05, test_fraction: float = 0.2,
                    data: Path | str = DEFAULT_PATH, users: int | None = None, oracle: OracleConfig = OracleConfig(),
                    cache_dir: Path | None = None, force: bool = False) -> Path:
    """Write events.jsonl, truth.jsonl, split.json, meta.json and oracle.npz into ``out_dir``; returns it.

    Idempotent: a directory whose meta.json records the same configuration is left as it is.
    ``users`` limits the simulated users (the oracle is still fitted on every user: tests use few steps).
    """
    out = Path(out_dir)
    config = {"seed": seed, "target_ctr": target_ctr, "test_fraction": test_fraction, "users": users,
              "data": str(Path(data).resolve()), "oracle": asdict(oracle), "v": 1}
    key, built = built_with(out, config, force=force)
    if built:
        return out
    meta_file = out / "meta.json"
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ml = load_movielens(data)
    logits = oracle_logits(ml, oracle, cache_dir)
    sim = simulate(ml, SimConfig(seed=seed, users=users))
    uidx = {str(u): k for k, u in enumerate(ml.user_ids.tolist())}
    iidx = {int(m): k for k, m in enumerate(ml.item_ids.tolist())}
    recalls = {ev.request_id: ev for topic, ev in sim.events if topic == "recall" and isinstance(ev, RecallEvent)}
    cu = np.concatenate([np.full(len(r.item_ids), uidx[r.user_id]) for r in recalls.values()])
    ci = np.concatenate([np.array([iidx[i] for i in r.item_ids]) for r in recalls.values()])
    offset = offset_for(logits[cu, ci], target_ctr)
    prob = (1.0 / (1.0 + np.exp(-(logits + offset)))).astype(np.float32)
    z = np.random.default_rng(10_007 + seed).random(prob.shape) < prob  # one opinion per (user, item)

    by_user: dict[str, list[int]] = {}
    for r in recalls.values():
        by_user.setdefault(r.user_id, []).append(r.ts)
    per_user: dict[str, int] = {}
    for u, stamps in by_user.items():
        stamps.sort()
        if len(stamps) >= 2:
            per_user[u] = stamps[len(stamps) - max(1, math.ceil(test_fraction * len(stamps)))]
    split_doc = {"test_start_ms": max(r.ts for r in recalls.values()) + 1, "user_test_start_ms": per_user,
                 "rule": f"per-user: last {test_fraction:.0%} of each user's requests (>= 1) are test"}

    ex_rng = np.random.default_rng(20_011 + seed)
    n_click = {"train": 0, "test": 0}
    n_exp = {"train": 0, "test": 0}
    tmp = out / ".events.jsonl.tmp"
    with open(tmp, "wb") as f:
        for it in sim.items:
            f.write(orjson.dumps({"topic": "items", "value": it.model_dump(mode="json")}) + b"\n")
        for topic, ev in sim.events:
            v = ev.model_dump(mode="json")
            if topic == "exposure" and isinstance(ev, ExposureEvent):
                ui = uidx[ev.user_id]
                rec = recalls[ev.request_id]
                part = "test" if rec.user_id in per_user and rec.ts >= per_user[rec.user_id] else "train"
                if part == "test":  # random exposure: uniform draw of the recall, random positions
                    cands = rec.item_ids
                    pick = ex_rng.choice(len(cands), size=min(len(ev.items), len(cands)), replace=False)
                    ids = [cands[j] for j in pick.tolist()]
                else:
                    ids = [x.item_id for x in sorted(ev.items, key=lambda x: x.position)]
                v["items"] = [{"item_id": i, "position": p, "clicked": bool(z[ui, iidx[i]])} for p, i in enumerate(ids)]
                n_exp[part] += len(ids)
                n_click[part] += sum(x["clicked"] for x in v["items"])
            f.write(orjson.dumps({"topic": topic, "value": v}) + b"\n")
    tmp.replace(out / "events.jsonl")
    pairs = np.unique(cu * ml.n_items + ci)
    pu, pi = pairs // ml.n_items, pairs % ml.n_items
    user_str = [str(x) for x in ml.user_ids.tolist()]
    with open(out / "truth.jsonl", "wb") as f:
        for a, b in zip(pu.tolist(), pi.tolist(), strict=True):
            f.write(orjson.dumps({"user_id": user_str[a], "item_id": int(ml.item_ids[b]), "label": int(z[a, b])})
                    + b"\n")
    (out / "split.json").write_text(json.dumps(split_doc, sort_keys=True))
    np.savez_compressed(out / "oracle.npz", user_ids=ml.user_ids, item_ids=ml.item_ids, probs=prob,
                        offset=np.float64(offset))
    meta: dict[str, Any] = {
        "format": FORMAT, "name": f"semisynth-seed{seed}", "config": config, "config_key": key,
        "simulated": (
            "semi-synthetic: clicks and truth are Bernoulli draws (one per user-item pair) from a logistic-MF "
            "oracle fitted on all MovieLens ratings (rated>=4 vs everything else), offset so the mean click "
            f"probability over recall candidates is {target_ctr}; recall and the biased exposure of training "
            "requests from gpl/simulate; TEST requests have uniform random exposure (10 of the recall)"),
        "oracle": {**asdict(oracle), "offset": offset, "temperature": 1.0, "target_ctr": target_ctr},
        "stats": {
            "pairs_with_truth": int(len(pairs)), "mean_p_candidates": float(prob[cu, ci].mean()),
            "truth_positive_rate_candidates": float(z[cu, ci].mean()),
            "train_exposed_ctr": n_click["train"] / max(n_exp["train"], 1),
            "test_random_exposed_ctr": n_click["test"] / max(n_exp["test"], 1),
            "seconds": time.perf_counter() - t0,
        },
        "source": "gpl.simulate.semisynth.build_semisynth",
    }
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def default_dir(data_dir: Path, seed: int = 0) -> Path:
    """Where ``gpl eval semisynth`` builds the dataset: ``<data_dir>/eval/datasets/semisynth-seed<S>``."""
    return Path(data_dir) / "eval" / "datasets" / f"semisynth-seed{seed}"


__all__ = ["OracleConfig", "RANK", "L2", "GRID", "build_semisynth", "default_dir", "fit_lmf", "offset_for",
           "oracle_logits", "select_oracle"]
