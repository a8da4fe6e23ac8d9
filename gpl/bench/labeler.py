"""Benchmarks that are measurements, not tests: ``python -m gpl.bench.labeler [--batches N ...]``.

``bench_labeler`` times the labeler's fast path as the worker runs it (consecutive requests decoded by
:func:`schemas.fast_codec.decode_unexposed`, then labeled ``MICRO_BATCH`` at a time by
:func:`workers.labeler.assemble.label_many`, stage by stage: orjson → arrays → hash lookup → one
gather → one (N, K) matmul → features → sampling → orjson) on synthetic data, and, side by side in
the same run and interleaved repeat by repeat so both see the same machine state, the naive way of
writing the same stage: the contract decoded with pydantic, a per-candidate Python loop mapping item
ids to matrix rows, the same vectorised scoring and sampling, and pydantic ``Sample``/``SampleBatch``
objects encoded by ``schemas.codec.encode``. Both produce the same samples (checked before timing).

One core: the target is candidates per second *per core*, and a (8 x 384) x (384 x 1000) matmul would
otherwise spread over BLAS threads. Run as a program, this module pins OpenBLAS/OpenMP/MKL to one
thread through the environment before numpy is imported; called as a function (numpy already loaded),
it pins them with ``threadpoolctl`` when that is installed, and reports what it got in ``blas_threads``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # must happen before numpy is imported, or BLAS has already started threads
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from gpl.bench.labeler_reference import naive, same_samples  # noqa: E402
from runtime.settings import LabelerSettings  # noqa: E402
from schemas.events import Anchor, AnchorSet  # noqa: E402
from schemas.fast_codec import decode_unexposed
from streams.join import encode_unexposed  # noqa: E402
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.assemble import MICRO_BATCH, Labeling, label_decoded, label_many
from workers.labeler.calibrator import Calibrator
from workers.labeler.features import FEATURES
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.matching import MatrixDtype, choose_dtype, time_dtypes
from workers.labeler.sampling import reads_scores, sample

ENCODER = "bench-encoder"


@contextlib.contextmanager
def single_thread() -> Iterator[str]:
    """Pin BLAS/OpenMP pools to one thread for the block; yields a description of what is in effect."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:  # environment variables (set by __main__) are then the only pin
        yield f"env OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
        return
    with threadpool_limits(limits=1):
        info = threadpool_info()
        yield ",".join(f"{p.get('internal_api')}={p.get('num_threads')}" for p in info) or "no pools"


def synthetic(candidates: int = 1000, k: int = 8, dim: int = 384, batches: int = 2000, items: int = 20000,
              users: int = 64, seed: int = 0, label_source: str = "calibrator", dtype: MatrixDtype = "float32",
              top_n: int = 0) -> tuple[Labeling, list[bytes]]:
    """An item matrix, an anchor cache of ``users`` users and ``batches`` encoded UnexposedBatches.

    Anchors are noisy copies of random items, so similarities spread like real ones (a few close
    candidates, a long tail) instead of all sitting near 0 as random vectors would. ``dtype`` is the item
    matrix's; the data (and the anchors, taken from float32 rows) do not depend on it. ``calibrator`` (the
    default, as in production) labels through a calibrator over the default features with fixed
    coefficients; ``map`` through the fixed logistic map. ``top_n`` > 0 replaces ``top_n`` of the
    shipped draw (``random_n`` = ``cap`` = 40) by the most similar candidates, so every candidate is scored.
    """
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, 2**62, size=items + items // 10 + 16, dtype=np.int64))[:items]
    rng.shuffle(ids)
    vecs = rng.standard_normal((items, dim)).astype(np.float32)
    exact = ItemMatrix(collection=f"items__{ENCODER}", encoder=ENCODER)  # float32: the anchors' source
    exact.add(ids, vecs)
    matrix = exact
    if dtype != "float32":  # same items in another dtype; anchors stay those of float32, for comparisons
        matrix = ItemMatrix(collection=f"items__{ENCODER}", encoder=ENCODER, dtype=dtype)
        matrix.add(ids, vecs)
    cache = AnchorBook(ENCODER, matrix)
    for u in range(users):
        base = exact.gather(rng.choice(len(exact), k, replace=False))
        anchors = base + 0.6 * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(dim)
        cache.put(AnchorSet(
            user_id=f"user-{u}", version=1, model="bench-llm", prompt_hash="p0", encoder=ENCODER,
            generated_at=1_000, history=ids[rng.choice(items, 8, replace=False)].tolist(),
            anchors=[Anchor(text=f"interest {j}", vector=a.tolist(), logprob=float(-rng.random()))
                     for j, a in enumerate(anchors)],
        ))
    cfg = LabelerSettings(label_source=label_source, top_n=top_n,  # type: ignore[arg-type]
                          random_n=LabelerSettings().random_n - top_n)
    cal = Calibrator(features=FEATURES, mean=(0.3, 0.25, 0.1, 0.3, 2.0, 1.0, -1.0), scale=(0.1,) * 4 + (1.0,) * 3,
                     coef=(0.8, 0.1, 0.2, 0.3, 0.5, 0.2, 0.4), intercept=-2.5, monotone="s1", encoder=ENCODER,
                     catalogue="bench")
    raws = []
    for b in range(batches):
        cand = ids[rng.choice(items, candidates, replace=False)]
        # as the streams stage writes them by default: ids only, packed (schema_version 2)
        raws.append(encode_unexposed(f"req-{b}", f"user-{b % users}", 2_000 + b, cand, None))
    return Labeling(cache, matrix, cfg, calibrator=cal), raws


