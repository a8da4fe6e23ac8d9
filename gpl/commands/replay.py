"""``gpl replay``: a JSONL event file, or a time range of a topic, into the broker (gpl/replay.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from gpl.commands import progress

if TYPE_CHECKING:
    from runtime.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
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
    rp.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
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
