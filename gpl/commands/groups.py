"""``gpl groups lag`` and ``gpl groups reset``: the consumer groups of the stack, from the command line.

Why: in an incident an operator asks "how far behind is each stage" and, after a bad deploy or a replay,
"start this stage over from there". Both used to need Kafka's own shell scripts (and Java). Lag here is
what a restart would re-read: the broker's end offset minus the group's committed offset, per partition.

A reset moves a group's committed offsets to the earliest or latest offset, or to the first record at or
after a time (``--to timestamp --ts MS``). It is a dry run unless ``--yes``: it prints the plan (current →
new per partition). Applying it is refused while the group has active members: a running stage would
overwrite the reset with its next commit (stop the stage, reset, start it again).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from runtime.kafka import reader_config
from runtime.settings import KafkaSettings, Settings, StreamsSettings
from schemas.topics import app_id, broker_name

TIMEOUT = 10.0


@dataclass(frozen=True)
class Row:
    group: str
    topic: str
    partition: int
    committed: int  # -1: never committed
    end: int
    target: int = -1  # reset: where the group would go

    @property
    def lag(self) -> int:
        return self.end - max(self.committed, 0) if self.committed >= 0 else self.end

    def as_dict(self) -> dict[str, object]:
        return {"group": self.group, "topic": self.topic, "partition": self.partition, "committed": self.committed,
                "end": self.end, "lag": self.lag, **({"target": self.target} if self.target >= 0 else {})}


def stack_groups(kafka: KafkaSettings, streams: StreamsSettings) -> list[str]:
    """The groups of this stack on the broker: ``<group_prefix>-*`` and the streams app (faust's group)."""
    admin = AdminClient(kafka.client_config())
    listed = admin.list_consumer_groups(request_timeout=TIMEOUT).result()
    streams_group = app_id(streams.app_id)
    return sorted(g.group_id for g in listed.valid
                  if g.group_id.startswith(f"{kafka.group_prefix}-") or g.group_id == streams_group)


def committed(kafka: KafkaSettings, group: str) -> dict[tuple[str, int], int]:
    """(topic, partition) → committed offset of ``group`` (every partition it ever committed)."""
    admin = AdminClient(kafka.client_config())
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=TIMEOUT)
    result = futures[group].result()
    return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else -1) for tp in result.topic_partitions or ()}


def group_lag(kafka: KafkaSettings, groups: list[str]) -> list[Row]:
    reader = Consumer(reader_config(kafka, "gpl-groups-lag"))
    try:
        rows = []
        for group in groups:
            for (topic, part), off in sorted(committed(kafka, group).items()):
                end = reader.get_watermark_offsets(TopicPartition(topic, part), timeout=TIMEOUT)[1]
                rows.append(Row(group, topic, part, off, end))
        return rows
    finally:
        reader.close()


def active_members(kafka: KafkaSettings, group: str) -> list[str]:
    """The client ids of the group's members now (empty: nobody would overwrite a reset)."""
    admin = AdminClient(kafka.client_config())
    desc = admin.describe_consumer_groups([group], request_timeout=TIMEOUT)[group].result()
    return [f"{m.client_id}@{m.host}" for m in desc.members]


def plan_reset(kafka: KafkaSettings, group: str, to: str, ts_ms: int | None, topics: list[str]) -> list[Row]:
    """Where ``group`` would go on every partition of ``topics`` (default: the topics it committed on)."""
    current = committed(kafka, group)
    names = sorted({t for t, _ in current}) if not topics else [broker_name(t) for t in topics]
    if not names:
        raise ValueError(f"group {group!r} has no committed offsets; name the topics with --topic")
    reader = Consumer(reader_config(kafka, group))
    try:
        md = reader.list_topics(timeout=TIMEOUT).topics
        rows = []
        for topic in names:
            if topic not in md or md[topic].error is not None:
                raise ValueError(f"topic {topic!r} does not exist on the broker")
            parts = sorted(md[topic].partitions)
            at_time = ({tp.partition: tp.offset for tp in reader.offsets_for_times(
                [TopicPartition(topic, p, ts_ms or 0) for p in parts], timeout=TIMEOUT)} if to == "timestamp" else {})
            for p in parts:
                low, high = reader.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT)
                target = {"earliest": low, "latest": high}.get(to, at_time.get(p, high))
                rows.append(Row(group, topic, p, current.get((topic, p), -1), high,
                                high if target < 0 else target))  # no record at or after the time: the end
        return rows
    finally:
        reader.close()


