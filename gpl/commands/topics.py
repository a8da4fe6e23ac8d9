"""``gpl topics list`` and ``gpl topics create [NAME ...]``: the topic registry from the command line.

Why: topics must exist with the project's partition count before anything produces to them (the
broker would auto-create them with its own count, and faust refuses a changelog whose count differs);
``schemas/topics.py`` is where they are declared, and an operator should not need Python to see that
table or to create one more topic (a ``gpl replay --to`` target, a scratch copy).
"""

from __future__ import annotations

import argparse
import sys

from runtime.settings import Settings
from schemas.topics import TOPICS, all_topic_names, broker_name


def register(sub: argparse._SubParsersAction) -> None:
    tp = sub.add_parser("topics", help="list or create topics (schemas/topics.py)",
                        description=__doc__).add_subparsers(metavar="ACTION")
    ls = tp.add_parser("list", help="the topic registry, and with a broker what exists on it",
                       description="Every topic of schemas/topics.py with its record type, key, cleanup policy "
                                   "and DLQ; with kafka.bootstrap_servers set also its partition count on the "
                                   "broker (or 'missing').")
    ls.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    ls.set_defaults(run=run_list)
    cr = tp.add_parser("create", help="create topics with the project's partition count",
                       description="Create the named topics (default: every registry topic and its DLQ) with "
                                   "kafka.partitions partitions and kafka.replication_factor replicas; registry "
                                   "topics get their cleanup policy. Existing topics are left alone.")
    cr.add_argument("names", nargs="*", metavar="NAME",
                    help="topics to create: a registry topic by its logical name (recall, recall.dlq: under "
                         "kafka.topic_prefix) or any name as typed (default: all of the registry)")
    cr.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    cr.set_defaults(run=run_create)


def registry_rows() -> list[tuple[str, str, str, str, str]]:
    """(topic, record, key, cleanup policy, dlq) for every registry topic, in declaration order."""
    return [(t.name, t.value_type.__name__, t.key, "compact" if t.compacted else "delete",
             t.dlq_name if t.dlq else "-") for t in TOPICS.values()]


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    header: tuple[str, ...] = ("TOPIC", "RECORD", "KEY", "CLEANUP", "DLQ")
    rows: list[tuple[str, ...]] = list(registry_rows())
    if settings.kafka.bootstrap_servers:
        from confluent_kafka.admin import AdminClient

        from gpl.oneline import require_broker

        require_broker(settings)  # an unreachable broker: one line, not librdkafka's retries and a traceback
        md = AdminClient(settings.kafka.client_config()).list_topics(timeout=10).topics

        def parts(name: str) -> str:
            return str(len(md[name].partitions)) if name in md else "missing"

        header += ("PARTITIONS", "DLQ PARTITIONS")
        rows = [(*r, parts(r[0]), parts(r[4]) if r[4] != "-" else "-") for r in rows]
    print(_table([header, *rows]))
    return 0


def run_create(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.kafka import create_topics

    if args.bootstrap:
        settings = settings.with_overrides(kafka={"bootstrap_servers": args.bootstrap})
    if not settings.kafka.bootstrap_servers:
        print("gpl topics create: no broker: give --bootstrap or set GPL_KAFKA__BOOTSTRAP_SERVERS "
              "(the embedded broker of `gpl up` creates the registry's topics itself)", file=sys.stderr)
        return 2
    from gpl.oneline import require_broker

    require_broker(settings)
    # registry names (recall, recall.dlq) under the prefix; no names: all of them, this app id's expiry topic too
    names = [broker_name(n) for n in args.names] or all_topic_names(settings.streams.app_id)
    created = create_topics(settings.kafka, names)
    for name in names:
        state = "created" if name in created else "exists"
        print(f"{state:8} {name}  ({settings.kafka.partitions} partitions)" if state == "created"
              else f"{state:8} {name}")
    return 0
