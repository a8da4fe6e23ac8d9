"""The rules of a stage's I/O, on the in-memory twin (runtime/stage_io_memory.py): no broker, milliseconds.

The rules are :class:`~runtime.stage_port.StageRules`, the same code the Kafka adapter runs; these
tests pin them: commit only after a flush and only up to the oldest open message, restart from the
committed offset, dead letters with the original bytes, error and origin, backpressure by pause,
rewind and resume, deferral (finishing out of order), and what a rebalance hands over.
"""

from __future__ import annotations

import base64
import threading

import pytest
from confluent_kafka import Message, TopicPartition

from runtime.stage_io_memory import ABORT, Aborted, MemoryStageIO, MemoryTopics
from schemas.events import ItemEvent

T = "items"


def _item(i: int) -> bytes:
    return ItemEvent(item_id=i, text=f"item {i}").model_dump_json().encode()


def _twin(topics: MemoryTopics, *, tracked: list[str] | None = None, **kw: object) -> MemoryStageIO:
    io = MemoryStageIO(topics, "test", **kw)  # type: ignore[arg-type]
    io.subscribe([T], tracked=tracked)
    return io


def _offsets(msgs: list[Message]) -> list[int]:
    return [m.offset() or 0 for m in msgs]


def test_commit_covers_only_up_to_the_oldest_open_message() -> None:
    """Finishing out of order (read-ahead, priorities) never lets a restart skip unfinished work."""
    topics = MemoryTopics()
    topics.script(T, [_item(i) for i in range(5)])
    io = _twin(topics)
    msgs = io.poll(10, 0.1)
    assert _offsets(msgs) == [0, 1, 2, 3, 4]
    for m in msgs:
        if m.offset() != 2:
            io.done(m)
    assert io.commit(threading.Event())
    assert io.committed() == {(T, 0): 2}
    io.done(msgs[2])
    assert io.commit(threading.Event())
    assert io.committed() == {(T, 0): 5}
    assert io.commits == [{(T, 0): 2}, {(T, 0): 5}]


def test_nothing_is_committed_before_the_outputs_are_flushed() -> None:
    """A commit follows a flush; a flush cut short by ``stop`` commits nothing, and a retried one does."""
    topics = MemoryTopics()
    topics.script(T, [_item(0)])
    io = _twin(topics)
    (m,) = io.poll(1, 0.1)
    io.producer.produce("out", b"result of 0")
    io.done(m)
    io.memory_producer.fail_flushes = 1
    stop = threading.Event()
    stop.set()
    assert not io.commit(stop)  # the broker did not acknowledge and the stage is stopping
    assert io.committed() == {} and topics.records("out") == []
    io.memory_producer.fail_flushes = 2
    assert io.commit(threading.Event())  # retried until delivered, then committed
    assert [r.value for r in topics.records("out")] == [b"result of 0"]
    assert io.committed() == {(T, 0): 1}
    io.producer.produce("out", b"result of 1")
    io.memory_producer.fail_flushes = 1
    io.ledger.read((T, 0), 1)
    io.ledger.done((T, 0), 1)
    assert not io.commit()  # without a stop event: one flush, and no commit if it did not empty the queue
    assert io.committed() == {(T, 0): 1}


def test_a_restart_resumes_at_the_committed_offset_and_loses_what_was_not_flushed() -> None:
    """The scripted abort crashes the stage once; the restarted twin re-reads what was not committed."""
    topics = MemoryTopics()
    topics.script(T, [_item(0), _item(1), ABORT, _item(2), _item(3)])
    io = _twin(topics)
    first = io.poll(10, 0.1)
    assert _offsets(first) == [0, 1]  # what comes before the abort is delivered; the next poll crashes
    for m in first:
        io.producer.produce("out", m.value())
        io.done(m)
    assert io.commit(threading.Event())
    io.producer.produce("out", b"never flushed")
    with pytest.raises(Aborted):
        io.poll(10, 0.1)
    again = io.restarted()
    again.subscribe([T])
    rest = again.poll(10, 0.1)
    assert _offsets(rest) == [2, 3]  # no ABORT the second time: it fires once, like a crash
    assert [r.value for r in topics.records("out")] == [_item(0), _item(1)]  # the unflushed one is gone


