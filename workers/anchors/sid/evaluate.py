"""Held-out next-item hit rate of SID anchors, side by side with simple anchor baselines.

The question GPL asks of anchors is "does some anchor land near what the user will like?", so the
metric is HR@K-anchors×N: for each test user (history -> held-out next positive, temporal split,
workers/anchors/sid/split.py) the K anchors are computed from the history alone, each anchor's N nearest items
by cosine over *all* item vectors are taken, and the case is a hit when the held-out item is among the
union. Rank is computed as "items scoring strictly higher than the target" (< N means inside the top N;
exact ties are counted in the target's favour, they do not occur with float vectors in practice).

Arms, all from the same histories and the same item vectors:

* ``sid_centroid`` / ``sid_decoded`` — the SID generator's K beams, vectors from the centroid of the
  items with that semantic code / from the RQ-VAE decoder (one beam search serves both);
* ``recent`` — the K most recent distinct positives' own vectors (the fallback of the text route);
* ``popular`` — the vectors of the K items with the most positives among the test users' histories
  (no user signal at all: the floor).

``sid_code_hit`` is the generator's own hit rate: the held-out item's semantic code among the K beams.

``*_tail`` repeats every rate over the test cases whose held-out item is *not* in the head: the
``head_fraction`` most popular items by positives in the test users' histories. GPL exists for the
long tail, and a held-out "next positive" is dominated by blockbusters, so both views are reported.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from workers.anchors.sid.generator import SIDAnchorGenerator


def _hits(anchors: np.ndarray, target: np.ndarray, vectors: np.ndarray, topn: int) -> bool:
    """Is ``target`` among the ``topn`` nearest items of any anchor (rows of ``anchors``)?"""
    if len(anchors) == 0:
        return False
    scores = anchors @ vectors.T  # (k, n)
    s_target = anchors @ target  # (k,)
    higher = (scores > s_target[:, None] + 1e-7).sum(1)
    return bool((higher < topn).any())


def evaluate_sid(
    generator: SIDAnchorGenerator,
    item_ids: np.ndarray,
    item_vectors: np.ndarray,
    test: Mapping[int, tuple[Sequence[int], int]],
    ks: Sequence[int] = (4,),
    topn: int = 10,
    *,
    max_users: int | None = None,
    batch_users: int = 64,
    head_fraction: float = 0.05,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """HR@K×``topn`` of every arm for each K in ``ks`` over the test users (see the module docstring).

    Users whose held-out item has no vector are skipped (counted in ``skipped``). One beam search per
    user at max(ks), ``batch_users`` users per model call (the top-k of a beam search whose width is at
    least max(ks) is the prefix of its top-K); ``progress(n)`` hears how many users each batch covered.
    """
    t0 = time.perf_counter()
    ids = np.asarray(item_ids, np.int64)
    vecs = np.ascontiguousarray(item_vectors, dtype=np.float32)
    row = {int(i): r for r, i in enumerate(ids.tolist())}
    k_max = max(ks)
    users = sorted(test)
    if max_users is not None:
        users = users[:max_users]
    pop = Counter(i for u in users for i in test[u][0] if int(i) in row)
    ranked = [row[i] for i, _ in pop.most_common()]
    popular_rows = ranked[:k_max]
    head = set(ranked[: int(round(head_fraction * len(ids)))])
    levels = generator.tokenizer.levels
    arms = ("sid_centroid", "sid_decoded", "recent", "popular")
    hits = {(arm, k, tail): 0 for arm in arms for k in ks for tail in (False, True)}
    code_hits = {(k, tail): 0 for k in ks for tail in (False, True)}
    n_anchors = dict.fromkeys(ks, 0)
    evaluated = skipped = tail_cases = 0
    cases = []
    for u in users:
        history, target_id = test[u]
        t_row = row.get(int(target_id))
        if t_row is None:
            skipped += 1
        else:
            cases.append((list(history), int(target_id), t_row))
    empty = np.zeros((0, vecs.shape[1]), np.float32)
    for s in range(0, len(cases), batch_users):
        chunk = cases[s : s + batch_users]
        beams = generator.generate_sids_many([c[0] for c in chunk], k_max)
        for (history, target_id, t_row), sids in zip(chunk, beams, strict=True):
            evaluated += 1
            in_tail = t_row not in head
            tail_cases += in_tail
            target = vecs[t_row]
            t_sid = generator.tokenizer.sid_of(target_id)
            tok = generator.tokenizer
            cent = np.stack([tok.vector_of_prefix(p, "centroid") for p, _ in sids]) if sids else empty
            dec = np.stack([tok.vector_of_prefix(p, "decoded") for p, _ in sids]) if sids else empty
            recent: list[int] = []
            for i in reversed(history):
                r = row.get(int(i))
                if r is not None and r not in recent:
                    recent.append(r)
                if len(recent) == k_max:
                    break
            for k in ks:
                n_anchors[k] += min(k, len(sids))
                code_hit = t_sid is not None and any(p[:levels] == t_sid[:levels] for p, _ in sids[:k])
                arm_hits = {
                    "sid_centroid": _hits(cent[:k], target, vecs, topn),
                    "sid_decoded": _hits(dec[:k], target, vecs, topn),
                    "recent": _hits(vecs[recent[:k]], target, vecs, topn),
                    "popular": _hits(vecs[popular_rows[:k]], target, vecs, topn),
                }
                for tail in {False, in_tail}:  # every case counts overall, tail cases also in the tail
                    code_hits[(k, tail)] += code_hit
                    for arm, hit in arm_hits.items():
                        hits[(arm, k, tail)] += hit
        if progress is not None:
            progress(len(chunk))
    denom, tail_denom = max(evaluated, 1), max(tail_cases, 1)
    result: dict[str, Any] = {
        "users": evaluated, "skipped": skipped, "tail_users": tail_cases, "head_items": len(head),
        "topn": topn, "ks": list(ks), "seconds": round(time.perf_counter() - t0, 2),
    }
    for k in ks:
        result[f"k{k}"] = {
            **{f"hr_{arm}": hits[(arm, k, False)] / denom for arm in arms},
            "sid_code_hit": code_hits[(k, False)] / denom,
            **{f"hr_{arm}_tail": hits[(arm, k, True)] / tail_denom for arm in arms},
            "sid_code_hit_tail": code_hits[(k, True)] / tail_denom,
            "mean_anchors": n_anchors[k] / denom,
        }
    return result
