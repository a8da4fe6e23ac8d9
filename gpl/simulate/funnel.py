"""The seeded recommender funnel around the real ratings: requests, recall, biased exposure, clicks.

The package docstring (``gpl/simulate/__init__.py``) says exactly what is simulated and why.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel

from gpl.simulate.movielens import MovieLens
from schemas.events import ExposureEvent, ItemEvent, RecallEvent

SOURCES = ("popular", "genre", "random")
_POP, _GENRE, _RANDOM = 0, 1, 2
_CELLS_PER_CHUNK = 1_000_000  # rows x columns processed at once: bounds memory for large recall sizes



@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulation; the module docstring says what each one means."""

    seed: int = 0
    users: int | None = None
    candidates: int = 200
    exposed: int = 10
    ratings_per_request: int = 5
    max_requests_per_user: int | None = 40
    positive_threshold: float = 4.0
    mix_popular: float = 0.4
    mix_genre: float = 0.4
    mix_random: float = 0.2
    popularity_power: float = 1.0
    exposure_popularity_weight: float = 1.0
    exposure_relevance_weight: float = 0.3
    exposure_noise: float = 0.1
    exposure_delay_ms: tuple[int, int] = (200, 2000)
    exposure_first_fraction: float = 0.05
    max_tags: int = 5
    time_origin_ms: int | None = None

    def __post_init__(self) -> None:
        if self.candidates < 1 or not 1 <= self.exposed <= self.candidates:
            raise ValueError("need 1 <= exposed <= candidates")
        if self.ratings_per_request < 1 or self.ratings_per_request > self.candidates:
            raise ValueError("need 1 <= ratings_per_request <= candidates (targets are injected into recall)")
        if self.max_requests_per_user is not None and self.max_requests_per_user < 1:
            raise ValueError("max_requests_per_user must be >= 1 or None")
        if self.users is not None and self.users < 1:
            raise ValueError("users must be >= 1 or None")
        mix = (self.mix_popular, self.mix_genre, self.mix_random)
        if min(mix) < 0 or sum(mix) <= 0:
            raise ValueError("recall mix weights must be >= 0 with a positive sum")
        lo, hi = self.exposure_delay_ms
        if not 0 <= lo <= hi:
            raise ValueError("exposure_delay_ms must be (lo, hi) with 0 <= lo <= hi")
        if not 0.0 <= self.exposure_first_fraction <= 1.0:
            raise ValueError("exposure_first_fraction must be in [0, 1]")

    @property
    def mix(self) -> np.ndarray:
        m = np.array([self.mix_popular, self.mix_genre, self.mix_random], dtype=np.float64)
        return m / m.sum()


@dataclass
class Simulation:
    """The simulated stream: catalogue, request events in emission order, and the hidden truth."""

    config: SimConfig
    items: list[ItemEvent]
    events: list[tuple[str, BaseModel]]
    truth: dict[tuple[str, int], int]
    exposure_first: set[str] = field(default_factory=set)  # request ids whose exposure precedes recall
    stats: dict[str, float] = field(default_factory=dict)


def _source_pattern(n: int, mix: np.ndarray) -> np.ndarray:
    """Route of each sampled column, so that every prefix respects the mix (largest deficit first).

    Candidates are taken column by column until the request is full, so a prefix-balanced pattern keeps
    the route proportions whatever the number of columns a request ends up using.
    """
    out = np.empty(n, dtype=np.int8)
    counts = np.zeros(len(mix))
    for j in range(n):
        s = int(np.argmax(mix * (j + 1) - counts))
        out[j] = s
        counts[s] += 1
    return out


def _plan_requests(ml: MovieLens, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user index, first rating index, number of targets, chunk number) of every request."""
    n_users = ml.n_users if cfg.users is None else min(cfg.users, ml.n_users)
    users: list[int] = []
    starts: list[int] = []
    lens: list[int] = []
    chunks: list[int] = []
    k = cfg.ratings_per_request
    for u in range(n_users):
        a, b = int(ml.user_start[u]), int(ml.user_start[u + 1])
        n_chunks = math.ceil((b - a) / k)
        keep = np.arange(n_chunks)
        if cfg.max_requests_per_user is not None and n_chunks > cfg.max_requests_per_user:
            spaced = np.linspace(0, n_chunks - 1, cfg.max_requests_per_user)
            keep = np.unique(np.round(spaced).astype(np.int64))
        for c in keep.tolist():
            s = a + c * k
            users.append(u)
            starts.append(s)
            lens.append(min(k, b - s))
            chunks.append(c)
    return (np.array(users, dtype=np.int64), np.array(starts, dtype=np.int64),
            np.array(lens, dtype=np.int64), np.array(chunks, dtype=np.int64))


def simulate(ml: MovieLens, cfg: SimConfig | None = None) -> Simulation:
    """Simulate the funnel over MovieLens; see the module docstring for the exact model.

    The cyclic garbage collector is paused meanwhile: millions of small pydantic objects are created
    and all stay alive, so every full collection would rescan them (measured: the run took 3x as long).
    They hold no reference cycles, so nothing is lost by not looking for any.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(ml, cfg or SimConfig())
    finally:
        if enabled:
            gc.enable()


