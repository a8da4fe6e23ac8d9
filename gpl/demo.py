"""``gpl demo``: the whole system on MovieLens, on the embedded stack, in one command.

1. models     the frozen encoder (PyPI package) and SmolLM2 (PyPI wheel → plain HF dir), offline;
2. simulate   a seeded, biased recommender funnel over MovieLens (gpl/simulate/), split in time:
              the first ``train_fraction`` of requests is streamed, the rest is held out for the metric;
3. calibrate  the pseudo-label calibrator fitted on the training events only (cross-fitted, as ``gpl
              calibrate`` does) and written where the labeler loads it; if the fit abstains the labeler
              makes no pseudo-labels and the summary says so;
   stack      the Tansu broker, every topic, the embedded Qdrant engine;
4. index      items → ``items`` → indexer → ``items__<encoder>``;
5. stream     the training events replayed through the broker; streams, anchors (LLM), labeler,
              trainer (and the calibration monitor) run until every message is accounted for;
6. evaluate   the last checkpoint of the pre-ranker scored on the held-out requests' whole recall sets
              (labels: clicks for exposed items, real ratings for unexposed ones where the user rated
              them), side by side with an exposed-only pre-ranker trained by a second trainer from the
              same ``samples`` stream (same settings and held-out requests; pseudo-labels skipped) and
              a popularity baseline: whether the labels helped is the point of the demo;
7. summary    printed and written to ``<data_dir>/demo/summary.json`` (6 and 7: gpl/demo_report.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from gpl.demo_report import evaluate, print_summary, sample_stats
from gpl.stack import Stack, Stages
from runtime.settings import Settings
from schemas.events import RecallEvent
from schemas.jsonl import write_events
from schemas.topics import EXPOSURE, RECALL, SAMPLES
from streams.join import OUTCOMES

log = logging.getLogger(__name__)
__all__ = ["DemoConfig", "demo_settings", "print_summary", "run_demo"]  # gpl demo's; the report: demo_report.py


@dataclass(frozen=True)
class DemoConfig:
    users: int = 100
    candidates: int = 500
    max_requests_per_user: int = 20
    features: str = "priors"  # calibrator features: workers.labeler.calibrator_fit.DEFAULT_FEATURE_SET (docs/eval.md)
    world: str = "semisynth"  # semisynth (unbiased held-out slice) or funnel (the biased MovieLens funnel)
    train_fraction: float = 0.8
    seed: int = 0
    timeout_s: float = 780.0  # stop waiting for quiescence after this long (the summary says so)
    data_path: Path = Path(__file__).resolve().parent.parent / "data" / "movielens-small"


def demo_settings(settings: Settings) -> Settings:
    """Demo defaults that keep LLM work bounded on a 2-core CPU: interest triggers count *event time*,
    and MovieLens users rate for months, so a debounce of 30 days gives a few anchor sets per user."""
    return settings.with_overrides(
        streams={"debounce_s": 30 * 86_400.0, "new_positives_trigger": 15, "join_wait_s": 20.0},
        labeler={"wait_for_anchors_s": 30.0},
        trainer={"checkpoint_every": 5_000},
    )


def run_demo(settings: Settings, cfg: DemoConfig = DemoConfig(), *, progress: bool = True) -> dict[str, Any]:
    t0 = time.monotonic()
    out_dir = settings.data_dir / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = tqdm(total=6, desc="demo", unit="phase", disable=not progress, position=0)
    seconds: dict[str, float] = {}  # wall time per phase: where the demo waits

    def mark(phase: str) -> None:
        seconds[phase] = round(time.monotonic() - t0 - sum(seconds.values()), 1)
        log.info("demo: %s took %.1f s", phase, seconds[phase])

    # 1. models -----------------------------------------------------------------------------------
    phases.set_postfix_str("models")
    if settings.anchors.backend == "transformers":
        from runtime.model_assets import ensure_llm

        ensure_llm(settings.llm_dir)
    phases.update()
    mark("models")

    # 2. simulate ---------------------------------------------------------------------------------
    phases.set_postfix_str("simulate")
    items, train, test, truth = (semisynth_world(settings, cfg, out_dir) if cfg.world == "semisynth"
                                 else funnel_world(cfg))
    events_file = out_dir / "train-events.jsonl"
    with open(events_file, "wb") as f:
        write_events(f, [("items", it) for it in items])
        # in event-time order, as a producer's stream is: replay would otherwise warn and sort it
        write_events(f, sorted(train, key=lambda te: int(getattr(te[1], "ts", 0))))  # stable: recall stays first
    phases.update()
    mark("simulate")
    calibration = calibrate(settings, events_file, cfg.features) if settings.labeler.label_source == "calibrator" \
        else {"fitted": False, "reason": "labeler.label_source = map"}
    mark("calibrate")

    # 3.-5. stack, index, stream ----------------------------------------------------------------
    phases.set_postfix_str("stream")
    fresh_trainer_state(settings)
    with Stack(settings, encoder=_cached_encoder(settings)) as stack:
        s = stack.settings
        from gpl.replay import replay_jsonl

        stages = Stages({name: stack.make(name, **({"progress": False} if name in ("indexer", "trainer") else {}))
                         for name in ("indexer", "streams", "anchors", "labeler", "trainer", *_optional())})
        stages.stages[BASELINE] = exposed_only_trainer(s, stack)
        with stages:
            counts = replay_jsonl(s, events_file, topics={"items"}, progress=progress)
            _wait(lambda: stack.index.count(s.encoder.collection) >= len(items) - _dlq(stages, "indexer"),
                  cfg.timeout_s, "items indexed", progress)
            mark("start stages, index items")
            counts.update(replay_jsonl(s, events_file, topics={"recall", "exposure"}, progress=progress))
            phases.update()
            mark("replay")
            quiet = _wait_quiescent(s, stages, counts, cfg.timeout_s - (time.monotonic() - t0), progress)
            mark("pipeline drains")
        phases.update()
        mark("stop stages")
        accounting = stages.accounting()
        errors = {k: repr(v) for k, v in stages.errors.items()}
        monitor = stages.stages.get("calibration")
        calibration_monitor = monitor.snapshot() if monitor is not None else None  # type: ignore[attr-defined]

        # 6. evaluate -----------------------------------------------------------------------------
        phases.set_postfix_str("evaluate")
        metric = evaluate(s, stack, test, truth, train)
        metric["exposed_only"] = evaluate(s, stack, test, truth, train, directory=baseline_dir(s))
        metric["samples_topic"] = sample_stats(s)
        mark("evaluate")
    phases.update()
    phases.close()
    summary = _summary(counts, accounting, metric, quiet, errors, time.monotonic() - t0, cfg, s)
    summary["calibration"] = calibration_monitor
    summary["closed_loop"] = closed_loop_counts(accounting)
    summary["gate"] = gate_summary(s)
    summary["calibrator"] = calibration
    summary["phase_seconds"] = seconds
    (out_dir / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2, default=str))
    return summary


BASELINE = "trainer-exposed-only"


def fresh_trainer_state(settings: Settings) -> Path | None:
    """Move an earlier run's checkpoints aside (to ``checkpoints.previous``, replacing an older copy).

    Why: the demo streams the same world every run, and sample ids are deterministic (request, item,
    anchor version), so trainers resumed from the last run's checkpoints found every sample in their
    seen-set, trained nothing and the summary reported the previous run's model (its gate decisions
    too). Moved, not deleted: the directory may hold a model someone wants back."""
    current = settings.checkpoints_dir
    if not current.exists():
        return None
    previous = current.with_name(current.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    current.rename(previous)
    log.info("demo: the last run's checkpoints moved to %s; this run trains from scratch", previous)
    return previous


def closed_loop_counts(acc: dict[str, dict[str, int]]) -> dict[str, int]:
    """How many pseudo-labels met a later real label, as the stages counted it: the labeler's recalibration
    (its joins, and its refits with and without a drift warning) and the calibration monitor's joins.
    From the accounting, which child processes relay (their objects in this process saw nothing), so the
    summary's closed-loop line says what the stages' logs say."""
    lab, mon = acc.get("labeler", {}), acc.get("calibration", {})
    return {"labeler_joined": lab.get("closed_loop_joins", 0), "drift_refits": lab.get("closed_loop_drift", 0),
            "calibrated_refits": lab.get("closed_loop_calibrated", 0), "monitor_joined": mon.get("joined", 0)}


def gate_summary(s: Settings) -> dict[str, Any]:
    """The publication gate's decisions of this run (gate.jsonl), counted by outcome: one summary line
    instead of a log line per refusal."""
    from workers.trainer.published_area import PublishedArea

    decisions = PublishedArea(s.checkpoints_dir / "published").decisions()
    by: dict[str, int] = {}
    for d in decisions:
        by[d["outcome"]] = by.get(d["outcome"], 0) + 1
    return {"decisions": len(decisions), "by_outcome": by,
            "last_refusal": next((d["reason"] for d in reversed(decisions) if d["outcome"] == "refused"), None)}


def _cached_encoder(settings: Settings) -> Any:
    """The frozen encoder behind the cache the world build and the calibrator filled: the indexer then
    looks the catalogue's vectors up instead of embedding it a second time (a vector is never
    recomputed under one encoder; docs/design.md §2). Cut ~90 s of the demo on a 2-core machine."""
    from gpl.eval.embed import CachedEncoder
    from runtime.encoder import open_encoder

    return CachedEncoder(open_encoder(settings.encoder), settings.data_dir / "eval" / "cache", progress=False)


def baseline_dir(s: Settings) -> Path:
    return s.checkpoints_dir / "exposed-only"


def exposed_only_trainer(s: Settings, stack: Stack) -> Any:
    """A second trainer on the same ``samples`` topic (its own group and checkpoints), pseudo-labels off."""
    from workers.trainer import Trainer

    return Trainer(s.with_overrides(trainer={"pseudo_labels": False}), stack.index, progress=False, name=BASELINE,
                   directory=baseline_dir(s))


Events = list[tuple[str, Any]]


def funnel_world(cfg: DemoConfig) -> tuple[list[Any], Events, Events, dict[tuple[str, int], int]]:
    """The MovieLens funnel: biased exposure everywhere; truth only for candidates the user rated, so its
    held-out metric over-weights rated items (docs/eval.md explains why negatives then look bad)."""
    from gpl.simulate import SimConfig, load_movielens, simulate

    sim = simulate(load_movielens(cfg.data_path), SimConfig(
        seed=cfg.seed, users=cfg.users, candidates=cfg.candidates, max_requests_per_user=cfg.max_requests_per_user,
        time_origin_ms=int(time.time() * 1000) - 86_400_000 * 365))
    recalls = [e for t, e in sim.events if t == "recall"]
    cut = float(np.quantile([r.ts for r in recalls], cfg.train_fraction))  # type: ignore[attr-defined]
    train_ids = {r.request_id for r in recalls if r.ts < cut}  # type: ignore[attr-defined]
    train = [(t, e) for t, e in sim.events if getattr(e, "request_id", None) in train_ids]
    test = [(t, e) for t, e in sim.events if getattr(e, "request_id", None) not in train_ids]
    truth = {(e.request_id, i): sim.truth[(e.user_id, i)] for t, e in test if isinstance(e, RecallEvent)
             for i in e.item_ids if (e.user_id, i) in sim.truth}  # keyed by request, as the semisynth world
    return list(sim.items), train, test, truth


def semisynth_world(settings: Settings, cfg: DemoConfig, out_dir: Path
                    ) -> tuple[list[Any], Events, Events, dict[tuple[str, int], int]]:
    """The semi-synthetic benchmark (gpl/simulate/semisynth.py): clicks drawn from an oracle under the biased
    exposure for training requests, *random* exposure for held-out ones, truth known for every candidate —
    so the held-out metric is unbiased over whole recall sets. Truth is keyed by (request id, item id)."""
    from gpl.simulate.semisynth import build_semisynth, read_world

    d = build_semisynth(out_dir / "world", seed=cfg.seed, users=cfg.users, data=cfg.data_path,
                        cache_dir=settings.data_dir / "eval" / "cache")
    items, train, test, truth = read_world(d)
    return list(items), train, test, truth


def calibrate(settings: Settings, events_file: Path, features: str) -> dict[str, Any]:
    """Fit the calibrator on the training events (the streamed period, no held-out request) and save it."""

    from gpl.eval.dataset import load_dataset
    from gpl.eval.embed import CachedEncoder
    from runtime.encoder import open_encoder
    from workers.labeler.calibrator_fit import FEATURE_SETS, fit_dataset_calibrator

    ds_dir = events_file.parent / "calibration-dataset"
    ds_dir.mkdir(exist_ok=True)
    shutil.copyfile(events_file, ds_dir / "events.jsonl")
    ds = load_dataset(ds_dir, training_only=True)
    enc = CachedEncoder(open_encoder(settings.encoder), settings.data_dir / "eval" / "cache", progress=False)
    fit = fit_dataset_calibrator(ds, enc.encode(ds.item_text, desc="embed items"), settings,
                                 features=FEATURE_SETS[features])
    info: dict[str, Any] = {"fitted": fit.calibrator is not None, "reason": fit.reason,
                            "cv": {k: round(v, 4) for k, v in fit.cv.items()}}
    if fit.calibrator is not None:
        info |= {"version": fit.calibrator.version, "features": list(fit.calibrator.features),
                 "path": str(fit.calibrator.save(settings.calibrator_file))}
    else:
        settings.calibrator_file.unlink(missing_ok=True)  # an old artifact must not label this run
    return info


def _optional() -> tuple[str, ...]:
    try:
        import workers.calibration  # noqa: F401
    except ImportError:
        return ()
    return ("calibration",)


def _dlq(stages: Stages, name: str) -> int:
    acc = stages.stages[name].accounting.snapshot()
    return sum(v for k, v in acc.items() if k.startswith("dlq:"))


def _wait(cond: Any, timeout: float, what: str, progress: bool) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    log.warning("demo: gave up waiting for %s after %.0f s", what, timeout)
    return False


def _wait_quiescent(settings: Settings, stages: Stages, produced: dict[str, int], timeout: float,
                    progress: bool) -> bool:
    """Wait until every input is accounted for by every stage, with a live progress bar."""
    from confluent_kafka import TopicPartition

    from runtime.kafka import consumer

    st = stages.stages
    probe = consumer(settings.kafka, "demo-probe")
    samples_parts = [TopicPartition(SAMPLES.name, p) for p in range(settings.kafka.partitions)]
    total_in = produced.get(RECALL.name, 0) + produced.get(EXPOSURE.name, 0)  # replay counts broker names
    bar = tqdm(total=total_in, desc="pipeline", unit="event", disable=not progress, position=1)
    deadline = time.monotonic() + timeout
    stable = 0
    last: tuple[int, ...] = ()
    while time.monotonic() < deadline and not stages.errors:  # a crashed stage never catches up
        a = {n: s.accounting.snapshot() for n, s in st.items()}
        streams = a["streams"]
        done_in = sum(streams.get(k, 0) for k in OUTCOMES) + _sum_prefix(streams, "dlq:")
        bar.n = done_in
        lab = a["labeler"]
        bar.set_postfix(anchors=a["anchors"].get("emitted", 0), labeled=lab.get("labeled", 0),
                        deferred=getattr(st["labeler"], "deferred", 0),
                        trained=getattr(st["trainer"], "counts", {}).get("samples", 0))
        bar.refresh()
        requests = _sum_prefix(streams, "anchor_requests:")
        anchors_done = sum(a["anchors"].get(k, 0) for k in ("emitted", "superseded", "debounced", "cached")) \
            + _sum_prefix(a["anchors"], "dlq:")
        batches = streams.get("unexposed_batches", 0)
        lab_done = lab.get("labeled", 0) + lab.get("abstained", 0) + lab.get("timed_out", 0) + _sum_prefix(lab, "dlq:")
        trained = min(getattr(st[n], "counts", {}).get("messages", 0) for n in ("trainer", BASELINE) if n in st)
        outputs = sum(probe.get_watermark_offsets(tp, timeout=5)[1] for tp in samples_parts)
        snapshot = (done_in, anchors_done, lab_done, trained)
        if int(time.monotonic() * 2) % 20 == 0:  # every ~10 s: what the wait is waiting for
            log.info("demo: events %d/%d, anchor requests %d/%d, unexposed batches %d/%d, trained %d/%d samples "
                     "messages (%s)", done_in, total_in, anchors_done, requests, lab_done, batches, trained,
                     outputs, {n: getattr(st[n], "counts", {}) for n in ("trainer", BASELINE) if n in st})
        complete = done_in >= total_in and anchors_done >= requests and lab_done >= batches
        stable = stable + 1 if complete and snapshot == last else 0
        last = snapshot
        if stable >= 6 and trained >= outputs:  # 3 s without movement after everything arrived
            bar.close()
            probe.close()
            return True
        time.sleep(0.5)
    bar.close()
    probe.close()
    log.warning("demo: pipeline not quiescent after %.0f s; the summary shows where work was left", timeout)
    return False


def _sum_prefix(d: dict[str, int], prefix: str) -> int:
    return sum(v for k, v in d.items() if k.startswith(prefix))


def _summary(counts: dict[str, int], acc: dict[str, dict[str, int]], metric: dict[str, Any], quiet: bool,
             errors: dict[str, str], seconds: float, cfg: DemoConfig, s: Settings) -> dict[str, Any]:
    st, lab, anc = acc.get("streams", {}), acc.get("labeler", {}), acc.get("anchors", {})
    dlq = {f"{stage}:{k[4:]}": v for stage, a in acc.items() for k, v in a.items() if k.startswith("dlq:")}
    return {
        "events_in": counts,
        "requests_joined": st.get("joined", 0) // 2,
        "requests_expired": st.get("expired", 0),
        "unexposed_candidates": st.get("unexposed_candidates", 0),
        "real_samples": st.get("real_samples", 0),
        "anchor_requests": {k.split(":", 1)[1]: v for k, v in st.items() if k.startswith("anchor_requests:")},
        "anchor_sets_generated": anc.get("emitted", 0),
        "anchor_fallbacks": anc.get("fallback", 0),
        "pseudo_labels": lab.get("pseudo", 0),
        "pseudo_label_mean": metric.get("samples_topic", {}).get("pseudo_label_mean"),
        "pseudo_weight_mean": metric.get("samples_topic", {}).get("pseudo_weight_mean"),
        "sampled_out": lab.get("sampled_out", 0),
        "labeler": lab,
        "dlq": dlq,
        "checkpoints": sorted(p.name for p in s.checkpoints_dir.glob("ckpt-*.pt")),
        "metric": metric,
        "quiescent": quiet,
        "stage_errors": errors,
        "seconds": round(seconds, 1),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "accounting": acc,
    }
