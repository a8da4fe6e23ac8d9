"""The offline comparison: every method, several seeds, one dataset, one table (docs/eval.md).

Order of work: load the dataset; embed the catalogue (cached); build anchors from TRAINING history
(LLM answers cached); then per seed: draw the shared uniform unexposed sample, train the teacher
(if KD/UKD run), and per method build its added rows, train the pre-ranker with the shared loop
(gpl/eval/methods.py), score every test candidate and compute the metrics (gpl/eval/metrics.py), and
judge the labels it added (gpl/eval/label_quality.py); at the end, summarise over seeds and describe
the inputs (gpl/eval/results.py), and write the report (gpl/eval/report.py).
Nothing is fitted or chosen on the test period: the calibrators are cross-fitted on training exposures, the
head/tail split on training exposures, and all settings come from :class:`runtime.settings.Settings`.

Evaluation scopes
    ``all``: every test request. ``fresh``: the same requests with only the candidates whose (user, item)
    pair was not exposed to that user in training (:func:`~gpl.eval.dataset.fresh_pairs`): no pair memory.
    ``anchored``: the test requests of users that had text anchors (when
    the LLM covers only a capped subset of users, this is where GPL can act at all).

Metrics (names in results.json)
    ``es_*`` entire space: ranking over the whole recall set of each test request, positives = clicks
    and truth-positive unexposed candidates, unknown labels count as non-positive; ``es_auc`` /
    ``es_gauc`` over the labeled candidates only (exposed + truth-known). ``ex_*``: the same over the
    exposed items only (the classic biased evaluation). ``tail_*``: long tail = items outside the 20%
    most-exposed in training. ``coverage@10`` / ``ild@10``: diversity of the entire-space top 10.
    ``pl_auc`` / ``pl_ece``: the method's soft labels on unexposed training candidates vs the truth,
    where the truth is known; ``pl_auc_all``: the same AUC over all its rows with unknown labels as
    negatives (does the label find the items the user rated highly among everything recalled?).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpl.eval.anchor_feature import attach as attach_anchor_cross
from gpl.eval.anchor_sources import SourceAnchors, pick_users, text_anchors, training_histories, vector_books
from gpl.eval.context import Context, Rows
from gpl.eval.dataset import EvalDataset, load_dataset, validation_view
from gpl.eval.embed import CachedEncoder, training_collab_space
from gpl.eval.gpl_rows import LABELS as GPL_LABELS
from gpl.eval.gpl_rows import SPECS, GPLRows
from gpl.eval.kd import KD_METHODS, Baselines
from gpl.eval.kd import LABELS as KD_LABELS
from gpl.eval.label_quality import PL_KEYS, closed_loop, pseudo_quality, student_fidelity
from gpl.eval.methods import StudentNet, fit, negatives_rows, predict, uniform_unexposed
from gpl.eval.results import anchors_report, dataset_report, summarise
from gpl.eval.scopes import CURVE_KS, HR_KS, Evaluator
from runtime.anchor_settings import MemoryAnchors, TransformersAnchors, as_backend
from runtime.encoder import Encoder, open_encoder
from runtime.redact import public_settings
from runtime.settings import Settings
from workers.anchors.generation_cache import GenerationCache
from workers.anchors.generators.base import AnchorGenerator
from workers.anchors.generators.memory import MemoryGenerator

log = logging.getLogger(__name__)

METHODS = ("exposed", "negatives", *KD_METHODS, *SPECS)
DEFAULT_METHODS = tuple(m for m in METHODS if m != "gpl-text")  # LLM anchors are opt-in (slow)
TEACHER = "teacher"
LABELS = {
    "exposed": "Exposed only",
    "negatives": "Unexposed as negatives",
    **KD_LABELS,
    **GPL_LABELS,
    TEACHER: "(ref) KD teacher: ranker + history",
}


@dataclass
class EvalConfig:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int = 3
    epochs: int = 2
    anchors: str = "llm"  # "llm" or "memory"
    max_llm_users: int | None = 150
    out: Path = Path("eval-results")
    cache_dir: Path | None = None
    progress: bool = True
    # measured on a busy 2-core box: SmolLM2 5.6 s/user with 1 thread, 29 s/user with 2
    llm_threads: int | None = 1
    torch_threads: int | None = 1  # training threads: 1 is fastest for these small steps on 2 shared cores
    plots: bool = True
    sid_epochs: int = 8  # epochs of the SID generator retrained on training clicks (workers/anchors/sid default)
    validation: bool = False  # the training-period-only view (gpl.eval.dataset.validation_view)
    space: str = "content"  # the frozen space: "content" (the encoder) or "collab" (runtime/collab_space.py)


def _generator(settings: Settings, cfg: EvalConfig) -> AnchorGenerator:
    if cfg.anchors == "memory":
        return MemoryGenerator(as_backend(settings.anchors, MemoryAnchors))
    from runtime.model_assets import ensure_llm
    from workers.anchors.generators.transformers_backend import TransformersGenerator

    # the LLM route whatever backend the stream serves: the anchors options it shares, defaults for the rest
    llm = as_backend(settings.anchors, TransformersAnchors)
    return TransformersGenerator(ensure_llm(settings.llm_dir), llm, threads=cfg.llm_threads)


def run_eval(
    dataset: Path | EvalDataset,
    settings: Settings,
    cfg: EvalConfig,
    *,
    encoder: Encoder | None = None,
    generator: AnchorGenerator | None = None,
) -> dict[str, Any]:
    """Run the comparison, write results.json / results.md / plots into ``cfg.out``; returns the results."""
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if cfg.anchors not in ("llm", "memory"):
        raise ValueError("anchors must be 'llm' or 'memory'")
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else settings.data_dir / "eval" / "cache"
    threads_before = torch.get_num_threads()
    try:
        return _run(dataset, settings, cfg, cache_dir, encoder, generator, t_start, timing)
    finally:
        torch.set_num_threads(threads_before)


def _run(
    dataset: Path | EvalDataset,
    settings: Settings,
    cfg: EvalConfig,
    cache_dir: Path,
    encoder: Encoder | None,
    generator: AnchorGenerator | None,
    t_start: float,
    timing: dict[str, float],
) -> dict[str, Any]:
    t = time.perf_counter()
    ds = dataset if isinstance(dataset, EvalDataset) else load_dataset(dataset)
    if cfg.validation:
        ds = validation_view(ds)
    timing["load"] = time.perf_counter() - t
    if not ds.is_test.any() or ds.is_test.all():
        raise ValueError(f"{ds.name}: the split leaves no {'test' if not ds.is_test.any() else 'training'} requests")

    t = time.perf_counter()
    enc = CachedEncoder(encoder or open_encoder(settings.encoder), cache_dir, progress=cfg.progress)
    item_vectors = enc.encode(ds.item_text, desc="embed items")
    space_info: dict[str, Any] = {"space": cfg.space}
    if cfg.space == "collab":  # fitted on the training period's clicks only
        space = training_collab_space(ds, item_vectors)
        item_vectors, space_info = space.vectors, space_info | {"name": space.name, **space.info}
    timing["embed_items"] = time.perf_counter() - t

    ctx = Context(ds, item_vectors, settings, epochs=cfg.epochs)
    histories = training_histories(ds, settings.anchors.history_items)
    text_needed = "gpl-text" in cfg.methods

    # anchors (training history only)
    t = time.perf_counter()
    books: dict[str, SourceAnchors] = {}
    anchor_users: list[int] = []
    stack = ExitStack()
    if text_needed:
        cap = cfg.max_llm_users if cfg.anchors == "llm" else None
        anchor_users = pick_users(ds, histories, cap)
        gen = generator or _generator(settings, cfg)
        cache = stack.enter_context(closing(GenerationCache(cache_dir / "anchor-cache",
                                                            settings.anchors.cache_max_entries)))

        def text_book(hists: dict[int, np.ndarray], users: list[int]) -> SourceAnchors:
            return text_anchors(ds, hists, users, gen, enc, cache, k=settings.anchors.k, kind=cfg.anchors,
                                legacy=cache_dir / "anchors.jsonl", batch=settings.anchors.batch_size,
                                progress=cfg.progress)

        books["text"] = text_book(histories, anchor_users)
        chosen = set(anchor_users)
        books["text"].make = lambda hists: text_book({u: h for u, h in hists.items() if u in chosen},
                                                     [u for u in hists if u in chosen]).users
    vbooks, unavailable = vector_books(settings, ds, histories, pick_users(ds, histories, None), item_vectors,
                                       cfg.methods, cache_dir=cache_dir, sid_epochs=cfg.sid_epochs,
                                       progress=cfg.progress)  # content, gpl-sid (gpl/eval/anchor_sources.py)
    books |= vbooks
    anchor_cross_info = attach_anchor_cross(ctx, ds, item_vectors, settings, books)  # trainer.anchor_cross only
    timing["anchors"] = time.perf_counter() - t
    anchored = set(books["text"].users) if "text" in books else set()
    ev = Evaluator(ds, ctx, item_vectors, anchored)

    # calibrators: cross-fitted on the training period, once per (anchor source, features): no randomness
    t = time.perf_counter()
    with stack:
        gpl = GPLRows(ds, item_vectors, settings, [m for m in cfg.methods if m in SPECS and m not in unavailable],
                      books)
    unavailable |= gpl.unavailable
    timing["calibrate"] = time.perf_counter() - t

    runs: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    pl: dict[str, dict[str, Any]] = {}
    extra_info: dict[str, Any] = {}
    closed: dict[str, Any] = {}
    if cfg.torch_threads:
        # measured on the 2-core box: 2 threads made an Adam step 5-20x slower than 1 (spin-waiting
        # OpenMP workers on a core another process holds); the LLM has its own llm_threads
        torch.set_num_threads(cfg.torch_threads)
    t = time.perf_counter()
    kd = Baselines(ctx, settings, cfg.methods, progress=cfg.progress)  # fair KD's calibrator: once per dataset
    unavailable |= kd.unavailable
    timing["calibrate_kd"] = time.perf_counter() - t
    run_methods = [m for m in cfg.methods if m not in unavailable]
    need_teacher = kd.needs_teacher
    train_time: dict[str, float] = {}
    seeds = list(range(cfg.seeds))
    outer = tqdm(
        total=len(seeds) * (len(run_methods) + need_teacher),
        desc="eval runs",
        unit="run",
        disable=not cfg.progress,
    )
    for seed in seeds:
        drawn = uniform_unexposed(ctx, settings.labeler.cap, seed)
        if need_teacher:
            t = time.perf_counter()
            teacher = kd.train_teacher(seed)
            tr = ctx.test_rows
            scores, _ = predict(teacher, ctx, ctx.row_user[tr], ds.item[tr], ctx.row_request[tr])
            runs.setdefault(TEACHER, {})[str(seed)] = {sc: ev.metrics(scores, sc) for sc in ev.scopes}
            train_time[TEACHER] = train_time.get(TEACHER, 0.0) + time.perf_counter() - t
            outer.update(1)
        for method in run_methods:
            t = time.perf_counter()
            extra = Rows.empty()
            soft: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
            if method == "negatives":
                extra = negatives_rows(ctx, drawn)
                soft = (drawn, np.zeros(len(drawn)), None)
            elif method in KD_METHODS:
                extra, kd_soft = kd.rows(method, seed, drawn)
                soft = (kd_soft.rows, kd_soft.p, kd_soft.w)
                if seed == 0:
                    extra_info[method] = kd_soft.info
            elif method in SPECS:
                labels = gpl.rows(method, seed)
                extra = ctx.rows_of(labels.rows, labels.p, labels.w, pseudo=True, offset=labels.prior)
                soft = (labels.rows, labels.p, labels.w)
                if seed == 0:
                    extra_info[method] = labels.info
                    if method == "gpl":
                        closed[method] = closed_loop(ds, labels, books[SPECS[method].source])
            student = StudentNet(ctx, seed)
            fit(student, ctx, extra, seed, desc=f"{method} s{seed}", progress=cfg.progress)
            tr = ctx.test_rows
            scores, _ = predict(student, ctx, ctx.row_user[tr], ds.item[tr], ctx.row_request[tr])
            res = {sc: ev.metrics(scores, sc) for sc in ev.scopes}
            if soft is not None:
                q = pseudo_quality(ds, *soft)
                res["all"] |= {k: q[k] for k in PL_KEYS} | student_fidelity(student, ctx, soft[0], soft[1])
                if seed == 0:
                    pl[method] = q
            runs.setdefault(method, {})[str(seed)] = res
            train_time[method] = train_time.get(method, 0.0) + time.perf_counter() - t
            outer.update(1)
    outer.close()

    summary = summarise(runs, ev.scopes)
    anchors = anchors_report(ds, books, anchored, len(histories), mode=cfg.anchors,
                             max_llm_users=cfg.max_llm_users)
    timing["train_eval"] = sum(train_time.values())
    timing["total"] = time.perf_counter() - t_start
    results: dict[str, Any] = {
        "dataset": dataset_report(ds),
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            # public_settings: anchors.api_key and credentials in anchors.base_url never reach results.json
            "trainer": public_settings(settings.trainer),
            "labeler": public_settings(settings.labeler),
            "anchors": public_settings(settings.anchors),
            "encoder": settings.encoder.model,
        },
        "methods": {m: LABELS[m] for m in [*cfg.methods, *([TEACHER] if need_teacher else [])]},
        "unavailable": unavailable,
        "scopes": {k: int(len(v)) for k, v in ev.scopes.items()},
        "anchors": anchors,
        "space": space_info,
        "anchor_cross": anchor_cross_info,
        "calibration": {**gpl.info, **kd.info},
        "pseudo_labels": {m: {k: v for k, v in q.items()} for m, q in pl.items()},
        "method_info": extra_info,
        "closed_loop_calibration": closed,
        "runs": runs,
        "summary": summary,
        "timing_s": {**timing, "per_method": train_time},
    }
    from gpl.eval.report import write_report

    write_report(results, cfg.out, plots=cfg.plots)
    return results


__all__ = ["CURVE_KS", "EvalConfig", "Evaluator", "HR_KS", "LABELS", "METHODS", "closed_loop", "pseudo_quality",
           "run_eval"]
