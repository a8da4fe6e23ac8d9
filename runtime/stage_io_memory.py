"""A stage's I/O in memory: the twin of :class:`~runtime.stage_io.StageIO` for millisecond unit tests.

Why: the rules of a worker loop — deferral, backpressure (pause, rewind, resume), committing only up
to the oldest open message, restarting from the committed offset, dead letters with the original
bytes — were testable only through a real broker, seconds per test and timing-dependent. The twin
runs the same rules (:class:`~runtime.stage_port.StageRules`, shared with the Kafka adapter) over
an in-memory log, deterministically:

* :class:`MemoryTopics` is the broker: scripted input records per partition, every output and dead
  letter the stage produced (after a flush), the committed offsets of each group, and scripted
  :data:`ABORT` points where a read crashes the stage (:class:`Aborted`) once, like a process killed
  mid-batch; a new twin over the same topics is the restarted process (:meth:`MemoryStageIO.restarted`);
* :class:`MemoryStageIO` is the stage's side: one group member that owns every partition of its
  topics on the first poll (calling the stage's ``on_assign``), records what it paused, rewound,
  resumed and committed, and can hand partitions away between polls (:meth:`MemoryStageIO.rebalance`).
  No time passes: a poll returns at once. After ``idle_polls`` empty polls in a row with every record
  of its partitions committed and every output flushed, it sets the loop's ``stop`` event, so a
  ``while not stop.is_set()`` loop ends when its input is drained; after a thousand times as many it
  sets it anyway, so a loop that never finishes ends the test instead of hanging it.

The idea of scripted input, captured output and a scripted abort follows Bytewax's testing source
and sink; the code is ours.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from pydantic import BaseModel

from runtime.kafka import Accounting, Headers
from runtime.offsets import TP
from runtime.serde import Wire
from runtime.stage_port import Rebalance, StageRules
from schemas.codec import decode
from schemas.events import DeadLetter

if TYPE_CHECKING:
    from runtime.stage_port import StagePort

M = TypeVar("M", bound=BaseModel)
OFFSET_INVALID = -1001  # confluent-kafka's "no offset" (a TopicPartition made without one)


class Aborted(RuntimeError):
    """The scripted crash: the stage's process died here (its unflushed outputs are lost, no callback runs)."""


class _Abort:
    def __repr__(self) -> str:
        return "ABORT"


ABORT = _Abort()  # in scripted input: the first poll that starts at this point raises Aborted (once)
Input = bytes | None | tuple[bytes | None, bytes | None] | _Abort  # value, (key, value), or ABORT


