"""The trainer on the real broker: dedup, dead letters, checkpoints, committed offsets, exact resume."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from runtime.kafka import consumer, producer
from runtime.settings import Settings
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.codec import decode, encode
from schemas.events import DeadLetter, Lineage, Sample, SampleBatch
from schemas.ids import sample_id
from workers.model import sample_key
from workers.trainer import Trainer
from workers.trainer import stage as trainer_stage
from workers.trainer.checkpoints import LATEST, list_checkpoints, load_checkpoint
from workers.trainer.holdout import is_holdout
from workers.trainer.published_area import PublishedArea


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings

pytestmark = pytest.mark.integration

DIM = 16
MISSING_ITEM = 999  # never indexed: its samples wait for a vector, then go to samples.dlq as no_vector


def tuned(settings: Settings, **kafka: object) -> Settings:
    return settings.with_overrides(
        trainer={
            "batch_size": 8,
            "checkpoint_every": 10,
            "keep_checkpoints": 3,
            "hash_buckets": 1024,
            "id_dim": 8,
            "hidden": 16,
        },
        kafka={**settings.kafka.model_dump(), **kafka},
    )


def item_index(settings: Settings) -> MemoryIndex:
    idx = MemoryIndex()
    idx.ensure_collection(settings.encoder.collection, DIM)
    v = np.random.default_rng(0).normal(size=(40, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    idx.upsert(settings.encoder.collection, Points(np.arange(1, 41, dtype=np.int64), v))
    return idx


def request(n: int, *, extra_missing: bool = False) -> SampleBatch:
    """3 exposed samples (1 click) and 4 pseudo samples for request ``r<n>`` of user ``u<n>``."""
    rid = f"r{n}"
    items = [((n + k) % 40) + 1 for k in range(7)]
    samples = [
        Sample(sample_id=sample_id(rid, items[0]), item_id=items[0], label=1.0, weight=1.0, source="click")
    ]
    samples += [
        Sample(sample_id=sample_id(rid, i), item_id=i, label=0.0, weight=1.0, source="exposed-negative")
        for i in items[1:3]
    ]
    samples += [
        Sample(sample_id=sample_id(rid, i, 1), item_id=i, label=0.3 + 0.1 * k, weight=0.5, source="pseudo")
        for k, i in enumerate(items[3:])
    ]
    if extra_missing:
        samples.append(
            Sample(
                sample_id=sample_id(rid, MISSING_ITEM),
                item_id=MISSING_ITEM,
                label=0.0,
                weight=1.0,
                source="exposed-negative",
            )
        )
    lineage = Lineage(
        anchor_version=1,
        anchor_model="test",
        prompt_hash="h",
        encoder="hash-bow-64",
        collection="items__hash-bow-64",
    )
    return SampleBatch(
        request_id=rid, user_id=f"u{n}", ts=1_700_000_000_000 + n, samples=samples, lineage=lineage
    )


def produce(settings: Settings, values: Sequence[SampleBatch | bytes], partition: int | None = None) -> None:
    p = producer(settings.kafka)
    for n, v in enumerate(values):
        raw = encode(v) if isinstance(v, SampleBatch) else v
        key = (v.user_id if isinstance(v, SampleBatch) else f"bad{n}").encode()
        if partition is None:
            p.produce("samples", raw, key=key)
        else:
            p.produce("samples", raw, key=key, partition=partition)
    assert p.flush(10) == 0


@contextmanager
def running(trainer: Trainer) -> Iterator[Trainer]:
    """Run the trainer in a thread; a clean stop on exit, and its exception (if any) re-raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            trainer.run(stop)
        except BaseException as e:  # surfaced in the test thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        yield trainer
    finally:
        stop.set()
        t.join(30)
        assert not t.is_alive(), "trainer did not stop"
    if errors:
        raise errors[0]


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def reached(trainer: Trainer, **want: int) -> Callable[[], bool]:
    return lambda: all(trainer.counts[k] >= v for k, v in want.items())


