"""Nothing the trainer reads is lost silently: a sample whose item has no vector yet waits (bounded), is
trained once the indexer catches up, survives a restart in the checkpoint, and past the bound goes to
``samples.dlq`` as ``no_vector``; the trainer also checkpoints on a time bound (``checkpoint_every_s``).

The unit part drives the trainer's steps in memory; the last test runs it on the suite's real broker
while the index catches up (a one-shot replay of items + events races the indexer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.settings import Settings
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.ids import sample_id
from tests.integration.test_trainer import (
    DIM,
    MISSING_ITEM,
    item_index,
    produce,
    reached,
    request,
    running,
    tuned,
    wait_for,
)
from workers.model import sample_key
from workers.trainer import Trainer
from workers.trainer.checkpoints import load_checkpoint


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings



def index_missing_item(s: Settings, index: MemoryIndex) -> None:
    """The indexer catches up: the item every ``extra_missing`` request names gets its vector."""
    v = np.random.default_rng(1).normal(size=(1, DIM)).astype(np.float32)
    index.upsert(s.encoder.collection, Points(np.asarray([MISSING_ITEM], np.int64), v / np.linalg.norm(v)))


def test_a_sample_waits_for_its_vector_across_a_restart_and_trains_once_indexed(tmp_path: Path) -> None:
    s = tuned(Settings(data_dir=tmp_path)).with_overrides(trainer={"holdout_fraction": 0.0, "publish": False})
    index = item_index(s)
    t = Trainer(s, index, dim=DIM, progress=False)
    b = request(1, extra_missing=True)
    t._fetch_vectors({x.item_id for x in b.samples})
    assert t._admit(b, ("samples", 1, 3)) == 8
    assert (len(t._pending), len(t.waiting), t.counts["samples"], t.counts["no_vector"]) == (7, 1, 7, 0)
    assert t.counts["vector_waits"] == 1 and t.balance() == 0
    t._admit(b)  # a re-sent copy while one sample waits: 8 duplicates, not a second wait
    assert (t.counts["duplicates"], len(t.waiting), t.balance()) == (8, 1, 0)
    t._release()  # nothing indexed yet: it keeps waiting
    assert len(t.waiting) == 1

    t.checkpoint()  # the waiting sample is in the checkpoint: a new process resumes its wait
    assert load_checkpoint(s.checkpoints_dir)[1]["counts"]["samples"] == 7
    again = Trainer(s, index, progress=False)
    assert len(again.waiting) == 1 and again.accounting["resumed_waiting"] == 1
    assert sample_key(sample_id("r1", MISSING_ITEM)) in again.seen
    index_missing_item(s, index)
    again._fetch_vectors(again.waiting.items())
    again._release()
    assert len(again.waiting) == 0 and again.counts["samples"] == 8 and again.counts["real"] == 4
    assert [(r.item_id, r.user_id) for r in again._pending] == [(MISSING_ITEM, "u1")] and again.balance() == 0


def test_a_sample_whose_wait_ends_in_vain_is_counted_and_forgotten(tmp_path: Path) -> None:
    s = tuned(Settings(data_dir=tmp_path)).with_overrides(trainer={"holdout_fraction": 0.0, "publish": False})
    t = Trainer(s, item_index(s), dim=DIM, progress=False, vector_wait_s=0.0)
    b = request(2, extra_missing=True)
    t._fetch_vectors({x.item_id for x in b.samples})
    t._admit(b)
    t._release()  # max age 0: it leaves at once (outside run() there is no DLQ to send it to; counted)
    assert (len(t.waiting), t.counts["no_vector"], t.accounting["dlq:no_vector"], t.balance()) == (0, 1, 1, 0)
    # forgotten: once its item is indexed, a replay of the dead letter trains it
    assert sample_key(sample_id("r2", MISSING_ITEM)) not in t.seen
    full = Trainer(s, item_index(s), dim=DIM, progress=False, vector_wait_max=1, directory=tmp_path / "b")
    full._fetch_vectors(set(range(1, 41)))
    full._admit(request(3, extra_missing=True))
    full._admit(request(4, extra_missing=True))  # the buffer holds one: r3's sample is pushed out
    assert (len(full.waiting), full.counts["no_vector"], full.balance()) == (1, 1, 0)


def test_the_trainer_on_the_broker_trains_late_indexed_items_and_checkpoints_on_time(settings: Settings) -> None:
    """The race of a one-shot replay: samples reach the trainer before their item's vector. Nothing is
    dropped, and with a count bound far away the time bound still makes them durable while it runs."""
    s = tuned(settings).with_overrides(trainer={"checkpoint_every": 10_000, "checkpoint_every_s": 0.5})
    index = item_index(s)
    produce(s, [request(1, extra_missing=True), request(2)])
    trainer = Trainer(s, index, progress=False)
    with running(trainer):
        wait_for(reached(trainer, samples=14, vector_waits=1, messages=2))
        assert len(trainer.waiting) == 1 and trainer.counts["no_vector"] == 0
        index_missing_item(s, index)
        wait_for(reached(trainer, samples=15))
        # durable while still running, by the time bound alone: the sample that waited is in it
        wait_for(lambda: load_checkpoint(s.checkpoints_dir)[1]["counts"]["samples"] == 15, timeout=10)
        assert len(trainer.waiting) == 0 and trainer.balance() == 0
    c = load_checkpoint(s.checkpoints_dir)[1]["counts"]
    assert (c["samples"], c["no_vector"], c["vector_waits"], c["messages"]) == (15, 0, 1, 2)