@dataclass(frozen=True)
class Record:
    """One record of a partition's log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None

    def message(self) -> Message:
        """The record as a consumer delivers it (a real confluent-kafka :class:`Message`)."""
        return Message(topic=self.topic, partition=self.partition, offset=self.offset, key=self.key,
                       value=self.value, headers=self.headers)


class MemoryTopics:
    """The broker's twin: partition logs, committed offsets per group, scripted aborts.

    ``partitions`` gives a topic's partition count (default ``default_partitions``); a record produced
    without a partition goes to ``crc32(key) % count`` (partition 0 without a key), so one key stays in
    one partition as with Kafka (not the same partition numbers: nothing here needs them to agree).
    """

    def __init__(self, partitions: Mapping[str, int] | None = None, *, default_partitions: int = 1) -> None:
        self.counts = dict(partitions or {})
        self.default_partitions = default_partitions
        self.logs: dict[TP, list[Record]] = {}
        self.committed: dict[str, dict[TP, int]] = {}
        self.aborts: dict[TP, set[int]] = {}  # offsets whose first read crashes the reader

    def partitions(self, topic: str) -> int:
        return self.counts.get(topic, self.default_partitions)

    def script(self, topic: str, inputs: Mapping[int, Sequence[Input]] | Sequence[Input]) -> None:
        """Append scripted input: per partition (``{0: [...], 1: [...]}``) or to partition 0 (a list)."""
        per_part = inputs if isinstance(inputs, Mapping) else {0: inputs}
        for part, items in per_part.items():
            if part >= self.partitions(topic):
                self.counts[topic] = part + 1
            for item in items:
                if isinstance(item, _Abort):
                    self.aborts.setdefault((topic, part), set()).add(self.end((topic, part)))
                elif isinstance(item, tuple):
                    self.append(topic, item[1], key=item[0], partition=part)
                else:
                    self.append(topic, item, partition=part)

    def append(self, topic: str, value: str | bytes | None, *, key: str | bytes | None = None,
               partition: int = -1, headers: Headers | None = None) -> Record:
        """Add one record at the end of its partition's log."""
        key_b = key.encode() if isinstance(key, str) else key
        if partition < 0:
            partition = zlib.crc32(key_b) % self.partitions(topic) if key_b is not None else 0
        log = self.logs.setdefault((topic, partition), [])
        rec = Record(topic, partition, len(log), key_b, value.encode() if isinstance(value, str) else value,
                     headers)
        log.append(rec)
        return rec

    def end(self, tp: TP) -> int:
        """The partition's high watermark (the offset the next record gets)."""
        return len(self.logs.get(tp, ()))

    def records(self, topic: str) -> list[Record]:
        """Every record of the topic, partition by partition, in offset order."""
        return [r for tp in sorted(self.logs) if tp[0] == topic for r in self.logs[tp]]

    def decoded(self, topic: str, model: type[M]) -> list[M]:
        """The topic's records as their contract (plain JSON or framed)."""
        return [decode(r.value, model) for r in self.records(topic)]

    def dead_letters(self, topic: str) -> list[DeadLetter]:
        """What went to ``<topic>.dlq``: origin, reason, error and the original bytes (base64)."""
        return self.decoded(f"{topic}.dlq", DeadLetter)

    def aborts_at(self, tp: TP, offset: int) -> bool:
        """A scripted abort point not yet fired: the first reader to reach it crashes."""
        return offset in self.aborts.get(tp, ())


class MemoryProducer:
    """Outputs queue here until a flush delivers them to the topics; ``fail_flushes`` scripts a broker
    that does not acknowledge (each failing flush reports the whole queue still undelivered)."""

    def __init__(self, topics: MemoryTopics) -> None:
        self.topics = topics
        self.queue: list[tuple[str, str | bytes | None, str | bytes | None, int, Headers | None]] = []
        self.fail_flushes = 0
        self.flushes = 0

    def produce(self, topic: str, value: str | bytes | None = None, key: str | bytes | None = None,
                partition: int = -1, *, headers: Headers | None = None) -> None:
        self.queue.append((topic, value, key, partition, headers))

    def poll(self, timeout: float = -1) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        self.flushes += 1
        if self.fail_flushes > 0:
            self.fail_flushes -= 1
            return len(self.queue)
        for topic, value, key, partition, headers in self.queue:
            self.topics.append(topic, value, key=key, partition=partition, headers=headers)
        self.queue.clear()
        return 0


class MemoryConsumer:
    """The group client a stage's rebalance callbacks receive: assignment, start offsets, commits."""

    def __init__(self, topics: MemoryTopics, group: str) -> None:
        self.topics = topics
        self.group = group
        self.owned: list[TP] = []
        self.starts: dict[TP, int] = {}  # offsets an on_assign callback chose (assign() with an offset)
        self.leaderless = 0  # the next queries answer NOT_LEADER_FOR_PARTITION, as a paused broker's partitions

    def _answer(self) -> None:
        if self.leaderless > 0:
            self.leaderless -= 1
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.owned]

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp.offset >= 0:
                self.starts[(tp.topic, tp.partition)] = tp.offset

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        self._answer()
        done = self.topics.committed.get(self.group, {})
        return [TopicPartition(tp.topic, tp.partition, done.get((tp.topic, tp.partition), OFFSET_INVALID))
                for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        self._answer()
        return 0, self.topics.end((partition.topic, partition.partition))

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool = False) -> list[TopicPartition]:
        self.topics.committed.setdefault(self.group, {}).update({(tp.topic, tp.partition): tp.offset
                                                                 for tp in offsets})
        return offsets