def apply_reset(kafka: KafkaSettings, group: str, rows: list[Row]) -> None:
    admin = AdminClient(kafka.client_config())
    tps = [TopicPartition(r.topic, r.partition, r.target) for r in rows]
    admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)],
                                       request_timeout=TIMEOUT)[group].result()


def _table(rows: list[Row], reset: bool) -> str:
    head = ("GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "NEW" if reset else "LAG")
    body = [(r.group, r.topic, str(r.partition), str(r.committed) if r.committed >= 0 else "-", str(r.end),
             str(r.target if reset else r.lag)) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [head, *body])


def _settings(args: argparse.Namespace, settings: Settings) -> KafkaSettings | None:
    if args.bootstrap:
        settings = settings.with_overrides(kafka={"bootstrap_servers": args.bootstrap})
    if not settings.kafka.bootstrap_servers:
        print(f"gpl groups {args.action}: no broker: give --bootstrap or set GPL_KAFKA__BOOTSTRAP_SERVERS",
              file=sys.stderr)
        return None
    return settings.kafka


def run_lag(args: argparse.Namespace, settings: Settings) -> int:
    kafka = _settings(args, settings)
    if kafka is None:
        return 2
    rows = group_lag(kafka, args.groups or stack_groups(kafka, settings.streams))
    if args.json:
        print(orjson.dumps([r.as_dict() for r in rows]).decode())
    elif rows:
        print(_table(rows, reset=False))
        totals: dict[str, int] = {}
        for r in rows:
            totals[r.group] = totals.get(r.group, 0) + r.lag
        print("\n".join(f"total {g}: {n}" for g, n in totals.items()))
    else:
        print("no committed offsets for these groups")
    return 0


def run_reset(args: argparse.Namespace, settings: Settings) -> int:
    kafka = _settings(args, settings)
    if kafka is None:
        return 2
    if (args.to == "timestamp") != (args.ts is not None):
        print("gpl groups reset: --ts MS goes with --to timestamp (and only with it)", file=sys.stderr)
        return 2
    try:
        rows = plan_reset(kafka, args.group, args.to, args.ts, args.topic or [])
    except ValueError as e:
        print(f"gpl groups reset: {e}", file=sys.stderr)
        return 2
    print(_table(rows, reset=True))
    if not args.yes:
        print(f"dry run: nothing changed; add --yes to move {args.group} as shown")
        return 0
    members = active_members(kafka, args.group)
    if members:
        print(f"gpl groups reset: group {args.group} has {len(members)} active member(s) ({', '.join(members)}); "
              "stop its stage first, or it overwrites the reset with its next commit", file=sys.stderr)
        return 2
    apply_reset(kafka, args.group, rows)
    print(f"reset {args.group}: {len(rows)} partition(s) moved")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    gp = sub.add_parser("groups", help="consumer groups: lag, and offset resets (dry run first)",
                        description=__doc__).add_subparsers(metavar="ACTION")
    lag = gp.add_parser("lag", help="per partition: committed offset, end offset, lag",
                        description="Lag of the stack's consumer groups (kafka.group_prefix-*, and the streams "
                                    "app) or of the named ones: the records a restart would re-read.")
    lag.add_argument("groups", nargs="*", metavar="GROUP", help="group ids (default: the stack's groups)")
    lag.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    lag.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    lag.set_defaults(run=run_lag, action="lag")
    rs = gp.add_parser("reset", help="move a group's committed offsets (a dry run unless --yes)",
                       description="Plan, and with --yes apply, new committed offsets for GROUP: the earliest or "
                                   "latest offset, or the first record at or after --ts. Refused while the group "
                                   "has active members.")
    rs.add_argument("group", metavar="GROUP", help="group id, as `gpl groups lag` shows it")
    rs.add_argument("--to", required=True, choices=("earliest", "latest", "timestamp"), help="where to move it")
    rs.add_argument("--ts", type=int, metavar="MS", help="--to timestamp: epoch milliseconds")
    rs.add_argument("--topic", action="append", metavar="TOPIC",
                    help="only this topic (logical or broker name; repeat; default: the topics it committed on)")
    rs.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    rs.add_argument("--yes", action="store_true", help="apply the plan (default: print it only)")
    rs.set_defaults(run=run_reset, action="reset")
