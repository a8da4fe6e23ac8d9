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

Labels (``draws``)
    ``"request"`` (the default): an independent Bernoulli draw ``Z(r, i) ~ P(u, i)`` for every candidate ``i``
    of every request ``r`` (seed 10007 + seed, requests in time order): the click when the candidate is
    exposed, the truth when not. A pair's click in training says nothing about its click in test beyond
    P(u, i), as for a real user who sees an item again on another day. ``truth.jsonl`` has one line per
    request: ``{"request_id", "user_id", "positive_item_ids"}``; every other candidate of it is 0.
    ``"pair"`` (the old world, kept for comparison): ONE draw ``Z(u, i)`` per (user, item) pair, shared
    by every request that recalls it; truth lines are ``{"user_id", "item_id", "label"}``. Measured there:
    28% of test positives were pairs the user had clicked in training, so a method could win by
    remembering pairs (the ``fresh`` evaluation scope exists for that reason).

Positive control (``content_share`` > 0, :mod:`gpl.simulate.taste`)
    The oracle logit gains ``beta * cos(liked-item profile of the user, item)`` in the frozen content
    space, beta solved so the term explains ``content_share`` of the within-request variance; then the
    offset is re-solved. A world where similarity to the user's taste *is* part of the truth: if anchors
    cannot beat priors there, the learner is the bottleneck, not the signal.

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
from typing import Any, Protocol

import numpy as np
import orjson

from gpl.simulate.export import built_with
from gpl.simulate.funnel import SimConfig, simulate
from gpl.simulate.movielens import DEFAULT_PATH, MovieLens, load_movielens
from gpl.simulate.taste import explained_share, liked_profiles, taste_weight, within_request_moments
from schemas.events import Contract, ExposureEvent, ItemEvent, RecallEvent

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
    from workers.labeler.calibrator import binary_auc, logloss

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


class TextEncoder(Protocol):
    """What the positive-control world needs of an encoder: an id (part of the dataset's key) and vectors."""

    id: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


DRAWS = ("request", "pair")


