"""The streams processor with a schema registry: Confluent-framed input in, Confluent-framed output out.

On the real broker, with confluent-kafka's in-memory registry (``mock://``) where ``gpl schemas
register`` would have put the exported schemas. A framed recall and a plain exposure join as usual; a
recall framed with another subject's schema id is dead-lettered ``schema_registry``; everything the
processor writes (unexposed, samples, anchor requests, dead letters) carries its subject's schema id.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from runtime.broker import Broker
from runtime.kafka import create_topics, producer
from runtime.serde import Wire, registry_client, registry_schema
from schemas.codec import encode
from schemas.events import AnchorRequest, DeadLetter, SampleBatch, UnexposedBatch
from schemas.export import topic_schemas
from schemas.wire import frame, unframe
from streams.app import StreamsProcessor
from tests.fixtures.settings import make_settings
from tests.helpers import drain_raw, item_index, running, wait_for
from tests.integration.test_streams import ITEMS, exposure, recall

pytestmark = pytest.mark.integration


def test_framed_in_framed_out(tmp_path: Path, broker: Broker) -> None:
    cfg = {"url": f"mock://{uuid.uuid4().hex}", "output_format": "confluent"}
    s = make_settings(tmp_path, broker, partitions=2, schema_registry=cfg,
                      streams={"join_wait_s": 5.0, "debounce_s": 0})
    create_topics(s.kafka)
    client = registry_client(s.schema_registry)
    ids = {t: client.register_schema(subj, registry_schema(t)) for t, (subj, _) in topic_schemas().items()}

    p = producer(s.kafka)
    p.produce("recall", frame(ids["recall"], encode(recall("r1", "u1", list(range(1, 11))))), key=b"u1")
    p.produce("exposure", encode(exposure("r1", "u1", [1, 2], {1})), key=b"u1")  # plain JSON: both formats
    p.produce("recall", frame(ids["exposure"], encode(recall("r2", "u2", [1, 2]))), key=b"u2")  # wrong subject
    assert p.flush(10) == 0

    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["joined"] == 2 and proc.accounting["dlq:schema_registry"] == 1, 60,
                 lambda: f"the join and the dead letter: {proc.accounting.snapshot()}")
        unexposed = drain_raw(s, "unexposed", 1)
        samples = drain_raw(s, "samples", 1)
        requests = drain_raw(s, "anchor-requests", 1)
        dead = drain_raw(s, "recall.dlq", 1)

    wire = Wire(s.schema_registry)
    for topic, raws, model in (("unexposed", unexposed, UnexposedBatch), ("samples", samples, SampleBatch),
                               ("anchor-requests", requests, AnchorRequest), ("recall.dlq", dead, DeadLetter)):
        assert len(raws) == 1 and unframe(raws[0])[0] == ids[topic], topic
        wire.decode(topic, raws[0], model)  # valid under the registry's schema and the contract
    assert wire.decode("unexposed", unexposed[0], UnexposedBatch).item_ids == list(range(3, 11))
    letter = wire.decode("recall.dlq", dead[0], DeadLetter)
    assert letter.reason == "schema_registry" and "recall-value" in letter.error
