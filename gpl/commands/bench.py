"""``gpl bench``: benchmarks as commands, not timed tests (docs/benchmarks.md); the work is in gpl/bench/.

Each prints its result as JSON (medians of repeated runs, with the baseline side by side where there is one).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import orjson

from gpl.commands import BROKER_HELP

if TYPE_CHECKING:
    from runtime.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks (medians of repeated runs, baselines side by side)")
    bs = b.add_subparsers(metavar="WHAT")
    bl = bs.add_parser("labeler", help="label_batch throughput vs a naive loop (candidates/s, one core)")
    bl.add_argument("--candidates", type=int, default=1000, help="candidates per batch")
    bl.add_argument("--k", type=int, default=8, help="anchors per user")
    bl.add_argument("--batches", type=int, default=2000, help="batches per timed run")
    bl.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                    help="item matrix dtype of the timed path (default: labeler.matrix_dtype)")
    bl.set_defaults(run=run_labeler)
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
    be.set_defaults(run=run_e2e)
    ba = bs.add_parser("anchors", help="users/s of the anchor backends side by side (sid, content; one core)")
    ba.add_argument("--backends", default="sid,content",
                    help="comma list of sid, content, transformers, transformers-noprefix")
    ba.add_argument("--users", type=int, default=512, help="users per repeat")
    ba.add_argument("--batch", type=int, default=256, help="users per backend call (the worker's micro-batch)")
    ba.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    ba.add_argument("--llm-users", type=int, default=8, help="users per repeat for transformers (slow)")
    ba.add_argument("--llm", default="", help="transformers: comma list of LLMs (anchors.llm values), side by side")
    ba.add_argument("--llm-batch", type=int, default=0, help="transformers: users per call (0: anchors.batch_size)")
    ba.set_defaults(run=run_anchors)
    bw = bs.add_parser("wire", help="ms per message of each wire path: plain JSON, Confluent, registry checks")
    bw.add_argument("--candidates", type=int, default=1000, help="candidates per recall message")
    bw.add_argument("--repeats", type=int, default=50, help="timed repeats (the median is reported)")
    bw.set_defaults(run=run_wire)
    bm = bs.add_parser("memory", help="peak RSS of each stage process, per catalogue size (bytes per item)")
    bm.add_argument("--sizes", default="20000,1000000", help="comma list of item counts")
    bm.add_argument("--dim", type=int, default=384, help="item vector dimension")
    bm.set_defaults(run=run_memory)


def _print_json(result: object) -> None:
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


def run_labeler(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.labeler import bench_labeler

    _print_json(bench_labeler(candidates=args.candidates, k=args.k, batches=args.batches,
                              dtype=args.dtype or settings.labeler.matrix_dtype))
    return 0


def run_e2e(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.e2e import bench_e2e

    _print_json(bench_e2e(settings, requests=args.requests, candidates=args.candidates, rate=args.rate,
                          baseline=args.baseline, fraction=args.fraction, items=args.items,
                          streams_workers=args.streams_workers, slo_p99=args.slo_p99))
    return 0


def run_anchors(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.anchor_backends import backends_table, bench_backends

    res = bench_backends(settings, [b.strip() for b in args.backends.split(",") if b.strip()], users=args.users,
                         batch=args.batch, repeats=args.repeats, llm_users=args.llm_users,
                         llms=[x.strip() for x in args.llm.split(",") if x.strip()], llm_batch=args.llm_batch)
    print(backends_table(res))
    _print_json(res)
    return 0


def run_wire(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.wire import bench_wire

    _print_json(bench_wire(args.candidates, args.repeats))
    return 0


def run_memory(args: argparse.Namespace, settings: Settings) -> int:
    from gpl.bench.memory import bench_memory

    sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    _print_json(bench_memory(settings, sizes=sizes, dim=args.dim))
    return 0
