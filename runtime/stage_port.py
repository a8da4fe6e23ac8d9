"""The port a worker stage's loop is written against, and the cycle rules every adapter of it shares.

A stage (indexer, anchors, labeler, trainer, calibration monitor) needs a small surface of its I/O:
join a group, take messages, decode or dead-letter them, say when one is done, pause, rewind and resume
partitions, flush and commit. :class:`StagePort` names that surface, so a loop can run over Kafka
(:class:`~runtime.stage_io.StageIO`) or over memory (:class:`~runtime.stage_io_memory.MemoryStageIO`,
where the rules are millisecond unit tests instead of broker tests).

:class:`StageRules` holds the rules themselves, once, for both adapters: where a message's offset goes
(the :class:`~runtime.offsets.OffsetLedger`), when it is done, what a decode or processing failure
sends to the DLQ, that a commit follows a flush and covers only up to the oldest open message, what a
rewind and a rebalance do to the ledger. An adapter supplies only the client calls (the abstract
methods: ``_fetch``, ``_owned``, ``_pause``, ``_resume``, ``_seek``, ``_commit_offsets``, ``_join``,
``update_lag``, ``close``), so the twin cannot drift from the Kafka implementation in the rules the
tests check.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar, runtime_checkable

from confluent_kafka import Message, TopicPartition
from pydantic import BaseModel

from runtime.kafka import Accounting, DeadLetters, Produces, flush_until_empty
from runtime.offsets import TP, OffsetLedger
from runtime.serde import Wire
from schemas.codec import DecodeError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
# a rebalance callback: (the group client, the partitions); stages read only topic/partition/offset
Rebalance = Callable[[Any, list[TopicPartition]], None]


def tp_of(m: Message) -> TP:
    """(topic, partition) of a message."""
    return (m.topic() or "?", m.partition() or 0)


class GroupClient(Protocol):
    """What a stage asks of the group client itself (the trainer commits its checkpoint's offsets)."""

    def assignment(self) -> list[TopicPartition]: ...

    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[False]) -> list[TopicPartition]: ...


