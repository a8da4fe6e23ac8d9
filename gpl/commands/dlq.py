"""``gpl dlq show | redrive``: look at dead letters and send them back once their cause is fixed.

A dead letter (``schemas.events.DeadLetter``, on ``<topic>.dlq``) keeps the original bytes, the
reason, the error and the origin topic/partition/offset.

* ``show TOPIC`` prints the most recent ones as a table (or JSON lines with ``--json``), newest last,
  optionally only one ``--reason``; it reads without a consumer group and changes nothing.
* ``redrive TOPIC`` re-produces the original bytes, with the original key (so the same partition),
  to the origin topic. It is a dry run unless ``--yes``: it then counts what it *would* send. With
  ``--yes`` it commits its position in the consumer group ``<group_prefix>-dlq-redrive-<dlq>-<reason>``
  after the re-produced messages are flushed, so a second run starts after them and redrives nothing
  twice. The group is per reason filter: redriving ``--reason unknown_items`` today and ``--reason
  schema`` tomorrow each see their whole DLQ. Each record sent carries the header ``gpl-redrive-count``
  (the original's redrives + 1); a stage that fails on it again dead-letters it as ``redrive_exhausted``
  with that count, and redrive skips a dead letter already redriven ``--max-redrives`` times
  (``past_limit``) or already sent by a run with another filter (``already_redriven``: the other redrive
  groups' committed positions say so), so a still-broken message is not sent round again and again.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from runtime.kafka import commit_offsets, consumer, producer
from runtime.serde import Wire
from runtime.settings import Settings
from schemas.codec import DecodeError
from schemas.events import DLQ_REASONS, REDRIVE_HEADER, DeadLetter
from schemas.topics import TOPICS, by_name
from schemas.wire import is_framed, unframe

PREVIEW = 60


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dlq", help="dead letters: show them, redrive them to their origin topic",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    act = d.add_subparsers(metavar="ACTION")
    sh = act.add_parser("show", help="table of recent dead letters of a topic")
    sh.add_argument("topic", help="origin topic (recall) or its DLQ (recall.dlq)")
    sh.add_argument("--reason", default="", help=f"only this reason: {', '.join(DLQ_REASONS)}")
    sh.add_argument("--limit", type=int, default=20, help="most recent N (default %(default)s)")
    sh.add_argument("--json", action="store_true", help="one JSON object per dead letter instead of a table")
    sh.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    sh.set_defaults(run=run_show)
    rd = act.add_parser("redrive", help="re-produce dead letters' original bytes to their origin topic")
    rd.add_argument("topic", help="origin topic (recall) or its DLQ (recall.dlq)")
    rd.add_argument("--reason", default="", help="only this reason (gpl dlq show --help lists them)")
    rd.add_argument("--yes", action="store_true", help="really send and commit (default: a dry run that counts)")
    rd.add_argument("--max-redrives", type=int, default=1,
                    help="skip a dead letter whose original was already redriven this many times")
    rd.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    rd.set_defaults(run=run_redrive)


@dataclass(frozen=True)
class Letter:
    """One record of a DLQ topic: where it sits, and the dead letter (None: unreadable record)."""

    partition: int
    offset: int
    letter: DeadLetter | None
    error: str = ""


def dlq_name(topic: str) -> str:
    """``recall`` or ``recall.dlq`` → ``recall.dlq``; unknown topics are refused."""
    t = by_name(topic)  # a logical name, or the name on the broker (kafka.topic_prefix, kafka.topic_names)
    if t is None or not t.dlq:
        raise ValueError(f"no dead-letter topic for {topic!r}; known: {', '.join(t for t in TOPICS)}")
    return t.dlq_name


def read_letters(c: Consumer, wire: Wire, topic: str, start: dict[int, int], timeout: float = 10.0) -> Iterator[Letter]:
    """Every record of ``topic`` from ``start`` (partition → offset) up to the end as of now."""
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in start}
    todo = {p for p, o in start.items() if o < ends[p]}
    if not todo:
        return
    c.assign([TopicPartition(topic, p, start[p]) for p in sorted(todo)])
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            if m.error() is not None:
                continue
            p, o = m.partition() or 0, m.offset() or 0
            deadline = time.monotonic() + timeout
            if p in todo and o + 1 >= ends[p]:
                todo.discard(p)
            if o >= ends[p]:
                continue
            yield _letter(wire, topic, m)


def _letter(wire: Wire, topic: str, m: Message) -> Letter:
    p, o = m.partition() or 0, m.offset() or 0
    try:
        return Letter(p, o, wire.decode(topic, m.value(), DeadLetter))
    except DecodeError as e:
        return Letter(p, o, None, f"{e.reason}: {e}")


def partitions(c: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    md = c.list_topics(topic, timeout=timeout).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        raise ValueError(f"topic {topic} does not exist")
    return sorted(md.partitions)


def preview(value_b64: str, width: int = PREVIEW) -> str:
    """The original bytes, readable: framed ones show their schema id, binary is escaped."""
    raw = base64.b64decode(value_b64)
    head = ""
    if is_framed(raw) and len(raw) >= 5:
        schema_id, raw = unframe(raw)
        head = f"[schema {schema_id}] "
    text = head + raw.decode("utf-8", "backslashreplace")
    return text if len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------------------------------------- show
def recent(settings: Settings, topic: str, reason: str = "", limit: int = 20) -> list[Letter]:
    """The newest ``limit`` dead letters of a DLQ topic (by dead-letter time), optionally one reason."""
    c = consumer(settings.kafka, f"dlq-show-{time.monotonic_ns()}")
    try:
        parts = partitions(c, topic)
        start = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0] for p in parts}
        found = [x for x in read_letters(c, Wire(settings.schema_registry), topic, start)
                 if not reason or (x.letter is not None and x.letter.reason == reason)]
    finally:
        c.close()
    found.sort(key=lambda x: (x.letter.ts if x.letter else 0, x.partition, x.offset))
    return found[-limit:] if limit > 0 else found


def _checked(args: argparse.Namespace, settings: Settings) -> str:
    """The DLQ topic of the command, after the checks that need no broker and then a live broker."""
    from gpl.oneline import OperatorError, require_broker

    if args.reason and args.reason not in DLQ_REASONS:
        raise OperatorError(f"unknown reason {args.reason!r}; the reasons are: {', '.join(DLQ_REASONS)}")
    try:
        topic = dlq_name(args.topic)
    except ValueError as e:
        raise OperatorError(str(e)) from None
    require_broker(settings)
    return topic


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    topic = _checked(args, settings)
    try:
        letters = recent(settings, topic, args.reason, args.limit)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if args.json:
        for x in letters:
            row = x.letter.model_dump(mode="json") if x.letter else {"unreadable": x.error}
            print(orjson.dumps({"dlq_partition": x.partition, "dlq_offset": x.offset, **row,
                                "preview": preview(x.letter.value) if x.letter else ""}).decode())
        return 0
    # the error last and whole: its useful part (which field, which item) is often past any fixed width
    print(f"{'time (UTC)':19}  {'reason':17}  {'origin':24}  {'stage':10}  {'payload':{PREVIEW}}  error")
    for x in letters:
        if x.letter is None:
            print(f"{'?':19}  {'unreadable':17}  {f'{topic}[{x.partition}]@{x.offset}':24}  {'':10}  "
                  f"{'':{PREVIEW}}  {x.error}")
            continue
        d = x.letter
        when = datetime.fromtimestamp(d.ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        origin = f"{d.topic}[{d.partition}]@{d.offset}"
        error = d.error.replace("\n", " ")
        print(f"{when:19}  {d.reason:17}  {origin:24}  {d.stage:10}  {preview(d.value):{PREVIEW}}  {error}")
    print(f"{len(letters)} dead letters shown", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- redrive
def redrive(settings: Settings, topic: str, reason: str = "", *, yes: bool = False,
            max_redrives: int = 1) -> dict[str, int]:
    """Re-produce the matching dead letters of ``topic`` (a DLQ) from the group's committed position.

    Returns counts: ``scanned``, ``matched``, ``redriven`` (0 in a dry run), ``unreadable``,
    ``foreign_origin`` (claims another origin topic: never sent), ``past_limit`` (redriven
    ``max_redrives`` times already), ``already_redriven`` (sent by a run with another filter) and
    ``reason:<r>`` per matched reason. Offsets are committed only with ``yes``, after the flush.
    """
    group = f"dlq-redrive-{topic}-{reason or 'all'}"
    origin = topic.removesuffix(".dlq")
    c = consumer(settings.kafka, group)
    p = producer(settings.kafka) if yes else None
    counts: Counter[str] = Counter()
    nxt: dict[tuple[str, int], int] = {}
    try:
        parts = partitions(c, topic)
        others = other_runs(settings, topic, parts, reason or "all")
        start = {}
        for tp in c.committed([TopicPartition(topic, q) for q in parts], timeout=10):
            low = c.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[0]
            start[tp.partition] = tp.offset if tp.offset >= 0 else low
        for x in read_letters(c, Wire(settings.schema_registry), topic, start):
            counts["scanned"] += 1
            nxt[(topic, x.partition)] = x.offset + 1
            d = x.letter
            if d is None:
                counts["unreadable"] += 1
                continue
            if reason and d.reason != reason:
                continue
            if d.topic != origin:  # a record that claims another origin is not this DLQ's to send there
                counts["foreign_origin"] += 1
                continue
            if (d.redrives or 0) >= max_redrives:
                counts["past_limit"] += 1
                continue
            if any(f in ("all", d.reason) and o.get(x.partition, -1) > x.offset for f, o in others.items()):
                counts["already_redriven"] += 1
                continue
            counts["matched"] += 1
            counts[f"reason:{d.reason}"] += 1
            if p is not None:
                key = d.key.encode() if d.key is not None else None
                p.produce(origin, base64.b64decode(d.value), key=key,
                          headers=[(REDRIVE_HEADER, str((d.redrives or 0) + 1).encode())])
                p.poll(0)
                counts["redriven"] += 1
        if p is not None:
            if p.flush(30) > 0:
                raise RuntimeError("redriven messages not all delivered; nothing committed, run again")
            commit_offsets(c, nxt)
    finally:
        c.close()
    return {"scanned": 0, "matched": 0, "redriven": 0} | dict(counts)


def other_runs(settings: Settings, topic: str, parts: list[int], own: str) -> dict[str, dict[int, int]]:
    """filter (a reason, or ``all``) → partition → next offset committed by the other redrive groups of
    ``topic``: a dead letter below such a position, of a reason that group's filter matches, was sent."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient

    prefix = f"{settings.kafka.group_prefix}-dlq-redrive-{topic}-"
    admin = AdminClient({**settings.kafka.client_config(), "log_level": 0})
    listed = admin.list_consumer_groups(request_timeout=10).result(timeout=15)
    out: dict[str, dict[int, int]] = {}
    for g in listed.valid:
        f = g.group_id.removeprefix(prefix)
        if not g.group_id.startswith(prefix) or f == own:
            continue
        req = [ConsumerGroupTopicPartitions(g.group_id, [TopicPartition(topic, q) for q in parts])]
        got = admin.list_consumer_group_offsets(req)[g.group_id].result(timeout=15)
        out[f] = {tp.partition: tp.offset for tp in got.topic_partitions or [] if tp.offset >= 0}
    return out


def run_redrive(args: argparse.Namespace, settings: Settings) -> int:
    topic = _checked(args, settings)
    try:
        counts = redrive(settings, topic, args.reason, yes=args.yes, max_redrives=args.max_redrives)
    except (ValueError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(orjson.dumps({"dlq": topic, "dry_run": not args.yes, **counts}).decode())
    if not args.yes and counts.get("matched"):
        print(f"dry run: {counts['matched']} would be redriven; add --yes to send them", file=sys.stderr)
    return 0