def test_an_uncommitted_message_is_read_again_after_a_restart() -> None:
    topics = MemoryTopics()
    topics.script(T, [_item(0), _item(1), _item(2)])
    io = _twin(topics)
    msgs = io.poll(3, 0.1)
    io.done(msgs[0])
    io.done(msgs[2])  # offset 1 still open: the commit stops before it
    assert io.commit(threading.Event())
    again = io.restarted()
    again.subscribe([T])
    assert _offsets(again.poll(10, 0.1)) == [1, 2]


def test_dead_letters_keep_the_original_bytes_the_error_and_the_origin() -> None:
    topics = MemoryTopics({T: 2})
    topics.script(T, {1: [_item(0), b"{not json", (b"k", b'{"item_id": "x"}'), _item(3)]})
    io = _twin(topics)
    msgs = io.poll(10, 0.1)
    decoded = [io.decode(m, ItemEvent) for m in msgs]
    assert [d is not None for d in decoded] == [True, False, False, True]
    with io.processing(msgs[3]):
        raise ValueError("boom")
    io.done(msgs[0])
    assert io.commit(threading.Event())
    assert io.committed() == {(T, 1): 4}  # a dead-lettered message is done
    dls = topics.dead_letters(T)
    assert [(d.partition, d.offset, d.reason) for d in dls] == [
        (1, 1, "malformed_json"), (1, 2, "schema"), (1, 3, "processing_error")]
    assert base64.b64decode(dls[0].value) == b"{not json"
    assert dls[1].key == "k" and "item_id" in dls[1].error
    assert dls[2].error == "ValueError: boom" and dls[2].stage == "test"
    assert io.accounting.snapshot() == {"dlq:malformed_json": 1, "dlq:schema": 1, "dlq:processing_error": 1}


def test_pause_holds_the_partitions_and_resume_delivers_what_waited() -> None:
    """Backpressure: the backlog stays in the log while paused, not in the stage's memory."""
    topics = MemoryTopics({T: 2})
    topics.script(T, {0: [_item(0), _item(1)], 1: [_item(2)]})
    io = _twin(topics)
    assert len(io.poll(1, 0.1)) == 1  # the first poll joins the group: both partitions
    io.pause()
    assert io.paused == {(T, 0), (T, 1)} and io.pauses == [(T, 0), (T, 1)]
    assert io.poll(10, 0.1) == []
    io.resume([(T, 1)])
    assert [(m.partition(), m.offset()) for m in io.poll(10, 0.1)] == [(1, 0)]
    io.resume()
    assert [(m.partition(), m.offset()) for m in io.poll(10, 0.1)] == [(0, 1)]
    assert io.resumes == [(T, 1), (T, 0)] and io.paused == set()


def test_rewind_pauses_the_partition_and_reads_from_the_message_again() -> None:
    """A message that cannot be taken now: its partition is paused and sought back to it."""
    topics = MemoryTopics()
    topics.script(T, [_item(i) for i in range(5)])
    io = _twin(topics)
    msgs = io.poll(10, 0.1)
    io.done(msgs[0])
    io.done(msgs[1])
    io.rewind(msgs[2])
    assert io.rewinds == [((T, 0), 2)] and io.paused == {(T, 0)}
    assert io.ledger.pending() == 0  # 2..4 will be read again: not open any more
    assert io.poll(10, 0.1) == []
    assert io.commit(threading.Event()) and io.committed() == {(T, 0): 2}
    io.resume()
    assert _offsets(io.poll(10, 0.1)) == [2, 3, 4]


def test_deferral_with_a_bounded_queue_never_skips_and_never_commits_past_a_deferred_message() -> None:
    """The labeler's pattern: defer what cannot be served yet, rewind when the deferral queue is full,
    resume once it drained; every message ends done exactly once and the commit trails the oldest."""
    topics = MemoryTopics()
    topics.script(T, [_item(i) for i in range(10)])
    io = _twin(topics)
    deferred: list[Message] = []
    served: list[int] = []
    cap = 2
    for _ in range(20):
        for m in io.poll(3, 0.1):
            off = m.offset() or 0
            if off % 3 == 0:  # "no anchors yet": defer, or rewind when the queue is full
                if len(deferred) >= cap:
                    io.rewind(m)
                    break
                deferred.append(m)
                continue
            served.append(off)
            io.done(m)
        io.commit(threading.Event())
        oldest = min((m.offset() or 0 for m in deferred), default=None)
        committed = io.committed().get((T, 0), 0)
        assert oldest is None or committed <= oldest
        if deferred and io.polls % 2 == 0:  # "anchors arrived": serve the oldest, then resume
            m = deferred.pop(0)
            served.append(m.offset() or 0)
            io.done(m)
            io.resume()
    io.commit(threading.Event())
    assert sorted(served) == list(range(10))
    assert io.committed() == {(T, 0): 10}
    assert io.rewinds  # the queue did fill