def _simulate(ml: MovieLens, cfg: SimConfig) -> Simulation:
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    n_items, n_genres = ml.n_items, len(ml.genre_names)
    K, E = cfg.candidates, cfg.exposed
    mix = cfg.mix
    thr = cfg.positive_threshold

    req_user, req_start, req_len, req_chunk = _plan_requests(ml, cfg)
    R = len(req_user)

    # popularity route: P(item) ∝ count ** power. With power 1 that is "the item of a uniformly drawn
    # rating", a plain gather; otherwise inverse-CDF sampling.
    pop = ml.popularity.astype(np.float64)
    pop_score = (np.log1p(pop) / np.log1p(max(pop.max(), 1.0))).astype(np.float32)
    pop_w = np.where(pop > 0, pop ** cfg.popularity_power, 0.0)
    pop_cdf = np.cumsum(pop_w) / pop_w.sum()
    # genre route: items of each genre, concatenated, with offsets
    genre_members = [np.flatnonzero(ml.item_genres[:, g]) for g in range(n_genres)]
    genre_size = np.array([len(m) for m in genre_members], dtype=np.int64)
    genre_off = np.concatenate([[0], np.cumsum(genre_size)[:-1]]).astype(np.int64)
    genre_flat = np.concatenate(genre_members).astype(np.int64)
    genre_global = genre_size / genre_size.sum()
    hot_t = ml.item_genres.T.astype(np.float64)  # [G, I]
    # positives' genre counts before each rating index: cum[k] = sum over ratings < k
    pos_hot = ml.item_genres[ml.r_item] & (ml.r_rating >= thr)[:, None]
    cum_pos = np.zeros((len(ml.r_item) + 1, n_genres), dtype=np.int32)
    np.cumsum(pos_hot, axis=0, out=cum_pos[1:])

    max_t = cfg.ratings_per_request
    n_sampled = max(int(math.ceil(1.6 * K)) + 16, K)
    M = max_t + n_sampled
    pattern = _source_pattern(n_sampled, mix)
    col_src = np.concatenate([np.full(max_t, -1, dtype=np.int8), pattern])
    cols_pop, cols_gen, cols_rnd = (np.flatnonzero(pattern == s) for s in (_POP, _GENRE, _RANDOM))

    sel = np.full((R, K), -1, dtype=np.int64)  # chosen item indices, -1 = padding
    sel_src = np.zeros((R, K), dtype=np.int8)
    sel_score = np.zeros((R, K), dtype=np.float32)
    sel_aff = np.zeros((R, K), dtype=np.float32)
    sel_rating = np.full((R, K), np.nan, dtype=np.float32)  # the user's rating of the candidate, NaN: never

    # Rows are processed in chunks; a chunk's users form a contiguous range (requests are in user
    # order), so a dense [users, items] table of rating indices answers every lookup with one gather.
    rows_per_chunk = max(16, min(_CELLS_PER_CHUNK // M, 4 * _CELLS_PER_CHUNK // max(n_items, 1)))
    for c0 in range(0, R, rows_per_chunk):
        rows = np.arange(c0, min(R, c0 + rows_per_chunk))
        n = len(rows)
        u, s, tl = req_user[rows], req_start[rows], req_len[rows]
        u0, u1 = int(u[0]), int(u[-1])
        a, b = int(ml.user_start[u0]), int(ml.user_start[u1 + 1])
        table = np.full((u1 - u0 + 1, n_items), -1, dtype=np.int64)
        table[ml.r_user[a:b] - u0, ml.r_item[a:b]] = np.arange(a, b)
        ul = (u - u0)[:, None]

        cand = np.full((n, M), -1, dtype=np.int64)
        # injected targets
        t_idx = s[:, None] + np.arange(max_t)[None, :]
        t_ok = np.arange(max_t)[None, :] < tl[:, None]
        cand[:, :max_t] = np.where(t_ok, ml.r_item[np.minimum(t_idx, len(ml.r_item) - 1)], -1)
        # route draws
        if len(cols_pop):
            if cfg.popularity_power == 1.0:
                draws = ml.r_item[rng.integers(0, len(ml.r_item), (n, len(cols_pop)))]
            else:
                draws = np.minimum(np.searchsorted(pop_cdf, rng.random((n, len(cols_pop))), side="right"),
                                   n_items - 1)
            cand[:, max_t + cols_pop] = draws
        w = (cum_pos[s] - cum_pos[ml.user_start[u]]).astype(np.float64)
        cold = w.sum(1) == 0
        w[cold] = genre_global
        w_norm = w / w.sum(1, keepdims=True)
        if len(cols_gen):
            # one searchsorted for all rows: row r's CDF is shifted by r
            shift = np.arange(n, dtype=np.float64)[:, None]
            flat_cdf = (np.cumsum(w_norm, axis=1) + shift).ravel()
            q = rng.random((n, len(cols_gen))) + shift
            g = np.searchsorted(flat_cdf, q, side="right") - (shift * n_genres).astype(np.int64)
            g = np.clip(g, 0, n_genres - 1)
            within = np.floor(rng.random((n, len(cols_gen))) * genre_size[g]).astype(np.int64)
            cand[:, max_t + cols_gen] = genre_flat[genre_off[g] + within]
        if len(cols_rnd):
            cand[:, max_t + cols_rnd] = rng.integers(0, n_items, (n, len(cols_rnd)))
        # filter: padding, consumed history, duplicates (first occurrence wins)
        r_index = table[ul, np.maximum(cand, 0)]
        history = (r_index >= 0) & (r_index < s[:, None])
        order = np.argsort(cand, axis=1, kind="stable")
        srt = np.take_along_axis(cand, order, 1)
        dup = np.zeros_like(history)
        np.put_along_axis(dup, order[:, 1:], srt[:, 1:] == srt[:, :-1], 1)
        valid = (cand >= 0) & ~history & ~dup
        keep = valid & (np.cumsum(valid, axis=1) <= K)
        full = keep.sum(1) == K
        chosen = np.full((n, K), -1, dtype=np.int64)
        chosen_src = np.zeros((n, K), dtype=np.int8)
        chosen[full] = cand[full][keep[full]].reshape(-1, K)
        chosen_src[full] = np.broadcast_to(col_src, cand.shape)[full][keep[full]].reshape(-1, K)
        for r in np.flatnonzero(~full).tolist():  # rare: route draws collided too often; top up uniformly
            got = cand[r][keep[r]].tolist()
            srcs = col_src[keep[r]].tolist()
            taken = set(got) | set(ml.r_item[ml.user_start[u[r]]:s[r]].tolist())
            for it in rng.permutation(n_items).tolist():
                if len(got) >= K:
                    break
                if it not in taken:
                    got.append(it)
                    srcs.append(_RANDOM)
                    taken.add(it)
            chosen[r, :len(got)] = got
            chosen_src[r, :len(srcs)] = srcs
        ok = chosen >= 0
        safe = np.maximum(chosen, 0)
        # float64 and rounded: the ranking below must not depend on how many BLAS threads summed it
        aff_all = np.round(w_norm.astype(np.float64) @ hot_t, 9).astype(np.float32)
        aff = np.take_along_axis(aff_all, safe, 1)  # [n, I] -> [n, K]
        aff[~ok] = 0.0
        # targets borrow a route from the mix (genre only when the user has an affinity to them)
        is_t = chosen_src == -1
        draw = np.searchsorted(np.cumsum(mix)[:-1], rng.random((n, K)), side="right").astype(np.int8)
        alt = np.where(rng.random((n, K)) * (mix[_POP] + mix[_RANDOM]) < mix[_POP], _POP, _RANDOM)
        draw = np.where((draw == _GENRE) & (aff <= 0), alt, draw).astype(np.int8)
        chosen_src = np.where(is_t, draw, chosen_src)
        rnd_score = rng.random((n, K)).astype(np.float32)
        score = np.select([chosen_src == _POP, chosen_src == _GENRE], [pop_score[safe], aff], rnd_score)
        ri = table[ul, safe]
        rating = np.where(ok & (ri >= 0), ml.r_rating[np.maximum(ri, 0)], np.nan)
        sel[rows], sel_src[rows], sel_score[rows], sel_aff[rows], sel_rating[rows] = (
            chosen, chosen_src, score, aff, rating)

    # biased exposure policy
    valid = sel >= 0
    ex_score = (cfg.exposure_popularity_weight * pop_score[np.maximum(sel, 0)]
                + cfg.exposure_relevance_weight * sel_aff
                + cfg.exposure_noise * rng.standard_normal((R, K)).astype(np.float32))
    ex_score = np.where(valid, ex_score, -np.inf)
    e = min(E, K)
    top = np.argsort(-ex_score, axis=1, kind="stable")[:, :e]
    exposed_items = np.take_along_axis(sel, top, 1)
    clicked = np.take_along_axis(sel_rating, top, 1) >= thr  # NaN (never rated) compares False

    # times and emission order
    lo, hi = cfg.exposure_delay_ms
    ts_r = ml.r_ts[req_start] * 1000 if R else np.zeros(0, dtype=np.int64)
    if cfg.time_origin_ms is not None and R:
        ts_r = ts_r - ts_r.min() + cfg.time_origin_ms
    ts_e = ts_r + rng.integers(lo, hi + 1, R)
    first = rng.random(R) < cfg.exposure_first_fraction
    seq = np.arange(R, dtype=np.int64)
    key_ts = np.concatenate([ts_r, np.where(first, ts_r, ts_e)])
    key_seq = np.concatenate([2 * seq + 1, np.where(first, 2 * seq, 2 * seq + 2)])
    emission = np.lexsort((key_seq, key_ts))

    # build the contracts (candidates listed by descending score, ties by item id, padding last)
    user_str = [str(x) for x in ml.user_ids.tolist()]
    movie = ml.item_ids
    safe_sel = np.maximum(sel, 0)
    o = np.lexsort((movie[safe_sel], -sel_score, ~valid), axis=1)
    ids_rows = np.take_along_axis(movie[safe_sel], o, 1).tolist()
    score_rows = np.take_along_axis(sel_score, o, 1).astype(np.float64).round(6).tolist()
    src_rows = np.array(SOURCES)[np.take_along_axis(sel_src, o, 1)].tolist()
    n_valid = valid.sum(1).tolist()
    shown = exposed_items >= 0
    ex_rows = movie[np.maximum(exposed_items, 0)].tolist()
    click_rows = clicked.tolist()
    n_shown = shown.sum(1).tolist()
    recalls: list[RecallEvent] = []
    exposures: list[ExposureEvent] = []
    for r in range(R):
        rid = f"ml-{user_str[req_user[r]]}-{req_chunk[r]}"
        uid = user_str[req_user[r]]
        nv = n_valid[r]
        recalls.append(RecallEvent.model_validate({
            "request_id": rid, "user_id": uid, "ts": int(ts_r[r]),
            "item_ids": ids_rows[r][:nv], "scores": score_rows[r][:nv], "sources": src_rows[r][:nv],
        }))
        ns = n_shown[r]
        exposures.append(ExposureEvent.model_validate({
            "request_id": rid, "user_id": uid, "ts": int(ts_e[r]),
            "items": [{"item_id": i, "position": p, "clicked": c} for p, (i, c) in
                      enumerate(zip(ex_rows[r][:ns], click_rows[r][:ns], strict=True))],
        }))
    events: list[tuple[str, BaseModel]] = []
    for k in emission.tolist():
        events.append(("recall", recalls[k]) if k < R else ("exposure", exposures[k - R]))

    item_ts = int(ts_r.min()) if R else 0
    items = [
        ItemEvent(item_id=int(movie[i]), text=ml.item_text(i, cfg.max_tags),
                  category=ml.genres[i][0] if ml.genres[i] else "", ts=item_ts)
        for i in range(n_items)
    ]

    known = ~np.isnan(sel_rating)
    tu, tc = np.nonzero(known)
    keys = req_user[tu] * n_items + sel[tu, tc]
    keys, first_at = np.unique(keys, return_index=True)
    labels = (sel_rating[tu, tc][first_at] >= thr).astype(np.int64)
    truth = {
        (user_str[k // n_items], int(movie[k % n_items])): v
        for k, v in zip(keys.tolist(), labels.tolist(), strict=True)
    }

    exposed_mask = np.zeros_like(valid)
    np.put_along_axis(exposed_mask, top, True, 1)
    exposed_mask &= valid
    unexposed = valid & ~exposed_mask
    known_unexp = known & unexposed
    n_unexposed = max(int(unexposed.sum()), 1)
    n_cands = int(valid.sum())
    n_exposed = int((exposed_items >= 0).sum())
    stats: dict[str, float] = {
        "users": float(len(np.unique(req_user))),
        "requests": float(R),
        "items": float(n_items),
        "candidates_per_request": n_cands / max(R, 1),
        "exposed_per_request": n_exposed / max(R, 1),
        "unexposed_per_request": int(unexposed.sum()) / max(R, 1),
        "clicks": float(clicked.sum()),
        "click_rate": float(clicked.sum()) / max(n_exposed, 1),
        "unexposed_known_fraction": int(known_unexp.sum()) / n_unexposed,
        "unexposed_positive_fraction": int((known_unexp & (sel_rating >= thr)).sum()) / n_unexposed,
        "exposure_first": float(first.sum()),
        "truth_pairs": float(len(truth)),
        "seconds": time.perf_counter() - t0,
    }
    first_ids = {recalls[r].request_id for r in np.flatnonzero(first).tolist()}
    return Simulation(config=cfg, items=items, events=events, truth=truth, exposure_first=first_ids,
                      stats=stats)