@runtime_checkable
class StagePort(Protocol):
    """The I/O surface a stage's loop uses; both adapters satisfy it (tests/unit/runtime/test_stage_port.py, mypy)."""

    stage: str
    accounting: Accounting
    wire: Wire
    ledger: OffsetLedger
    dlq: DeadLetters
    paused: set[TP]

    @property
    def producer(self) -> Produces: ...

    @property
    def consumer(self) -> GroupClient: ...

    def subscribe(self, topics: Sequence[str], *, tracked: Iterable[str] | None = None,
                  on_assign: Rebalance | None = None, on_revoke: Rebalance | None = None) -> None: ...

    def poll(self, n: int, timeout: float) -> list[Message]: ...

    def update_lag(self, *, force: bool = False) -> dict[str, int]: ...

    def decode(self, m: Message, model: type[M]) -> M | None: ...

    def dead_letter(self, m: Message, err: Exception, reason: str | None = None) -> None: ...

    def processing(self, m: Message) -> AbstractContextManager[None]: ...

    def done(self, m: Message) -> None: ...

    def rewind(self, m: Message) -> None: ...

    def pause(self, tps: Iterable[TP] | None = None) -> None: ...

    def resume(self, tps: Iterable[TP] | None = None) -> None: ...

    def flush(self, stop: threading.Event, what: str = "outputs") -> bool: ...

    def commit(self, stop: threading.Event | None = None, *, what: str = "outputs",
               offsets: dict[TP, int] | None = None) -> bool: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class StageRules(ABC):
    """The consume → decode → dead-letter → flush → commit rules over an adapter's clients.

    ``tracked`` names the topics whose offsets the ledger commits (default: all subscribed topics);
    a topic read whole as state on every assignment (the labeler's ``anchors``) is left out.
    """

    def __init__(self, stage: str, accounting: Accounting, wire: Wire, producer: Produces, *,
                 max_bytes: int | None = None) -> None:
        self.stage = stage
        self.accounting = accounting
        self.wire = wire
        self._producer = producer
        self.dlq = DeadLetters(producer, stage, accounting, wire, max_bytes=max_bytes)
        self.ledger = OffsetLedger()
        self.tracked: set[str] = set()
        self.paused: set[TP] = set()

    @property
    def producer(self) -> Produces:
        """Where the stage's outputs and dead letters go (flushed before every commit)."""
        return self._producer

    # ------------------------------------------------------------------------------ adapter hooks

    @abstractmethod
    def _fetch(self, n: int, timeout: float) -> list[Message]:
        """Up to ``n`` good messages, waiting up to ``timeout`` for the first."""

    @abstractmethod
    def _owned(self) -> list[TP]:
        """The partitions assigned now."""

    @abstractmethod
    def _pause(self, tps: list[TP]) -> None:
        """Stop fetching these partitions."""

    @abstractmethod
    def _resume(self, tps: list[TP]) -> None:
        """Fetch these partitions again."""

    @abstractmethod
    def _seek(self, tp: TP, offset: int) -> None:
        """Pause ``tp`` and move its fetch position back to ``offset``."""

    @abstractmethod
    def _commit_offsets(self, offsets: dict[TP, int]) -> None:
        """Commit next-offsets; a failure is logged, not raised (the next owner re-reads)."""

    @abstractmethod
    def _join(self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance) -> None:
        """Subscribe; the callbacks run when partitions are assigned and revoked."""

    @abstractmethod
    def close(self) -> None:
        """Flush what is queued and release the clients (idempotent)."""

    # ------------------------------------------------------------------------------ subscription

    def subscribe(self, topics: Sequence[str], *, tracked: Iterable[str] | None = None,
                  on_assign: Rebalance | None = None, on_revoke: Rebalance | None = None) -> None:
        """Join the group; revoked partitions are forgotten by the ledger after ``on_revoke`` ran."""
        self.tracked = set(topics if tracked is None else tracked)

        def assigned(c: Any, parts: list[TopicPartition]) -> None:
            if on_assign is not None:
                on_assign(c, parts)
            self._assigned([(tp.topic, tp.partition) for tp in parts])

        def revoked(c: Any, parts: list[TopicPartition]) -> None:
            if on_revoke is not None:
                on_revoke(c, parts)
            self._revoked([(tp.topic, tp.partition) for tp in parts])

        self._join(list(topics), assigned, revoked)

    def _assigned(self, tps: list[TP]) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """After the stage's ``on_assign``: nothing the rules keep (an adapter may add its own)."""

    def _revoked(self, lost: list[TP]) -> None:
        """After the stage's ``on_revoke``: the partitions' open work is the next owner's."""
        self.ledger.forget(lost)
        self.paused.difference_update(lost)

    # ------------------------------------------------------------------------------------ consume

    def poll(self, n: int, timeout: float) -> list[Message]:
        """Up to ``n`` messages, waiting up to ``timeout`` for the first; each is open in the ledger
        (if its topic is tracked) until :meth:`done`. The stage counts them ``in`` itself."""
        out = self._fetch(n, timeout)
        for m in out:
            tp = tp_of(m)
            if tp[0] in self.tracked:
                self.ledger.read(tp, m.offset() or 0)
        return out

    @abstractmethod
    def update_lag(self, *, force: bool = False) -> dict[str, int]:
        """Records still to commit per tracked topic over the owned partitions."""

    def decode(self, m: Message, model: type[M]) -> M | None:
        """The message as its contract, or None after sending it to the DLQ (then it is done)."""
        try:
            return self.wire.decode(m.topic() or "?", m.value(), model)
        except DecodeError as e:
            self.dead_letter(m, e)
            return None

    def dead_letter(self, m: Message, err: Exception, reason: str | None = None) -> None:
        """Send the message to its DLQ with the reason; it is done."""
        self.dlq.send(m, err, reason)
        self.done(m)

    @contextmanager
    def processing(self, m: Message) -> Iterator[None]:
        """Run one message's domain step: any exception sends the message to its DLQ (``processing_error``,
        with the exception text, original bytes and origin offset) and the loop goes on. Without it a bug
        that one input triggers either stops the stage or, caught and logged, leaves the input nowhere."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every exception of one message's step ends in its DLQ
            log.exception("%s: processing %s[%d]@%d failed", self.stage, *tp_of(m), m.offset() or 0)
            self.dead_letter(m, RuntimeError(f"{type(e).__name__}: {e}"), reason="processing_error")

    def done(self, m: Message) -> None:
        """The message's work is finished; its offset may be committed after the next flush."""
        tp = tp_of(m)
        if tp[0] in self.tracked:
            self.ledger.done(tp, m.offset() or 0)

    # ------------------------------------------------------------------------------- backpressure

    def rewind(self, m: Message) -> None:
        """Pause the message's partition and seek it back to the message: it will be read again."""
        tp = tp_of(m)
        offset = m.offset() or 0
        self._seek(tp, offset)
        self.ledger.rewind(tp, offset)
        self.paused.add(tp)

    def pause(self, tps: Iterable[TP] | None = None) -> None:
        """Stop fetching these partitions (default: the whole assignment)."""
        chosen = self._owned() if tps is None else list(tps)
        if chosen:
            self._pause(chosen)
            self.paused.update(chosen)

    def resume(self, tps: Iterable[TP] | None = None) -> None:
        """Fetch these paused partitions again (default: every paused one)."""
        chosen = set(self.paused if tps is None else tps) & self.paused
        if chosen:
            self._resume(sorted(chosen))
            self.paused -= chosen

    # ------------------------------------------------------------------------------------- commit

    def flush(self, stop: threading.Event, what: str = "outputs") -> bool:
        """Everything produced so far is on the broker; False if ``stop`` came first."""
        return flush_until_empty(self._producer, stop, what)

    def commit(self, stop: threading.Event | None = None, *, what: str = "outputs",
               offsets: dict[TP, int] | None = None) -> bool:
        """Flush, then commit the ledger's positions (or ``offsets``). False if the flush was cut short.

        A failed commit (e.g. the partitions were revoked meanwhile) is logged, not raised: the next
        owner re-reads from the last committed offset and every stage's outputs are idempotent.
        """
        if stop is not None:
            if not self.flush(stop, what):
                return False
        elif self._producer.flush(10) > 0:
            return False
        self._commit_offsets(self.ledger.committable() if offsets is None else offsets)
        return True

    # -------------------------------------------------------------------------------------- close

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