def fast(ctx: Labeling) -> Callable[[bytes], bytes]:
    def run(raw: bytes) -> bytes:
        return label_decoded(decode_unexposed(raw), ctx)[0]
    return run


def max_label_difference(ctx: Labeling, ref: Labeling, raws: list[bytes]) -> dict[str, float]:
    """Largest |label| and |similarity| difference of ``ctx``'s samples against ``ref``'s (float32),
    sample by sample (same ids: with ``top_n = 0`` the draw does not depend on the similarities)."""
    worst = {"label": 0.0, "similarity": 0.0, "weight": 0.0}
    f, g = fast(ctx), fast(ref)
    for raw in raws:
        mine = {x["sample_id"]: x for x in orjson.loads(f(raw))["samples"]}
        for y in orjson.loads(g(raw))["samples"]:
            x = mine[y["sample_id"]]
            for key in worst:
                worst[key] = max(worst[key], abs(x[key] - y[key]))
    return {k: round(v, 6) for k, v in worst.items()}


Chunk = Callable[[range], object]
"""What the benchmark times: one call labels (or scores) the requests of a range of indices."""


def _by_index(fn: Callable[[int], object]) -> Chunk:
    def run(chunk: range) -> None:
        for i in chunk:
            fn(i)
    return run


def by_micro_batch(ctx: Labeling, raws: list[bytes], micro: int = MICRO_BATCH) -> Chunk:
    """The labeler's path as the worker runs it: consecutive requests decoded, then labeled ``micro``
    at a time by :func:`~workers.labeler.assemble.label_many` (stage by stage)."""
    def run(chunk: range) -> None:
        for s in range(chunk.start, chunk.stop, micro):
            label_many([decode_unexposed(raws[i]) for i in range(s, min(s + micro, chunk.stop))], ctx)
    return run


def one_by_one(ctx: Labeling, raws: list[bytes]) -> Chunk:
    """The same path one request at a time (:func:`~workers.labeler.assemble.label_decoded`)."""
    f = fast(ctx)
    return _by_index(lambda i: f(raws[i]))


def limit(ctx: Labeling, raws: list[bytes]) -> Callable[[int], object]:
    """The limit proxy of request ``i``: gather + product + max alone, in the matrix's dtype, on the
    request's own (already looked-up) rows and its user's anchors; nothing else of the path."""
    pre = []
    for raw in raws:
        b = decode_unexposed(raw)
        entry = ctx.cache.get(b.user_id)
        assert entry is not None
        pre.append((ctx.items.lookup(b.item_ids)[0], entry.vectors))
    best = ctx.items.best

    def run(i: int) -> object:
        rows, anchors = pre[i]
        return best(rows, anchors)
    return run


def stage_breakdown(ctx: Labeling, raws: list[bytes]) -> dict[str, float]:
    """Median CPU µs per request of each stage of the path, to say where the time goes: ``decode``
    (orjson → arrays), ``lookup`` (id → row), ``match`` (gather + product of the candidates the policy
    scores: all of them with a top part, else only the ``cap`` drawn), ``label_encode`` (the rest of
    :func:`label_decoded`: sampling, features, labels, weights, orjson; its total minus lookup and
    match, each measured separately on the same batch)."""
    clock = time.thread_time
    acc: dict[str, list[float]] = {"decode": [], "lookup": [], "match": [], "label_encode": []}
    cfg = ctx.cfg
    for raw in raws:
        t0 = clock()
        b = decode_unexposed(raw)
        t1 = clock()
        rows, _ = ctx.items.lookup(b.item_ids)
        t2 = clock()
        entry = ctx.cache.get(b.user_id)
        assert entry is not None
        if not reads_scores(cfg.top_n, cfg.cap):
            rows = rows[sample(len(rows), 0, cfg.random_n, cfg.cap, ctx.rng(b.request_id))]
        ctx.items.similarities(rows, entry.vectors)
        t3 = clock()
        label_decoded(b, ctx)
        t4 = clock()
        acc["decode"].append(t1 - t0)
        acc["lookup"].append(t2 - t1)
        acc["match"].append(t3 - t2)
        acc["label_encode"].append(max((t4 - t3) - (t3 - t1), 0.0))
    return {k: round(float(np.median(v)) * 1e6, 1) for k, v in acc.items()}


