"""``gpl demo``: the whole pipeline on MovieLens on the embedded stack, with a summary (gpl/demo.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gpl.commands import BROKER_HELP, progress

if TYPE_CHECKING:
    from runtime.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
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
    d.set_defaults(run=run, serves_metrics=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
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
