"""The trainer after its broker lost the data: checkpointed offsets past the topic's end.

On the real embedded broker, twice: run 1 trains on broker A and checkpoints offsets; broker A goes
away (memory storage: everything is lost) and broker B starts empty with fewer messages than the
checkpoint's offsets. Without a policy the trainer waits past the end and trains 0 new batches; with
it, it resets to the beginning, says so in an ERROR line and a counter, and trains them all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from runtime.broker import EmbeddedBroker
from runtime.kafka import create_topics
from tests.fixtures.settings import make_settings
from tests.integration.test_trainer import item_index, produce, reached, request, running, tuned, wait_for
from workers.trainer import Trainer
from workers.trainer.checkpoints import load_checkpoint

pytestmark = pytest.mark.integration


def _resets(stage: str) -> float:
    return REGISTRY.get_sample_value("gpl_offset_resets_total", {"stage": stage, "topic": "samples"}) or 0.0


def test_offsets_past_the_end_reset_to_the_beginning_loudly(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with EmbeddedBroker(log_file=tmp_path / "a.log") as a:
        s = tuned(make_settings(tmp_path, a, partitions=1))
        create_topics(s.kafka)
        index = item_index(s)
        produce(s, [request(n) for n in range(10)])  # 70 samples, offsets 0..9
        first = Trainer(s, index, progress=False)
        with running(first):
            wait_for(reached(first, samples=70, messages=10))
        assert {(t, p): o for t, p, o in load_checkpoint(s.checkpoints_dir)[1]["offsets"]} == {("samples", 0): 10}

    # the broker lost everything; new traffic: 4 new requests and one trained before (a replay)
    with EmbeddedBroker(log_file=tmp_path / "b.log") as b:
        s2 = tuned(make_settings(tmp_path, b, partitions=1))
        create_topics(s2.kafka)
        produce(s2, [request(n) for n in range(10, 14)] + [request(3)])
        before = _resets("trainer")
        again = Trainer(s2, index, progress=False)
        with caplog.at_level(logging.ERROR, logger="workers.trainer"), running(again):
            wait_for(reached(again, samples=98, messages=15), timeout=30)
        assert again.offset_resets == [("samples", 0, 10, 0)]
        assert _resets("trainer") == before + 1
        assert any(r.levelno == logging.ERROR and "ends at 5" in r.getMessage() and "resetting" in r.getMessage()
                   for r in caplog.records)
        c = load_checkpoint(s2.checkpoints_dir)[1]
        assert (c["counts"]["samples"], c["counts"]["duplicates"]) == (98, 7)  # the replayed request: dropped
        assert {(t, p): o for t, p, o in c["offsets"]} == {("samples", 0): 5}
