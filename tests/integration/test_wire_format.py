"""The Confluent wire format next to plain JSON: framing, the registry check, the serializer, the settings.

Pure logic plus confluent-kafka's own in-memory registry (``mock://``) and, at the end, the indexer on
the real broker and the real embedded engine reading framed items. Every registry test uses its own
``mock://`` name: clients are shared per URL within a process (as the stages of one stack share them).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest

from gpl.bench.wire import bench_wire
from gpl.cli import main
from runtime.encoder import HashEncoder
from runtime.kafka import producer
from runtime.serde import Wire, registry_client, registry_schema
from runtime.settings import SchemaRegistrySettings, Settings, load
from runtime.vectors.edge import EdgeIndex
from schemas.codec import DecodeError, decode, encode
from schemas.events import ExposureEvent, ItemEvent, RecallEvent, UnexposedBatch
from schemas.fast_codec import decode_recall, decode_unexposed
from schemas.wire import frame, is_framed, subject, unframe
from workers.indexer import Indexer


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings


EXPOSURE = ExposureEvent(request_id="r1", user_id="u1", ts=1_700_000_000_000,
                         items=[{"item_id": 4, "position": 0, "clicked": True}])  # type: ignore[list-item]


def registry(**kw: object) -> SchemaRegistrySettings:
    return SchemaRegistrySettings(url=f"mock://{uuid.uuid4().hex}", **kw)  # type: ignore[arg-type]


def test_frame_roundtrip_and_detection() -> None:
    body = encode(EXPOSURE)
    framed = frame(42, body)
    assert framed[:5] == b"\x00\x00\x00\x00\x2a" and is_framed(framed) and not is_framed(body)
    assert unframe(framed) == (42, body)
    assert subject("recall") == "recall-value"


def test_decode_accepts_both_formats_without_registry() -> None:
    assert decode(frame(7, encode(EXPOSURE)), ExposureEvent) == EXPOSURE  # was dead-lettered as malformed_json
    assert decode(encode(EXPOSURE), ExposureEvent) == EXPOSURE
    with pytest.raises(DecodeError) as e:
        decode(b"\x00\x00\x01", ExposureEvent)
    assert e.value.reason == "bad_frame"
    with pytest.raises(DecodeError) as e:  # unframed, the pydantic contract still judges the JSON
        decode(frame(7, b'{"request_id": "r", "user_id": "u", "ts": -1, "items": []}'), ExposureEvent)
    assert e.value.reason == "schema"


def test_fast_paths_read_framed_payloads() -> None:
    wire = Wire()
    rec = RecallEvent(request_id="r", user_id="u", ts=3, candidates=[{"item_id": 9, "score": 0.5}])  # type: ignore[list-item]
    got = decode_recall(wire.payload("recall", frame(1, encode(rec))), 100)
    assert (got.request_id, got.item_ids.tolist()) == ("r", [9])
    ub = UnexposedBatch(request_id="r", user_id="u", ts=3, item_ids=[1, 2])
    assert decode_unexposed(wire.payload("unexposed", frame(1, encode(ub)))).item_ids.tolist() == [1, 2]


def test_registry_round_trip_and_refusals() -> None:
    cfg = registry(output_format="confluent", validate_payloads=True)
    client = registry_client(cfg)
    sid = client.register_schema(subject("exposure"), registry_schema("exposure"))
    wire = Wire(cfg)
    raw = wire.encode("exposure", EXPOSURE)
    assert raw[0] == 0 and unframe(raw)[0] == sid
    assert wire.decode("exposure", raw, ExposureEvent) == EXPOSURE
    assert wire.encode_json("exposure", encode(EXPOSURE)) == raw  # fast-path bytes take the same route

    def reason(topic: str, data: bytes) -> str:
        with pytest.raises(DecodeError) as e:
            wire.decode(topic, data, ExposureEvent)
        return e.value.reason

    assert reason("recall", raw) == "schema_registry"  # a valid id, but not a version of recall-value
    assert reason("exposure", frame(sid + 99, encode(EXPOSURE))) == "schema_registry"  # unknown id
    # the writer schema says what JSON Schema can: a repeated item fails the registry check already
    twice = orjson.dumps({**orjson.loads(encode(EXPOSURE)), "items": [EXPOSURE.items[0].model_dump()] * 2})
    assert reason("exposure", frame(sid, twice)) == "schema_registry"
    assert reason("exposure", frame(sid, b'{"request_id": "r"}')) == "schema_registry"
    # without a registry the same framed bytes are only unframed, then judged by the contract
    assert Wire().decode("exposure", raw, ExposureEvent) == EXPOSURE


def test_without_payload_validation_the_id_is_still_checked() -> None:
    cfg = registry()
    sid = registry_client(cfg).register_schema(subject("exposure"), registry_schema("exposure"))
    wire = Wire(cfg)
    assert wire.decode("exposure", frame(sid, encode(EXPOSURE)), ExposureEvent) == EXPOSURE
    for topic, data, why in (("recall", frame(sid, encode(EXPOSURE)), "schema_registry"),
                             ("exposure", frame(sid + 1, encode(EXPOSURE)), "schema_registry"),
                             ("exposure", frame(sid, b'{"request_id": "r"}'), "schema")):  # the contract's word
        with pytest.raises(DecodeError) as e:
            wire.decode(topic, data, ExposureEvent)
        assert e.value.reason == why


def test_writers_need_the_schema_registered_unless_auto_register() -> None:
    strict = Wire(registry(output_format="confluent"))
    with pytest.raises(Exception, match="40403|not found|Not Found"):
        strict.encode("exposure", EXPOSURE)
    auto = Wire(registry(output_format="confluent", auto_register=True))
    assert auto.decode("exposure", auto.encode("exposure", EXPOSURE), ExposureEvent) == EXPOSURE
    assert Wire(registry()).encode("exposure", EXPOSURE) == encode(EXPOSURE)  # json output: plain bytes


def test_settings_section(capsys: pytest.CaptureFixture[str]) -> None:
    s = load(env={"GPL_SCHEMA_REGISTRY__URL": "http://sr:8081", "GPL_SCHEMA_REGISTRY__OUTPUT_FORMAT": "confluent",
                  "GPL_SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD": "hunter2"})
    assert s.schema_registry.url == "http://sr:8081" and s.schema_registry.output_format == "confluent"
    assert s.schema_registry.basic_auth_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s)
    with pytest.raises(ValueError, match="needs schema_registry.url"):
        load(env={"GPL_SCHEMA_REGISTRY__OUTPUT_FORMAT": "confluent"})
    assert main(["--set", "schema_registry.basic_auth_password=hunter2", "config", "show"]) == 0
    assert "hunter2" not in capsys.readouterr().out


def test_bench_wire_runs_every_path() -> None:
    res = bench_wire(candidates=20, repeats=2)
    assert set(res["read_ms"]) == {"plain", "framed_no_registry", "framed_id_check",  # type: ignore[arg-type]
                                   "framed_validate_payloads"}
    assert set(res["write_ms"]) == {"plain", "confluent", "confluent_validate_payloads"}  # type: ignore[arg-type]


@pytest.mark.integration
def test_indexer_reads_framed_items(settings: Settings, tmp_path: Path) -> None:
    """A Confluent producer's items are indexed, not dead-lettered; a foreign schema id is."""
    cfg = registry()
    sid = registry_client(cfg).register_schema(subject("items"), registry_schema("items"))
    other = registry_client(cfg).register_schema(subject("recall"), registry_schema("recall"))
    s = settings.with_overrides(encoder={"model": "hash-bow-64"}, schema_registry=cfg.model_dump())
    p = producer(s.kafka)
    for i in range(3):
        p.produce("items", frame(sid, encode(ItemEvent(item_id=i, text=f"framed item {i}"))), key=str(i).encode())
    p.produce("items", encode(ItemEvent(item_id=3, text="plain item 3")), key=b"3")
    p.produce("items", frame(other, encode(ItemEvent(item_id=4, text="wrong subject"))), key=b"4")
    assert p.flush(10) == 0
    with EdgeIndex(tmp_path / "qdrant") as index:
        indexer = Indexer(s, index, HashEncoder(), progress=False)
        stop = threading.Event()
        t = threading.Thread(target=indexer.run, args=(stop,), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and indexer.accounting["indexed"] + indexer.accounting[
                "dlq:schema_registry"] < 5:
            time.sleep(0.1)
        stop.set()
        t.join(15)
        snap = indexer.accounting.snapshot()
        assert snap["indexed"] == 4 and snap["dlq:schema_registry"] == 1, snap
        assert index.count(s.encoder.collection) == 4
