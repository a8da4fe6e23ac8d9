"""The trainer's loop rules through the in-memory StageIO: no broker, milliseconds.

``Trainer.run`` takes the twin (runtime/stage_io_memory.py) in place of its Kafka I/O; what is checked is
the loop's own rules: samples buffered and trained before every checkpoint, offsets committed only after
the checkpoint that covers them (and exactly its offsets), a restart that resumes from the checkpoint's
offsets (the source of truth, not the group's commit), the seen-set dropping re-sent and relabelled
samples, and a checkpoint past the partition's end reset to its beginning. The broker tests stay
(tests/integration/test_trainer.py, tests/integration/test_trainer_offsets.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from runtime.settings import Settings, load
from runtime.stage_io_memory import ABORT, Aborted, MemoryStageIO, MemoryTopics
from schemas.codec import encode
from schemas.events import SampleBatch
from schemas.topics import SAMPLES
from tests.integration.test_trainer import item_index, request, tuned
from workers.trainer import Trainer
from workers.trainer.checkpoints import list_checkpoints, load_checkpoint

TP0 = (SAMPLES.name, 0)


def _settings(tmp_path: Path) -> Settings:
    # batch_size 8, checkpoint_every 10 samples: a request has 7, so a checkpoint follows every second one
    return tuned(load(env={}, data_dir=str(tmp_path))).with_overrides(trainer={"publish": False})


def _msg(b: SampleBatch | bytes) -> tuple[bytes, bytes]:
    return (b.user_id.encode(), encode(b)) if isinstance(b, SampleBatch) else (b"bad", b)


def _run(t: Trainer, io: MemoryStageIO) -> MemoryStageIO:
    assert io.stop is not None
    t.run(io.stop, io=io)
    return io


def _twin(topics: MemoryTopics, t: Trainer) -> MemoryStageIO:
    return MemoryStageIO(topics, t.name, t.accounting, stop=threading.Event(), idle_polls=3)


def test_buffers_trains_checkpoints_then_commits_exactly_the_checkpoints_offsets(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    t = Trainer(s, item_index(s), progress=False)
    topics = MemoryTopics()
    topics.script(SAMPLES.name, [_msg(request(0)), _msg(request(1)), _msg(b"{not json"), _msg(request(2))])
    io = _twin(topics, t)
    checkpointed_at: list[int] = []  # the checkpoint's offset of the partition, each time one is written
    real_checkpoint = t.checkpoint

    def checkpoint() -> Path | None:
        before = topics.committed.get(t.name, {}).get(TP0)
        path = real_checkpoint()
        if path is not None:
            assert not t._pending  # the buffer is trained before the checkpoint is written
            offset = {(tp, p): o for tp, p, o in load_checkpoint(path)[1]["offsets"]}[TP0]
            checkpointed_at.append(offset)
            after = topics.committed[t.name][TP0]
            assert before != offset and after == offset  # committed right after, to the checkpoint's offset
        return path

    t.checkpoint = checkpoint  # type: ignore[method-assign]
    _run(t, io)
    # one checkpoint after the second request (14 samples), one at the clean stop (8 inputs since)
    assert checkpointed_at == [2, 4]
    # the trainer commits its checkpoints' offsets through the group client, never the ledger's positions
    assert io.commits == [] and topics.committed[t.name] == {TP0: 4}
    assert [v for v, _ in list_checkpoints(s.checkpoints_dir)] == [1, 2]
    acc = t.accounting.snapshot()
    assert (acc["in"], acc["samples"], acc["dlq:malformed_json"], acc["checkpoints"]) == (4, 21, 1, 2)
    assert t.balance() == 0
    assert t.counts["steps"] >= 2 and t.counts["messages"] == 4 and t.counts["dlq"] == 1
    (dl,) = topics.dead_letters(SAMPLES.name)
    assert (dl.offset, dl.reason, dl.stage) == (2, "malformed_json", "trainer")


def test_a_crash_resumes_from_the_checkpoint_and_trains_every_sample_once(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    index = item_index(s)
    topics = MemoryTopics()
    topics.script(SAMPLES.name, [_msg(request(n)) for n in range(5)] + [ABORT]
                  + [_msg(request(n)) for n in range(5, 10)])
    first = Trainer(s, index, progress=False)
    with pytest.raises(Aborted):
        _run(first, _twin(topics, first))
    # checkpoints after requests 1 and 3; request 4 was trained in memory only and is lost with the process
    ckpt = load_checkpoint(s.checkpoints_dir)[1]
    assert ckpt["offsets"] == [[SAMPLES.name, 0, 4]] and topics.committed["trainer"] == {TP0: 4}
    topics.committed["trainer"] = {TP0: 0}  # a commit lost or rewound: the checkpoint still decides

    again = Trainer(s, index, progress=False)
    assert again.version == 2 and again.counts["samples"] == 28
    io = _run(again, _twin(topics, again))
    assert again.accounting["in"] == 6  # offsets 4..9: request 4 once more, nothing the checkpoint covered
    assert (again.counts["samples"], again.counts["duplicates"]) == (70, 0)
    assert io.committed() == {TP0: 10} and again.balance() == 0
    assert load_checkpoint(s.checkpoints_dir)[1]["offsets"] == [[SAMPLES.name, 0, 10]]


def test_the_seen_set_drops_resent_and_relabelled_samples(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    t = Trainer(s, item_index(s), progress=False)
    relabelled = request(1)
    assert relabelled.lineage is not None
    relabelled = relabelled.model_copy(update={  # the same request labelled again with newer anchors
        "lineage": relabelled.lineage.model_copy(update={"anchor_version": 2})})
    topics = MemoryTopics()
    topics.script(SAMPLES.name, [_msg(request(0)), _msg(request(1)), _msg(request(0)), _msg(relabelled)])
    _run(t, _twin(topics, t))
    acc = t.accounting.snapshot()
    assert (acc["samples"], acc["duplicate"]) == (28, 14)
    assert (t.counts["samples"], t.counts["duplicates"]) == (14, 14)
    assert len(t.seen) == 14 and t.balance() == 0
    # a restart keeps the seen-set: the same requests once more are duplicates again
    topics.script(SAMPLES.name, [_msg(request(0))])
    again = Trainer(s, item_index(s), progress=False)
    _run(again, _twin(topics, again))
    assert (again.counts["samples"], again.counts["duplicates"]) == (14, 21)


def test_a_checkpoint_past_the_partitions_end_restarts_it_from_the_beginning(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    index = item_index(s)
    old = MemoryTopics()
    old.script(SAMPLES.name, [_msg(request(n)) for n in range(6)])
    first = Trainer(s, index, progress=False)
    _run(first, _twin(old, first))
    assert load_checkpoint(s.checkpoints_dir)[1]["offsets"] == [[SAMPLES.name, 0, 6]]

    fresh = MemoryTopics()  # the broker lost its data: a new log, shorter than the checkpoint's offset
    fresh.script(SAMPLES.name, [_msg(request(2)), _msg(request(7)), _msg(request(8))])
    again = Trainer(s, index, progress=False)
    io = _run(again, _twin(fresh, again))
    assert again.offset_resets == [(SAMPLES.name, 0, 6, 0)]
    assert again.accounting["in"] == 3  # read from the beginning: request 2 deduplicated, 7 and 8 trained
    assert (again.counts["samples"], again.counts["duplicates"]) == (56, 7)
    assert io.committed() == {TP0: 3}