def test_a_revoked_partition_commits_what_is_finished_and_the_next_owner_reads_the_rest() -> None:
    topics = MemoryTopics({T: 2})
    topics.script(T, {0: [_item(0), _item(1)], 1: [_item(2), _item(3)]})
    revoked: list[list[tuple[str, int]]] = []
    io = MemoryStageIO(topics, "test")

    def on_revoke(c: object, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        revoked.append(sorted(tps))
        io.commit(offsets=io.ledger.committable(tps))  # what is finished stays finished

    io.subscribe([T], on_revoke=on_revoke)
    msgs = io.poll(10, 0.1)
    io.done(msgs[0])  # partition 0: offset 0 done, 1 open
    io.pause()
    io.rebalance(revoke=[(T, 0)])
    assert io.poll(10, 0.1) == []
    assert revoked == [[(T, 0)]]
    assert io.committed() == {(T, 0): 1}
    assert io.ledger.pending((T, 0)) == 0 and (T, 0) not in io.paused  # forgotten: the next owner's
    other = MemoryStageIO(topics, "test")
    other.subscribe([T])
    other.rebalance(revoke=[(T, 1)])  # a group of two: this member keeps partition 0 only
    assert [(m.partition(), m.offset()) for m in other.poll(10, 0.1)] == [(0, 1)]


def test_on_assign_may_choose_the_start_offsets() -> None:
    """The trainer starts each partition at its checkpoint, not at the committed offset."""
    topics = MemoryTopics()
    topics.script(T, [_item(i) for i in range(5)])
    topics.committed["test"] = {(T, 0): 1}

    def on_assign(c: object, parts: list[TopicPartition]) -> None:
        for p in parts:
            p.offset = 3
        c.assign(parts)  # type: ignore[attr-defined]

    io = MemoryStageIO(topics, "test")
    io.subscribe([T], on_assign=on_assign)
    assert _offsets(io.poll(10, 0.1)) == [3, 4]
    plain = MemoryStageIO(topics, "test")
    plain.subscribe([T])
    assert _offsets(plain.poll(10, 0.1)) == [1, 2, 3, 4]  # else: the group's committed offset
    assert plain.update_lag() == {T: 4}


def test_untracked_topics_are_read_but_never_committed() -> None:
    """The labeler reads ``anchors`` whole on every assignment: its offsets are not the ledger's."""
    topics = MemoryTopics()
    topics.script(T, [_item(0)])
    topics.script("state", [b"{}"])
    io = MemoryStageIO(topics, "test")
    io.subscribe([T, "state"], tracked=[T])
    for m in io.poll(10, 0.1):
        io.done(m)
    assert io.commit(threading.Event())
    assert io.committed() == {(T, 0): 1}


def test_idle_polls_stop_the_loop_once_the_input_is_drained() -> None:
    topics = MemoryTopics()
    topics.script(T, [_item(0), _item(1)])
    stop = threading.Event()
    io = _twin(topics, stop=stop, idle_polls=3)
    seen = []
    while not stop.is_set():
        for m in io.poll(1, 0.1):
            seen.append(m.offset())
            io.done(m)
            io.commit(stop)
    assert seen == [0, 1] and io.polls == 5
    stuck = _twin(MemoryTopics(), stop=threading.Event(), idle_polls=1)
    stuck.topics.script(T, [_item(0)])
    while not stuck.stop.is_set():  # type: ignore[union-attr]
        stuck.poll(10, 0.1)  # never done: not drained, but the loop still ends
    assert stuck.polls == 1001


def test_close_runs_the_stages_revoke_and_flushes() -> None:
    topics = MemoryTopics()
    topics.script(T, [_item(0)])
    calls: list[str] = []
    with MemoryStageIO(topics, "test") as io:
        io.subscribe([T], on_revoke=lambda c, parts: calls.append("revoke"))
        io.poll(1, 0.1)
        io.producer.produce("out", b"x")
    assert calls == ["revoke"] and io.closed
    assert [r.value for r in topics.records("out")] == [b"x"]