class MemoryStageIO(StageRules):
    """A stage's I/O over :class:`MemoryTopics`, recording pauses, rewinds, resumes and commits.

    ``group`` defaults to the stage (two twins of one group share committed offsets); ``stop`` and
    ``idle_polls`` end the stage's loop once its input is drained (0: never; see the module doc).
    """

    def __init__(self, topics: MemoryTopics, stage: str, accounting: Accounting | None = None, *,
                 group: str | None = None, wire: Wire | None = None, stop: threading.Event | None = None,
                 idle_polls: int = 0, max_bytes: int | None = None) -> None:
        self.topics = topics
        self.memory_producer = MemoryProducer(topics)
        super().__init__(stage, accounting or Accounting(stage), wire or Wire(), self.memory_producer,
                         max_bytes=max_bytes)
        self.consumer = MemoryConsumer(topics, group or stage)
        self.stop, self.idle_polls = stop, idle_polls
        self.positions: dict[TP, int] = {}  # next offset to deliver per owned partition
        self.client_paused: set[TP] = set()  # what the client fetches not (rebalances clear it, as Kafka's)
        self.polls = 0
        self.pauses: list[TP] = []
        self.resumes: list[TP] = []
        self.rewinds: list[tuple[TP, int]] = []
        self.commits: list[dict[TP, int]] = []
        self.closed = False
        self._idle = 0
        self._topics: list[str] = []
        self._on_assign: Rebalance | None = None
        self._on_revoke: Rebalance | None = None
        self._joined = False
        self._rebalances: list[tuple[list[TP], list[TP]]] = []  # (revoke, assign) at the next poll
        self._scripted: dict[int, list[Callable[[MemoryStageIO], None]]] = {}

    # ------------------------------------------------------------------------------ scripting

    def at_poll(self, n: int, action: Callable[[MemoryStageIO], None]) -> None:
        """Run ``action(self)`` at the start of the ``n``-th poll (1-based), before anything is fetched."""
        self._scripted.setdefault(n, []).append(action)

    def rebalance(self, *, revoke: Iterable[TP] = (), assign: Iterable[TP] = ()) -> None:
        """At the next poll hand these partitions away (``on_revoke``) and take these (``on_assign``)."""
        self._rebalances.append((list(revoke), list(assign)))

    def restarted(self) -> MemoryStageIO:
        """A fresh twin of the same stage and group over the same topics: the process after a restart
        (new counters, nothing open, every partition starting at the group's committed offset, and a new
        ``stop`` event where this one had one: the old one is set once its loop ended)."""
        stop = threading.Event() if self.stop is not None else None
        return MemoryStageIO(self.topics, self.stage, group=self.consumer.group, wire=self.wire, stop=stop,
                             idle_polls=self.idle_polls, max_bytes=self.dlq.max_bytes)

    # ------------------------------------------------------------------------------ client calls

    def _join(self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance) -> None:
        self._topics, self._on_assign, self._on_revoke = topics, on_assign, on_revoke

    def _fetch(self, n: int, timeout: float) -> list[Message]:
        """Deliver up to ``n`` records of the owned, unpaused partitions (each drained in turn); no wait."""
        self.polls += 1
        for action in self._scripted.pop(self.polls, []):
            action(self)
        if not self._joined and self._topics:
            self._joined = True
            self._hand(revoke=[], assign=[(t, p) for t in self._topics for p in range(self.topics.partitions(t))])
        while self._rebalances:
            self._hand(*self._rebalances.pop(0))
        out: list[Message] = []
        for tp in sorted(self.positions):
            if tp in self.client_paused:
                continue
            while len(out) < n:
                pos = self.positions[tp]
                if self.topics.aborts_at(tp, pos):
                    if out:  # the stage gets what came before, and crashes on its next read
                        return self._delivered(out)
                    self.topics.aborts[tp].discard(pos)  # it fires once
                    self.memory_producer.queue.clear()  # the crash loses what was not flushed
                    self.closed = True  # and runs no callback: close() does nothing after it
                    raise Aborted(f"{self.stage}: scripted abort reading {tp[0]}[{tp[1]}]@{pos}")
                if pos >= self.topics.end(tp):
                    break
                out.append(self.topics.logs[tp][pos].message())
                self.positions[tp] = pos + 1
        return self._delivered(out)

    def _delivered(self, out: list[Message]) -> list[Message]:
        self._idle = 0 if out else self._idle + 1
        idle = self.idle_polls and self._idle >= self.idle_polls
        if self.stop is not None and idle and (self.drained() or self._idle >= 1000 * self.idle_polls):
            self.stop.set()
        return out

    def drained(self) -> bool:
        """Every record of the owned tracked partitions is committed and no output waits for a flush."""
        done = self.topics.committed.get(self.consumer.group, {})
        return not self.memory_producer.queue and all(
            done.get(tp, 0) >= self.topics.end(tp) for tp in self.positions if tp[0] in self.tracked)

    def _hand(self, revoke: list[TP], assign: list[TP]) -> None:
        gone = [tp for tp in revoke if tp in self.positions]
        if gone and self._on_revoke is not None:
            self._on_revoke(self.consumer, [TopicPartition(t, p) for t, p in gone])
        for tp in gone:
            self.positions.pop(tp, None)
            self.client_paused.discard(tp)
        self.consumer.owned = sorted(self.positions)
        new = [tp for tp in assign if tp not in self.positions]
        if not new:
            return
        parts = [TopicPartition(t, p) for t, p in new]
        self.consumer.owned = sorted([*self.positions, *new])
        if self._on_assign is not None:
            self._on_assign(self.consumer, parts)
        committed = self.topics.committed.get(self.consumer.group, {})
        for tp, part in zip(new, parts, strict=True):
            chosen = self.consumer.starts.pop(tp, part.offset)
            self.positions[tp] = chosen if chosen >= 0 else committed.get(tp, 0)  # else auto.offset.reset

    def update_lag(self, *, force: bool = False) -> dict[str, int]:
        """Records not yet committed per tracked topic over the owned partitions."""
        committed = self.topics.committed.get(self.consumer.group, {})
        lag: dict[str, int] = {}
        for tp in self.positions:
            if tp[0] in self.tracked:
                lag[tp[0]] = lag.get(tp[0], 0) + self.topics.end(tp) - committed.get(tp, 0)
        return lag

    def _owned(self) -> list[TP]:
        return sorted(self.positions)

    def _pause(self, tps: list[TP]) -> None:
        self.client_paused.update(tps)
        self.pauses.extend(tps)

    def _resume(self, tps: list[TP]) -> None:
        self.client_paused.difference_update(tps)
        self.resumes.extend(tps)

    def _seek(self, tp: TP, offset: int) -> None:
        self.client_paused.add(tp)
        self.positions[tp] = offset
        self.rewinds.append((tp, offset))

    def _commit_offsets(self, offsets: dict[TP, int]) -> None:
        owned = {tp: o for tp, o in offsets.items() if tp in self.positions}  # a revoked one fails, as Kafka's
        if owned:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in owned.items()])
            self.commits.append(owned)

    def committed(self) -> dict[TP, int]:
        """The group's committed offsets now."""
        return dict(self.topics.committed.get(self.consumer.group, {}))

    def close(self) -> None:
        """Flush, hand every partition back (the stage's ``on_revoke`` runs, as on a consumer close), flush."""
        if self.closed:
            return
        self.closed = True
        self.memory_producer.flush()
        self._hand(revoke=sorted(self.positions), assign=[])
        self.memory_producer.flush()


if TYPE_CHECKING:
    def _fits_the_port(io: MemoryStageIO) -> StagePort:
        """mypy proves the twin has the port's shape (as stage_io.py does for the Kafka adapter)."""
        return io
