"""The labeler with a schema registry, on the real broker: framed anchors, batches and real labels in,
framed samples out; a batch framed under another subject's schema id is dead-lettered, itself framed."""

from __future__ import annotations

import uuid

import pytest

from runtime.kafka import producer
from runtime.serde import Wire, registry_client, registry_schema
from runtime.settings import Settings
from schemas.codec import encode
from schemas.events import DeadLetter, Sample, SampleBatch
from schemas.export import topic_schemas
from schemas.wire import frame, unframe
from tests.helpers import drain_raw, running, wait_for
from tests.integration.test_labeler import _anchors, _batch, _index
from workers.labeler import Labeler

pytestmark = pytest.mark.integration


def test_labeler_reads_and_writes_the_confluent_format(settings: Settings) -> None:
    s = settings.with_overrides(labeler={"top_n": 2, "random_n": 2, "cap": 3},
                                schema_registry={"url": f"mock://{uuid.uuid4().hex}", "output_format": "confluent"})
    client = registry_client(s.schema_registry)
    ids = {t: client.register_schema(subj, registry_schema(t)) for t, (subj, _) in topic_schemas().items()}
    real = SampleBatch(request_id="r0", user_id="u1", ts=1, samples=[
        Sample(sample_id="r0:100", item_id=100, label=1.0, weight=1.0, source="click")])
    p = producer(s.kafka)
    p.produce("anchors", frame(ids["anchors"], encode(_anchors(s, "u1", ["running shoes"]))), key=b"u1")
    p.produce("samples", frame(ids["samples"], encode(real)), key=b"u1")
    assert p.flush(10) == 0

    labeler = Labeler(s, _index(s))
    with running(labeler, "labeler"):
        wait_for(lambda: labeler.anchor_accounting["accepted"] == 1 and labeler.accounting["real_labels_seen"] == 1,
                 30, lambda: f"framed anchors and real labels taken: {labeler.accounting.snapshot()}")
        p.produce("unexposed", frame(ids["unexposed"], encode(_batch("u1", "r1"))), key=b"u1")
        p.produce("unexposed", frame(ids["samples"], encode(_batch("u1", "r2"))), key=b"u1")  # foreign id
        assert p.flush(10) == 0
        wait_for(lambda: labeler.accounting["labeled"] == 1 and labeler.accounting["dlq:schema_registry"] == 1, 30,
                 lambda: f"one labeled, one dead-lettered: {labeler.accounting.snapshot()}")
        out = drain_raw(s, "samples", 2)  # the real batch above and the labeler's pseudo batch
        dead = drain_raw(s, "unexposed.dlq", 1)

    wire = Wire(s.schema_registry)
    assert all(unframe(raw)[0] == ids["samples"] for raw in out)
    pseudo = [b for b in (wire.decode("samples", raw, SampleBatch) for raw in out) if b.request_id == "r1"]
    assert len(pseudo) == 1 and len(pseudo[0].samples) == 3 and pseudo[0].lineage is not None
    assert len(dead) == 1 and unframe(dead[0])[0] == ids["unexposed.dlq"]
    letter = wire.decode("unexposed.dlq", dead[0], DeadLetter)
    assert letter.reason == "schema_registry" and "unexposed-value" in letter.error
    assert labeler.accounting["samples_unreadable"] == 0
