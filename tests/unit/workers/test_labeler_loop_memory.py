"""The labeler's loop rules through the in-memory StageIO: no broker, milliseconds.

``Labeler.run`` takes the twin (runtime/stage_io_memory.py) in place of its Kafka I/O. What is checked is
the loop's own bookkeeping: deferral of a batch whose user has no anchors yet (labeled when they come,
dropped as ``timed_out`` past the wait, left uncommitted and re-read after a restart), backpressure when
the deferred queue is full (pause, rewind, resume), and abstention without a calibrator
(workers/labeler/abstention.py: batches held uncommitted, the oldest past ``keep_abstained``
dead-lettered, the rest relabelled as soon as a calibrator is written, or re-read after a restart).
The broker tests stay (tests/integration/test_labeler.py, tests/integration/test_calibrated_labeler.py).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from runtime.settings import Settings, load
from runtime.stage_io_memory import MemoryStageIO, MemoryTopics
from schemas.codec import encode
from schemas.events import AnchorSet, SampleBatch, UnexposedBatch
from schemas.topics import ANCHORS, SAMPLES, UNEXPOSED
from tests.helpers import item_index
from tests.integration.test_calibrated_labeler import _calibrator
from tests.integration.test_labeler import ALL_IDS, ENC, ITEMS, _anchors, _batch
from workers.labeler.loop import STAGE, Labeler

U0 = (UNEXPOSED.name, 0)
BALANCED = {"batches": 0, "candidates": 0, "anchors": 0}


def _settings(tmp_path: Path, **labeler: Any) -> Settings:
    return load(env={}, data_dir=str(tmp_path)).with_overrides(labeler={"label_source": "map", **labeler})


def _labeler(s: Settings) -> Labeler:
    return Labeler(s, item_index(ITEMS, s.encoder.collection, ENC))


def _msg(m: UnexposedBatch | AnchorSet) -> tuple[bytes, bytes]:
    return m.user_id.encode(), encode(m)


def _twin(topics: MemoryTopics, labeler: Labeler) -> MemoryStageIO:
    return MemoryStageIO(topics, STAGE, labeler.accounting, stop=threading.Event(), idle_polls=3)


def _run(labeler: Labeler, io: MemoryStageIO) -> MemoryStageIO:
    assert io.stop is not None
    labeler.run(io.stop, io=io)
    return io


def _labeled(topics: MemoryTopics) -> list[str]:
    return [b.request_id for b in topics.decoded(SAMPLES.name, SampleBatch)]


def _abstaining() -> float | None:
    return REGISTRY.get_sample_value("gpl_labeler_abstaining")


def test_deferred_batches_wait_for_anchors_stay_uncommitted_and_are_reread_after_a_restart(tmp_path: Path) -> None:
    s = _settings(tmp_path, wait_for_anchors_s=60.0)
    topics = MemoryTopics()
    topics.script(ANCHORS.name, [_msg(_anchors(s, "u1", ["running shoes"]))])
    topics.script(UNEXPOSED.name, [_msg(_batch("u1", "r1")), _msg(_batch("u2", "r2")), _msg(_batch("u3", "r3")),
                                   _msg(_batch("u2", "r4"))])
    first = _labeler(s)
    io = _twin(topics, first)
    seen: dict[str, Any] = {}

    def anchors_of_u2_arrive(io: MemoryStageIO) -> None:
        seen.update(deferred=first.deferred, committed=io.committed().get(U0))
        topics.append(ANCHORS.name, encode(_anchors(s, "u2", ["fantasy dragons"])), key="u2")

    io.at_poll(3, anchors_of_u2_arrive)
    _run(first, io)
    assert seen == {"deferred": 3, "committed": 1}  # r1 labeled; r2, r3, r4 waited: the commit stopped at r2
    assert _labeled(topics) == ["r1", "r2", "r4"]  # u2's batches labeled when its anchors came, in order
    acc = first.accounting.snapshot()
    assert (acc["in"], acc["labeled"], acc["deferred"], acc["deferred_at_stop"]) == (4, 3, 3, 1)
    assert acc["candidates_deferred_at_stop"] == len(ALL_IDS) and first.balance() == BALANCED
    assert io.committed()[U0] == 2  # r3 still waited at the stop: never committed past
    assert io.committed()[(SAMPLES.name, 0)] == 3  # its own pseudo-labels read back, skipped, committed
    assert acc["own_pseudo_skipped"] == 3

    topics.append(ANCHORS.name, encode(_anchors(s, "u3", ["cast iron"])), key="u3")
    again = _labeler(s)  # a restart: anchors read whole again, r3 re-read from the commit, r4 again too
    io2 = _run(again, io.restarted())
    assert again.accounting["in"] == 2 and again.accounting["labeled"] == 2 and again.deferred == 0
    assert _labeled(topics)[3:] == ["r3", "r4"]  # r4 twice in all: sample ids are deterministic, trainer dedups
    assert "u1" in again.cache and io2.committed()[U0] == 4 and again.balance() == BALANCED


def test_a_batch_past_its_wait_times_out_and_is_committed(tmp_path: Path) -> None:
    s = _settings(tmp_path, wait_for_anchors_s=0.0)
    topics = MemoryTopics()
    topics.script(UNEXPOSED.name, [_msg(_batch("u9", "r9")), b'{"request_id": "bad", "user_id": "u9"}'])
    labeler = _labeler(s)
    io = _run(labeler, _twin(topics, labeler))
    acc = labeler.accounting.snapshot()
    assert (acc["in"], acc["timed_out"], acc["candidates_timed_out"], acc["dlq:schema"]) == (2, 1, len(ALL_IDS), 1)
    assert io.committed()[U0] == 2 and _labeled(topics) == [] and labeler.balance() == BALANCED
    assert [d.reason for d in topics.dead_letters(UNEXPOSED.name)] == ["schema"]


def test_a_full_deferred_queue_pauses_rewinds_and_resumes_the_partition(tmp_path: Path) -> None:
    s = _settings(tmp_path, max_deferred=1, wait_for_anchors_s=60.0)
    topics = MemoryTopics()
    topics.script(UNEXPOSED.name, [_msg(_batch("u5", f"r{i}")) for i in range(3)])
    labeler = _labeler(s)
    io = _twin(topics, labeler)
    seen: dict[str, Any] = {}

    def anchors_arrive(io: MemoryStageIO) -> None:
        seen.update(taken=labeler.accounting["in"], paused=set(io.paused))
        topics.append(ANCHORS.name, encode(_anchors(s, "u5", ["running watch"])), key="u5")

    io.at_poll(3, anchors_arrive)
    _run(labeler, io)
    assert seen == {"taken": 1, "paused": {U0}}  # nothing beyond the bound was taken while paused
    assert io.rewinds[0] == (U0, 1) and U0 in io.resumes and not io.paused
    assert _labeled(topics) == ["r0", "r1", "r2"]  # each exactly once, in order
    acc = labeler.accounting.snapshot()
    assert (acc["in"], acc["deferred"], acc["labeled"], acc.get("timed_out", 0)) == (3, 1, 3, 0)
    assert acc["paused"] >= 1 and io.committed()[U0] == 3 and labeler.balance() == BALANCED


def test_abstains_holds_uncommitted_dead_letters_past_the_bound_and_relabels_when_a_calibrator_appears(
        tmp_path: Path) -> None:
    s = _settings(tmp_path, label_source="calibrator", keep_abstained=2, random_n=4, cap=4)
    assert not s.calibrator_file.exists()
    topics = MemoryTopics()
    topics.script(ANCHORS.name, [_msg(_anchors(s, "u1", ["running shoes"])),
                                 _msg(_anchors(s, "u2", ["fantasy dragons"]))])
    topics.script(UNEXPOSED.name, [_msg(_batch("u1", "r0")), _msg(_batch("u2", "r1")), _msg(_batch("u1", "r2"))])
    labeler = _labeler(s)
    io = _twin(topics, labeler)
    seen: dict[str, Any] = {}
    cal = _calibrator(s)

    def calibrator_written(io: MemoryStageIO) -> None:
        seen.update(held=len(labeler.held), labeled=labeler.accounting["labeled"], committed=io.committed()[U0],
                    abstaining=_abstaining(), samples=len(topics.records(SAMPLES.name)))
        cal.save(s.calibrator_file)  # what `gpl calibrate` does: loaded on the next loop

    io.at_poll(5, calibrator_written)
    _run(labeler, io)
    # before: r0 pushed past the bound to the DLQ (its offset done), r1 and r2 held, nothing labeled
    assert seen == {"held": 2, "labeled": 0, "committed": 1, "abstaining": 1.0, "samples": 0}
    (dl,) = topics.dead_letters(UNEXPOSED.name)
    assert (dl.offset, dl.reason) == (0, "abstained")
    # after: the held batches relabelled in arrival order with the calibrator, committed to the end
    batches = topics.decoded(SAMPLES.name, SampleBatch)
    assert [b.request_id for b in batches] == ["r1", "r2"]
    assert all(b.lineage is not None and b.lineage.calibrator == cal.version for b in batches)
    acc = labeler.accounting.snapshot()
    assert (acc["in"], acc["abstained"], acc["relabelled"], acc["labeled"], acc["dlq:abstained"]) == (3, 3, 2, 2, 1)
    assert acc["candidates_dlq"] == len(ALL_IDS)
    assert io.committed()[U0] == 3 and len(labeler.held) == 0 and _abstaining() == 0
    assert labeler.balance() == BALANCED


def test_batches_held_at_a_stop_are_reread_after_the_restart(tmp_path: Path) -> None:
    s = _settings(tmp_path, label_source="calibrator")
    topics = MemoryTopics()
    topics.script(ANCHORS.name, [_msg(_anchors(s, "u1", ["running shoes"]))])
    topics.script(UNEXPOSED.name, [_msg(_batch("u1", "r0")), _msg(_batch("u1", "r1"))])
    first = _labeler(s)
    io = _run(first, _twin(topics, first))
    acc = first.accounting.snapshot()
    assert (acc["abstained"], acc["abstained_at_stop"], acc.get("labeled", 0)) == (2, 2, 0)
    assert acc["candidates_abstained_at_stop"] == 2 * len(ALL_IDS) and first.balance() == BALANCED
    assert io.committed().get(U0, 0) == 0 and _labeled(topics) == []

    _calibrator(s).save(s.calibrator_file)
    again = _labeler(s)
    io2 = _run(again, io.restarted())
    assert again.accounting["in"] == 2 and again.accounting["labeled"] == 2
    assert _labeled(topics) == ["r0", "r1"] and io2.committed()[U0] == 2 and again.balance() == BALANCED