def test_trains_checkpoints_commits_and_resumes_exactly(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = tuned(settings)
    index = item_index(s)

    # run 1: 6 requests (42 samples), one re-sent request (7 duplicates), one sample whose item never gets
    # a vector (it waits 1 s, then is dead-lettered), a message that is not JSON and one that is JSON but not
    # a SampleBatch
    first = [request(n, extra_missing=n == 5) for n in range(6)]
    produce(s, [*first, first[0], b"{not json", b'{"request_id": "x"}'])
    trainer = Trainer(s, index, progress=False, vector_wait_s=1.0)
    with running(trainer):
        wait_for(reached(trainer, samples=42, duplicates=7, no_vector=1, dlq=2))
    _, meta = load_checkpoint(s.checkpoints_dir)
    c = meta["counts"]
    assert (c["samples"], c["real"], c["clicks"], c["pseudo"]) == (42, 18, 6, 24)
    assert (c["duplicates"], c["no_vector"], c["dlq"], c["messages"]) == (7, 1, 2, 9)
    assert trainer.accounting["dlq:malformed_json"] == 1 and trainer.accounting["dlq:schema"] == 1
    assert trainer.accounting["dlq:no_vector"] == 1 and c["vector_waits"] == 1 and trainer.balance() == 0
    # real labels whose sample id hashes into the holdout are counted, never trained; every checkpoint is
    # gated, and this holdout is far too small to publish anything
    held = [x for b in first for x in b.samples if x.source != "pseudo" and x.item_id != MISSING_ITEM
            and is_holdout(sample_key(x.sample_id), s.trainer.holdout_fraction)]
    assert c["holdout"] == len(held) > 0 and len(trainer.holdout) == len(held)
    gate = PublishedArea(s.checkpoints_dir / "published").decisions()
    assert len(gate) == meta["version"] and {d["outcome"] for d in gate} == {"insufficient"}
    assert PublishedArea(s.checkpoints_dir / "published").current() is None
    assert meta["seen_count"] == 42 and meta["collection"] == s.encoder.collection
    assert meta["trainer_settings"]["checkpoint_every"] == 10 and meta["model_config"]["content_dim"] == DIM
    versions = [v for v, _ in list_checkpoints(s.checkpoints_dir)]
    assert meta["version"] >= 2 and versions[-1] == meta["version"] and len(versions) <= 3
    assert (s.checkpoints_dir / LATEST).read_text().strip() == f"ckpt-{meta['version']:06d}.pt"

    # the checkpoint covers every message, and the group's committed offsets equal its offsets
    offsets = {(t, p): o for t, p, o in meta["offsets"]}
    assert sum(offsets.values()) == 9
    probe = consumer(s.kafka, "trainer")
    committed = probe.committed([TopicPartition("samples", p) for p in range(s.kafka.partitions)], timeout=10)
    probe.close()
    assert {("samples", tp.partition): tp.offset for tp in committed if tp.offset >= 0} == offsets

    # both bad messages and the sample without a vector are in the DLQ with their origin; the sample's
    # letter holds a one-sample SampleBatch of its request (replayable into samples once the item is indexed)
    dl = consumer(s.kafka, "dlq-probe")
    dl.assign([TopicPartition("samples.dlq", p, 0) for p in range(s.kafka.partitions)])
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + 10
    while len(letters) < 3 and time.monotonic() < deadline:
        letters += [decode(m.value(), DeadLetter) for m in dl.consume(10, 0.2) if not m.error()]
    dl.close()
    assert sorted(x.reason for x in letters) == ["malformed_json", "no_vector", "schema"]
    assert all(x.topic == "samples" and x.stage == "trainer" and x.offset >= 0 for x in letters)
    (lost,) = [x for x in letters if x.reason == "no_vector"]
    one = SampleBatch.model_validate_json(base64.b64decode(lost.value))
    assert (one.request_id, [x.item_id for x in one.samples]) == ("r5", [MISSING_ITEM])
    assert str(MISSING_ITEM) in lost.error and lost.key == "u5"

    # run 2, a new process: 3 new requests and a re-send of a request trained in run 1
    produce(s, [request(n) for n in range(6, 9)] + [first[2]])
    again = Trainer(s, index, progress=False)
    assert again.counts["samples"] == 42 and len(again.seen) == 42  # restored before consuming
    with running(again):
        wait_for(reached(again, samples=63, duplicates=14))
    _, meta2 = load_checkpoint(s.checkpoints_dir)
    c2 = meta2["counts"]
    assert (c2["samples"], c2["real"], c2["pseudo"], c2["duplicates"]) == (63, 27, 36, 14)
    assert (c2["no_vector"], c2["dlq"], c2["messages"]) == (1, 2, 13)
    assert meta2["version"] > meta["version"]

    # run 3: as if every commit had been lost (a new group has none): only the checkpoint's offsets
    # keep it from re-reading. One new request per partition; anything re-read would count as duplicate.
    lost = tuned(settings, group_prefix=f"{settings.kafka.group_prefix}-no-commits")  # a group of its own
    for part, n in enumerate((9, 10)):
        produce(lost, [request(n)], partition=part)
    third = Trainer(lost, index, progress=False)
    with running(third):
        wait_for(reached(third, samples=77))  # in-order partitions: a re-read would have come first
    c3 = load_checkpoint(s.checkpoints_dir)[1]["counts"]
    assert (c3["samples"], c3["duplicates"], c3["messages"], c3["dlq"]) == (77, 14, 15, 2)

    # run 4 crashes while writing its checkpoint, after training 2 new requests; run 5 re-reads them
    # from the last durable checkpoint and trains and counts them exactly once
    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(trainer_stage, "save_checkpoint", crash)
    produce(s, [request(11), request(12)])
    doomed = Trainer(s, index, progress=False)
    with pytest.raises(OSError, match="power cut"), running(doomed):
        wait_for(reached(doomed, samples=91))
    monkeypatch.undo()
    assert load_checkpoint(s.checkpoints_dir)[1]["counts"]["samples"] == 77
    fifth = Trainer(s, index, progress=False)
    with running(fifth):
        wait_for(reached(fifth, samples=91))
    c5 = load_checkpoint(s.checkpoints_dir)[1]["counts"]
    assert (c5["samples"], c5["real"], c5["pseudo"], c5["duplicates"], c5["messages"]) == (91, 39, 52, 14, 17)


def test_exposed_only_trainer_skips_pseudo_labels_and_counts_them(tmp_path: Path) -> None:
    """The demo's baseline: same stream, pseudo samples skipped (counted), real ones trained."""
    s = tuned(Settings(data_dir=tmp_path)).with_overrides(trainer={"pseudo_labels": False})
    t = Trainer(s, item_index(s), dim=DIM, progress=False, name="trainer-exposed-only",
                directory=tmp_path / "exposed-only")
    t._fetch_vectors(set(range(1, 41)))
    handled = t._admit(request(1))
    assert handled == 7
    assert t.counts["real"] == 3 and t.counts["pseudo"] == 0 and t.counts["pseudo_skipped"] == 4
    assert len(t._pending) + t.counts["holdout"] == 3 and not any(row[5] for row in t._pending)
    assert t.accounting["pseudo_skipped"] == 4 and t.directory == tmp_path / "exposed-only"


def test_a_batch_whose_step_fails_goes_to_the_dlq_and_training_goes_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every message ends somewhere: a bug that one batch triggers sends that batch to ``samples.dlq``
    (``processing_error``, the exception text, its origin offset) and the trainer keeps training."""
    s = tuned(settings)
    admit = Trainer._admit

    def flaky(self: Trainer, b: SampleBatch, origin: tuple[str, int, int] = ("samples", -1, -1)) -> int:
        if b.request_id == "r2":
            raise ZeroDivisionError("a bug only r2 triggers")
        return admit(self, b, origin)

    monkeypatch.setattr(Trainer, "_admit", flaky)
    produce(s, [request(n) for n in range(4)])
    trainer = Trainer(s, item_index(s), progress=False)
    with running(trainer):
        wait_for(lambda: trainer.accounting["dlq:processing_error"] == 1 and trainer.counts["samples"] == 21)
    c = consumer(s.kafka, f"dlq-{time.monotonic_ns()}")
    c.subscribe(["samples.dlq"])
    letters = []
    deadline = time.monotonic() + 30
    while not letters and time.monotonic() < deadline:
        letters = [decode(m.value(), DeadLetter) for m in c.consume(10, timeout=0.5) if m.error() is None]
    c.close()
    assert len(letters) == 1 and letters[0].reason == "processing_error"
    assert "ZeroDivisionError: a bug only r2 triggers" in letters[0].error and letters[0].topic == "samples"


def test_the_rank_term_compares_the_pseudo_samples_of_one_request(tmp_path: Path) -> None:
    """trainer.rank_weight > 0: each SampleBatch's rows share a group, the step reports the listwise term
    (gpl_trainer_loss{part="rank"}) beside the pointwise parts."""
    from workers.trainer.metrics import TRAINER_LOSS

    s = tuned(Settings(data_dir=tmp_path)).with_overrides(trainer={"rank_weight": 1.0, "holdout_fraction": 0.0})
    t = Trainer(s, item_index(s), dim=DIM, progress=False, directory=tmp_path / "ckpt")
    t._fetch_vectors(set(range(1, 41)))
    TRAINER_LOSS.labels(part="rank").set(-1.0)
    t._admit(request(1))
    t._admit(request(2))
    groups = [row.group for row in t._pending]
    assert groups == [0] * 7 + [1] * 7  # one group per request, in arrival order
    t._train(len(t._pending))
    assert TRAINER_LOSS.labels(part="rank")._value.get() >= 0.0  # set by this step (a KL is never negative)
    assert t.counts["steps"] == 1


def test_the_residual_rank_term_reads_each_pseudo_samples_prior_part(tmp_path: Path) -> None:
    """A pseudo sample that carries ``prior_logit`` (a calibrator reading anchors) offsets its label by it; one
    without (priors-only labels) is all prior, so its request has no residual order to rank."""
    from workers.model import whole_logit

    s = tuned(Settings(data_dir=tmp_path)).with_overrides(
        trainer={"rank_weight": 1.0, "rank_target": "residual", "holdout_fraction": 0.0})
    t = Trainer(s, item_index(s), dim=DIM, progress=False, directory=tmp_path / "ckpt")
    t._fetch_vectors(set(range(1, 41)))
    plain = request(1)
    with_prior = request(2)
    with_prior = with_prior.model_copy(update={"samples": [
        x.model_copy(update={"prior_logit": -1.5 + 0.1 * k}) if x.source == "pseudo" else x
        for k, x in enumerate(with_prior.samples)]})
    t._admit(plain)
    t._admit(with_prior)
    pseudo = [r for r in t._pending if r.pseudo]
    assert [r.prior_logit for r in pseudo[:4]] == pytest.approx([float(whole_logit(r.label)) for r in pseudo[:4]])
    assert [r.prior_logit for r in pseudo[4:]] == pytest.approx([-1.5 + 0.1 * k for k in range(3, 7)])
    t._train(len(t._pending))
    assert t.counts["steps"] == 1