def build_semisynth(out_dir: Path | str, *, seed: int = 0, target_ctr: float = 0.05, test_fraction: float = 0.2,
                    data: Path | str = DEFAULT_PATH, users: int | None = None, oracle: OracleConfig = OracleConfig(),
                    cache_dir: Path | None = None, force: bool = False, draws: str = "request",
                    content_share: float = 0.0, encoder: TextEncoder | None = None,
                    explore_share: float = 0.0) -> Path:
    """Write events.jsonl, truth.jsonl, split.json, meta.json and oracle.npz into ``out_dir``; returns it.

    Idempotent: a directory whose meta.json records the same configuration is left as it is.
    ``users`` limits the simulated users (the oracle is still fitted on every user: tests use few steps).
    ``draws`` and ``content_share``: the module docstring (``encoder`` is required for a positive control).
    ``explore_share``: that share of TRAINING requests (chosen by a hash of the request id) is exposed like the
    test requests, uniformly at random from the recall, and flagged ``exploration`` in its exposure event.
    """
    if not 0.0 <= explore_share < 1.0:
        raise ValueError(f"explore_share must be in [0, 1), got {explore_share}")
    if draws not in DRAWS:
        raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")
    if content_share and encoder is None:
        raise ValueError("a positive-control world (content_share > 0) needs the frozen encoder")
    out = Path(out_dir)
    config = {"seed": seed, "target_ctr": target_ctr, "test_fraction": test_fraction, "users": users,
              "data": str(Path(data).resolve()), "oracle": asdict(oracle), "v": 2, "draws": draws,
              "content_share": content_share, "encoder": encoder.id if content_share and encoder else None,
              **({"explore_share": explore_share} if explore_share else {})}
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
    taste: dict[str, float] = {}
    if content_share and encoder is not None:
        logits, taste = _add_taste(ml, sim.items, iidx, logits, cu, ci, recalls, content_share, oracle, encoder)
    offset = offset_for(logits[cu, ci], target_ctr)
    prob = (1.0 / (1.0 + np.exp(-(logits + offset)))).astype(np.float32)
    draw_rng = np.random.default_rng(10_007 + seed)
    z_pair = draw_rng.random(prob.shape) < prob if draws == "pair" else None  # one opinion per (user, item)
    z_req: dict[str, dict[int, bool]] = {}  # draws == "request": one opinion per (request, candidate)
    if z_pair is None:
        for rid in sorted(recalls, key=lambda r: (recalls[r].ts, r)):
            rec = recalls[rid]
            p_c = prob[uidx[rec.user_id], [iidx[i] for i in rec.item_ids]]
            z_req[rid] = dict(zip(rec.item_ids, (draw_rng.random(len(p_c)) < p_c).tolist(), strict=True))

    def clicked(rid: str, user: int, item: int) -> bool:
        if z_pair is not None:
            return bool(z_pair[user, iidx[item]])
        got = z_req[rid].get(item)
        if got is None:  # an exposed item outside the recall: drawn once, remembered for the truth
            got = z_req[rid][item] = bool(draw_rng.random() < prob[user, iidx[item]])
        return got

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
    n_click = {"train": 0, "test": 0, "explore": 0}
    n_exp = {"train": 0, "test": 0, "explore": 0}
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
                if part == "train" and explore_share and _unit_hash(ev.request_id) < explore_share:
                    part = "explore"
                    v["exploration"] = True
                if part != "train":  # random exposure: uniform draw of the recall, random positions
                    cands = rec.item_ids
                    pick = ex_rng.choice(len(cands), size=min(len(ev.items), len(cands)), replace=False)
                    ids = [cands[j] for j in pick.tolist()]
                else:
                    ids = [x.item_id for x in sorted(ev.items, key=lambda x: x.position)]
                v["items"] = [{"item_id": i, "position": p, "clicked": clicked(ev.request_id, ui, i)}
                              for p, i in enumerate(ids)]
                n_exp[part] += len(ids)
                n_click[part] += sum(x["clicked"] for x in v["items"])
            f.write(orjson.dumps({"topic": topic, "value": v}) + b"\n")
    tmp.replace(out / "events.jsonl")
    pairs = np.unique(cu * ml.n_items + ci)
    user_str = [str(x) for x in ml.user_ids.tolist()]
    with open(out / "truth.jsonl", "wb") as f:
        if z_pair is not None:
            for a, b in zip((pairs // ml.n_items).tolist(), (pairs % ml.n_items).tolist(), strict=True):
                f.write(orjson.dumps({"user_id": user_str[a], "item_id": int(ml.item_ids[b]),
                                      "label": int(z_pair[a, b])}) + b"\n")
        else:
            for rid, zs in z_req.items():
                f.write(orjson.dumps({"request_id": rid, "user_id": recalls[rid].user_id,
                                      "positive_item_ids": [i for i, y in zs.items() if y]}) + b"\n")
    truth_rate = (float(z_pair[cu, ci].mean()) if z_pair is not None
                  else sum(sum(zs.values()) for zs in z_req.values()) / max(sum(map(len, z_req.values())), 1))
    (out / "split.json").write_text(json.dumps(split_doc, sort_keys=True))
    np.savez_compressed(out / "oracle.npz", user_ids=ml.user_ids, item_ids=ml.item_ids, probs=prob,
                        offset=np.float64(offset))
    draw_text = ("an independent draw per (request, candidate)" if z_pair is None
                 else "ONE draw per user-item pair, shared by every request")
    taste_text = (f" plus a content-taste term explaining {content_share:.0%} of the within-request variance "
                  "(positive control)" if content_share else "")
    meta: dict[str, Any] = {
        "format": FORMAT, "name": world_name(seed, draws, content_share), "config": config, "config_key": key,
        "simulated": (
            f"semi-synthetic: clicks and truth are Bernoulli draws ({draw_text}) from a logistic-MF "
            f"oracle fitted on all MovieLens ratings (rated>=4 vs everything else){taste_text}, offset so the "
            f"mean click probability over recall candidates is {target_ctr}; recall and the biased exposure of "
            "training requests from gpl/simulate; TEST requests have uniform random exposure (10 of the recall)"),
        "oracle": {**asdict(oracle), "offset": offset, "temperature": 1.0, "target_ctr": target_ctr,
                   "draws": draws, **taste},
        "stats": {
            "pairs_with_truth": int(len(pairs)), "mean_p_candidates": float(prob[cu, ci].mean()),
            "truth_positive_rate_candidates": truth_rate,
            "train_exposed_ctr": n_click["train"] / max(n_exp["train"], 1),
            "test_random_exposed_ctr": n_click["test"] / max(n_exp["test"], 1),
            **({"exploration_exposures": n_exp["explore"],
                "exploration_ctr": n_click["explore"] / max(n_exp["explore"], 1)} if explore_share else {}),
            "seconds": time.perf_counter() - t0,
        },
        "source": "gpl.simulate.semisynth.build_semisynth",
    }
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def _add_taste(ml: MovieLens, items: list[ItemEvent], iidx: dict[int, int], logits: np.ndarray, cu: np.ndarray,
               ci: np.ndarray, recalls: dict[str, RecallEvent], share: float, oracle: OracleConfig,
               encoder: TextEncoder) -> tuple[np.ndarray, dict[str, float]]:
    """The positive-control oracle (gpl/simulate/taste.py): logits + beta * cos(liked profile, item)."""
    texts = [(iidx[it.item_id], it.text) for it in items if it.item_id in iidx]
    got = np.asarray(encoder.encode([t for _, t in texts]), np.float32)
    vecs = np.zeros((ml.n_items, got.shape[1]), np.float32)
    has = np.zeros(ml.n_items, bool)
    at = np.array([k for k, _ in texts], np.int64)
    vecs[at] = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    has[at] = True
    prof = liked_profiles(ml.n_users, ml.r_user, ml.r_item, ml.r_rating >= oracle.threshold, vecs, has)
    cos = prof @ vecs.T
    group = np.repeat(np.arange(len(recalls)), [len(r.item_ids) for r in recalls.values()])
    a, c = logits[cu, ci].astype(np.float64), cos[cu, ci].astype(np.float64)
    beta = taste_weight(*within_request_moments(a, c, group), share)
    info = {"content_share": share, "taste_beta": beta, "taste_share_measured": explained_share(a, c, group, beta),
            "taste_corr_with_mf": float(np.corrcoef(a, c)[0, 1])}
    return (logits + beta * cos).astype(np.float32), info


def world_name(seed: int, draws: str = "request", content_share: float = 0.0, explore_share: float = 0.0) -> str:
    """``semisynth[-taste<pct>][-pairdraw][-explore<pct>]-seed<S>``: one name per world, also its directory."""
    taste = f"-taste{round(100 * content_share)}" if content_share else ""
    pair = "-pairdraw" if draws == "pair" else ""
    explore = f"-explore{round(100 * explore_share)}" if explore_share else ""
    return f"semisynth{taste}{pair}{explore}-seed{seed}"


def _unit_hash(request_id: str) -> float:
    """A request's place in [0, 1): the same in every build, independent of the other random draws."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big") / 2.0**64


def read_world(d: Path) -> tuple[list[ItemEvent], list[tuple[str, Any]], list[tuple[str, Any]],
                                 dict[tuple[str, int], int]]:
    """(items, training events, test events, truth by (request id, item id) for the test requests): the
    world as the demo streams it (training events) and scores it (test events against the truth)."""
    split = orjson.loads((d / "split.json").read_bytes())
    per_user: dict[str, int] = split.get("user_test_start_ms", {})
    models: dict[str, type[Contract]] = {"items": ItemEvent, "recall": RecallEvent, "exposure": ExposureEvent}
    events = [(o["topic"], models[o["topic"]].model_validate(o["value"]))
              for o in map(orjson.loads, (d / "events.jsonl").read_bytes().splitlines())]
    items = [ev for t, ev in events if isinstance(ev, ItemEvent)]
    test_recalls = {ev.request_id: ev for t, ev in events if isinstance(ev, RecallEvent)
                    and ev.user_id in per_user and ev.ts >= per_user[ev.user_id]}
    train = [(t, ev) for t, ev in events if t != "items" and getattr(ev, "request_id", "") not in test_recalls]
    test = [(t, ev) for t, ev in events if t != "items" and getattr(ev, "request_id", "") in test_recalls]
    by_user: dict[str, list[RecallEvent]] = {}
    for rec in test_recalls.values():
        by_user.setdefault(rec.user_id, []).append(rec)
    truth: dict[tuple[str, int], int] = {}
    for t in map(orjson.loads, (d / "truth.jsonl").read_bytes().splitlines()):
        if "request_id" in t:
            hit = test_recalls.get(t["request_id"])
            if hit is not None:
                pos = set(t["positive_item_ids"])
                truth.update(((hit.request_id, i), int(i in pos)) for i in hit.item_ids)
        else:  # the one-draw-per-pair world: the pair's label holds for every test request that recalls it
            for rec in by_user.get(str(t["user_id"]), []):
                if int(t["item_id"]) in rec.item_ids:
                    truth[(rec.request_id, int(t["item_id"]))] = int(t["label"])
    return items, train, test, truth


def default_dir(data_dir: Path, seed: int = 0, draws: str = "request", content_share: float = 0.0,
                explore_share: float = 0.0) -> Path:
    """Where ``gpl eval semisynth`` builds the dataset: ``<data_dir>/eval/datasets/<world_name>``."""
    return Path(data_dir) / "eval" / "datasets" / world_name(seed, draws, content_share, explore_share)


__all__ = ["DRAWS", "GRID", "L2", "RANK", "OracleConfig", "TextEncoder", "build_semisynth", "default_dir",
           "fit_lmf", "offset_for", "oracle_logits", "read_world", "select_oracle", "world_name"]
