"""Replay recorded events onto the broker: a JSONL event file, or a time range of an existing topic.

Why: every dataset (the MovieLens simulation, a production export, a hand-written DLQ test) enters
the system the same way a live producer's events would, and an incident can be reproduced by copying
a time window of a topic into another one. Both keep each record's event time as its Kafka timestamp.

This module is ``gpl replay``'s entry point: the file replay lives here, the topic copy in
gpl/replay_topic.py (:func:`replay_topic`, importable from here too), and what both send through in
gpl/replay_producer.py (pacing, one request in flight, delivery accounting, the topic check).

Order. A replay is deterministic: a JSONL file is produced items first, then its other events in
event-time order (a file not in that order is sorted, or refused when too large to sort in memory), with
a bounded wait for the stack's indexer in between (gpl/replay_order.py); a topic range in a fixed merge
order (see :func:`replay_topic`). The producer keeps one request in flight per connection, so a retried
send cannot overtake the next one (gpl/replay_producer.py).

Pacing (``speed``, ``max_wait_s``: gpl/replay_producer.py) changes timing only, never order.

Topics must exist (``gpl topics create``): a replay never lets the broker auto-create a topic with
another partition count; a topic copy may create its target with the source's count (``create_target``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
from tqdm import tqdm

from gpl.replay_order import MAX_SORT_BYTES, ordered_events, scan, wait_for_indexer
from gpl.replay_producer import Pacer, Sink, existing_topics
from gpl.replay_topic import replay_topic
from runtime.settings import Settings
from schemas.events import recall_as_v2
from schemas.jsonl import JsonlEvent
from schemas.topics import spec

__all__ = ["replay_jsonl", "replay_topic"]

log = logging.getLogger(__name__)


def replay_jsonl(
    settings: Settings,
    path: Path | str,
    *,
    speed: float = 0.0,
    topics: set[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    max_wait_s: float | None = None,
    timeout_s: float = 60.0,
    index_wait_s: float = 300.0,
    max_sort_bytes: int = MAX_SORT_BYTES,
) -> dict[str, int]:
    """Produce every event of a JSONL file (schemas/jsonl.py) to its topic; return records per topic.

    Keys and timestamps come from schemas/jsonl (the topic's key field, ``value.ts``). ``topics``
    keeps only those topics. ``seed`` is accepted so callers can pass one seed to every stage; a
    replay uses no randomness (the order is fixed by the file), so it changes nothing.

    Order (gpl/replay_order.py): the file's ``items`` first, then its other events by ``value.ts``; a file
    not in that order is sorted in memory (logged) when it is at most ``max_sort_bytes``, else refused
    (ValueError, one line). When the file has both items and events, the replay waits up to
    ``index_wait_s`` (0: not at all) after the items until the stack's indexer has indexed them.
    """
    del seed  # nothing random here, see the docstring
    order = scan(path, topics)
    order.check(max_sort_bytes)
    existing = existing_topics(settings.kafka, timeout_s)
    missing = sorted(spec(t).name for t in order.topics if spec(t).name not in existing)  # file: logical names
    if missing:  # before anything is sent
        raise ValueError(f"topic {missing[0]!r} does not exist; create it first (create_topics)")
    if order.disorder is not None:
        line, ts, before, later = order.disorder
        log.warning("replay: %s is not in event-time order (line %d: ts %d after ts %d on line %d); replaying its "
                    "events sorted by value.ts", path, line, ts, later, before)
    pacer = Pacer(speed, max_wait_s)
    sink = Sink(settings.kafka)
    items, rest = ordered_events(order, topics)

    def send(ev: JsonlEvent) -> None:
        pacer.wait(ev.ts)
        sink.send(spec(ev.topic).name, _recall_v2(ev.value) if ev.topic == "recall" else ev.value, ev.key, ev.ts)
        bar.update(1)

    with tqdm(total=order.items + order.events, desc=f"replay {Path(path).name}", unit="ev",
              disable=not progress) as bar:
        for ev in items:
            send(ev)
        if order.items and order.events and index_wait_s > 0:
            if sink.producer.flush(timeout_s):  # the items are on the broker before their end is measured
                raise TimeoutError(f"items still undelivered after {timeout_s}s")
            wait_for_indexer(settings.kafka, index_wait_s)
        for ev in rest:
            send(ev)
    return sink.close(timeout_s)


def _recall_v2(value: bytes) -> bytes:
    """Recall events go out as schema_version 2 (columns): a version 1 value is rewritten when that is
    exact (``schemas.events.recall_as_v2``); anything else is forwarded as it is, for the DLQ to judge."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    v2 = recall_as_v2(obj) if isinstance(obj, dict) else None
    return value if v2 is None else orjson.dumps(v2)