def stage_breakdown_many(ctx: Labeling, raws: list[bytes], micro: int = MICRO_BATCH) -> dict[str, float]:
    """Mean CPU µs per request of each stage of :func:`~workers.labeler.assemble.label_many`, run as
    the worker runs it: ``decode``, ``arrive`` (lookup, counts, the draw of a policy without a top
    part), ``score`` (gather + product), ``label`` (features, calibrator), ``choose`` (sampling,
    labels of the chosen, weights), ``encode`` (orjson)."""
    times: dict[str, float] = {"decode": 0.0}
    for s in range(0, len(raws), micro):
        t0 = time.thread_time()
        bs = [decode_unexposed(raw) for raw in raws[s : s + micro]]
        times["decode"] += time.thread_time() - t0
        label_many(bs, ctx, times)
    return {k: round(v / max(len(raws), 1) * 1e6, 1) for k, v in times.items()}


def bench_labeler(candidates: int = 1000, k: int = 8, dim: int = 384, batches: int = 2000, items: int = 20000,
                  *, per_repeat: int = 50, seed: int = 0, dtype: MatrixDtype = "auto") -> dict[str, Any]:
    """Median / p10 / p90 candidates per second (one thread) of the labeler's path, its limit and the naive loop.

    In ONE run, interleaved repeat by repeat so all see the same machine state: ``path_<dtype>``
    (decode → lookup → gather → match → sample → label → orjson, fixed map; as the worker runs it, in
    micro-batches of ``MICRO_BATCH`` consecutive requests: :func:`by_micro_batch`) for both matrix dtypes;
    ``limit_<dtype>`` (gather + product + max alone, same dtype: what the hardware allows);
    ``naive`` (pydantic in and out, a per-candidate id→row loop); ``path_calibrated`` (the production
    labels: a calibrator over features and priors, chosen dtype). These use the shipped draw (40 of the
    candidates, uniformly), which reads no score: the path draws first and matches only the drawn ones
    (:func:`~workers.labeler.pseudo_labels.label_candidates`), so it can pass the limit proxy, which scores
    all. ``path_calibrated_top10`` takes the 10 most probable and draws 30: every candidate is matched
    and gets features, the path to set against the limit (``ratio_top10_limit``; the same path one request
    at a time, :func:`one_by_one`: ``path_calibrated_top10_one_by_one``). ``path`` and ``limit`` repeat the
    figures of the dtype ``dtype`` resolves to (``auto``: the start-up self-test, whose timings are in
    ``dtype_self_test_us``). ``ratio_path_limit`` = median path / median limit;
    ``max_diff_vs_float32`` the largest pseudo-label (and similarity, weight) difference of
    bfloat16 labels against float32 ones on the benchmark's requests; ``stages_cpu_us`` where a
    request's time goes (:func:`stage_breakdown`), ``stages_top10_cpu_us`` the same for the top-10 path
    stage by stage (:func:`stage_breakdown_many`).

    ``batches`` requests are split into repeats of ``per_repeat``; the throughput of a repeat is
    ``per_repeat * candidates / seconds``. Two clocks: wall time (``median_cand_per_s``) and the
    thread's own CPU time (``cpu``: time the thread was descheduled does not count, so it stays
    meaningful on a shared machine). ``loadavg_1m`` says how busy the machine was.
    """
    import torch

    torch.set_num_threads(1)
    self_test = time_dtypes(dim, k=k, n=candidates)
    chosen = choose_dtype(dtype, dim, k=k, n=candidates, timings=self_test)
    ref, raws = synthetic(candidates, k, dim, batches, items, seed=seed, label_source="map", dtype="float32")
    bf, _ = synthetic(candidates, k, dim, 0, items, seed=seed, label_source="map", dtype="bfloat16")
    cal_ctx, _ = synthetic(candidates, k, dim, 0, items, seed=seed, dtype=chosen)
    ranked, _ = synthetic(candidates, k, dim, 0, items, seed=seed, dtype=chosen, top_n=10)
    impls: dict[str, Chunk] = {}
    for name, c in (("path_float32", ref), ("path_bfloat16", bf), ("path_calibrated", cal_ctx),
                    ("path_calibrated_top10", ranked)):
        impls[name] = by_micro_batch(c, raws)
    impls["path_calibrated_top10_one_by_one"] = one_by_one(ranked, raws)
    slow = naive(ref)
    impls["naive"] = _by_index(lambda i: slow(raws[i]))
    impls["limit_float32"] = _by_index(limit(ref, raws))
    impls["limit_bfloat16"] = _by_index(limit(bf, raws))
    for raw in raws[:5]:  # same answers, and warm the paths up
        assert same_samples(fast(ref)(raw), slow(raw)), "fast and naive paths disagree"
    for impl in impls.values():
        impl(range(min(len(raws), MICRO_BATCH)))
    diff = max_label_difference(bf, ref, raws[: min(len(raws), 200)])
    rates: dict[str, list[float]] = {name: [] for name in impls}
    cpu_rates: dict[str, list[float]] = {name: [] for name in impls}
    load_before = os.getloadavg()[0]  # other processes on the machine: read the figures against it
    names = list(impls)
    with single_thread() as threads:
        for r, start in enumerate(range(0, len(raws), per_repeat)):
            chunk = range(start, min(start + per_repeat, len(raws)))
            for name in names if r % 2 == 0 else names[::-1]:
                run = impls[name]
                c0, t0 = time.thread_time(), time.perf_counter()
                run(chunk)
                t1, c1 = time.perf_counter(), time.thread_time()
                rates[name].append(len(chunk) * candidates / (t1 - t0))
                cpu_rates[name].append(len(chunk) * candidates / max(c1 - c0, 1e-9))
    out: dict[str, Any] = {"candidates": candidates, "k": k, "dim": dim, "batches": len(raws), "items": items,
                           "per_repeat": per_repeat, "repeats": len(rates["naive"]), "blas_threads": threads,
                           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                           "dtype": chosen, "dtype_requested": dtype,
                           "dtype_self_test_us": {"float32": round(self_test[0] * 1e6),
                                                  "bfloat16": round(self_test[1] * 1e6)},
                           "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    for name, xs in rates.items():
        q = np.percentile(xs, [10, 50, 90])
        qc = np.percentile(cpu_rates[name], [10, 50, 90])
        out[name] = {"median_cand_per_s": round(statistics.median(xs)), "p10_cand_per_s": round(float(q[0])),
                     "p90_cand_per_s": round(float(q[2])),
                     "cpu": {"median_cand_per_s": round(float(qc[1])), "p10_cand_per_s": round(float(qc[0])),
                             "p90_cand_per_s": round(float(qc[2]))}}

    out["path"], out["limit"] = out[f"path_{chosen}"], out[f"limit_{chosen}"]  # the chosen dtype's

    def ratio(a: str, b: str, clock: str = "") -> float:
        x, y = (out[a]["cpu"], out[b]["cpu"]) if clock else (out[a], out[b])
        return round(x["median_cand_per_s"] / y["median_cand_per_s"], 3)

    out["ratio_path_limit"] = ratio("path", "limit")
    out["ratio_path_limit_cpu"] = ratio("path", "limit", "cpu")
    out["ratio_path_naive"] = ratio("path", "naive")
    out["ratio_path_float32"] = ratio("path", "path_float32")
    out["ratio_top10_limit"] = ratio("path_calibrated_top10", "limit")
    out["ratio_top10_limit_cpu"] = ratio("path_calibrated_top10", "limit", "cpu")
    out["ratio_top10_one_by_one_limit"] = ratio("path_calibrated_top10_one_by_one", "limit")
    out["ratio_path_limit_by_dtype"] = {d: ratio(f"path_{d}", f"limit_{d}") for d in ("float32", "bfloat16")}
    out["max_diff_vs_float32"] = {"dtype": "bfloat16", **diff}
    with single_thread():
        out["stages_cpu_us"] = {d: stage_breakdown(c, raws[: min(len(raws), 300)])
                                for d, c in (("float32", ref), ("bfloat16", bf))}
        out["stages_top10_cpu_us"] = stage_breakdown_many(ranked, raws[: min(len(raws), 320)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpl.bench.labeler", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["labeler"])
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    a = ap.parse_args(argv)
    res = bench_labeler(a.candidates, a.k, a.dim, a.batches, a.items, dtype=a.dtype)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
