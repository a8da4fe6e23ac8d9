"""Contracts, JSON Schema export, the JSONL format and the settings object (pure logic)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import orjson
import pytest
from pydantic import ValidationError

from gpl.cli import build_parser, main
from runtime.settings import load
from schemas import SCHEMA_VERSION, DecodeError, ExposureEvent, RecallEvent, decode, encode
from schemas.events import RECALL_SCHEMA_VERSION, UNEXPOSED_SCHEMA_VERSION
from schemas.export import export_json_schemas
from schemas.jsonl import read_events, write_events
from schemas.topics import TOPICS, all_topic_names, dlq_topics


def test_roundtrip_and_version_guard() -> None:
    ev = RecallEvent(request_id="r", user_id="u", ts=5, candidates=[{"item_id": 3, "score": 0.5}])  # type: ignore[list-item]
    assert decode(encode(ev), RecallEvent) == ev
    with pytest.raises(DecodeError) as e:
        decode(orjson.dumps({**orjson.loads(encode(ev)), "schema_version": 99}), RecallEvent)
    assert e.value.reason == "schema"


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{oops", "malformed_json"), (b"[1, 2]", "schema"), (None, "empty"),
    (b'{"request_id": "r", "user_id": "u", "ts": -1, "items": []}', "schema"),
    (b'{"request_id": "r", "user_id": "u", "ts": 1, "items": [{"item_id": 1, "position": 0, "clicked": true},'
     b'{"item_id": 1, "position": 1, "clicked": false}]}', "schema"),
])
def test_bad_input_reasons(raw: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode(raw, ExposureEvent)
    assert e.value.reason == reason


def test_schema_export(tmp_path: Path) -> None:
    files = export_json_schemas(tmp_path)
    topics = [*TOPICS, *dlq_topics()]
    assert {p.name for p in files} == {f"{t}-value.json" for t in topics}  # registry subjects
    recall = orjson.loads((tmp_path / "recall-value.json").read_bytes())
    assert recall["x-topic"] == {"name": "recall", "subject": "recall-value", "key": "user_id", "compacted": False,
                                 "dlq": "recall.dlq"}
    assert {"item_ids", "scores", "sources"} <= set(recall["properties"])  # schema_version 2: columns
    assert recall["properties"]["schema_version"]["default"] == 2
    assert "candidates" in recall["x-schema-version-1"]  # version 1 is still accepted, and says so
    assert "recall.dlq" in all_topic_names()
    ids = set()
    for t in topics:
        sch = orjson.loads((tmp_path / f"{t}-value.json").read_bytes())
        assert sch["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        ids.add(sch["$id"])
        assert (sch["properties"]["schema_version"]["minimum"], sch["properties"]["schema_version"]["maximum"]) \
            == (1, {"recall": RECALL_SCHEMA_VERSION, "unexposed": UNEXPOSED_SCHEMA_VERSION}.get(t, SCHEMA_VERSION))
        if t != "anchors":  # every other contract has an event time ``ts``; anchors have generated_at
            assert "epoch milliseconds" in sch["properties"]["ts"]["description"]
    assert len(ids) == len(topics)
    anchors = orjson.loads((tmp_path / "anchors-value.json").read_bytes())
    assert "epoch milliseconds" in anchors["properties"]["generated_at"]["description"]
    assert "description" not in anchors["$defs"]["Anchor"]["properties"]["vector"]
    exposure = orjson.loads((tmp_path / "exposure-value.json").read_bytes())
    assert exposure["properties"]["items"]["uniqueItems"] is True
    assert "description" not in exposure["$defs"]["ExposedItem"]["properties"]["position"]  # an int >= 0, not a time


def test_exported_schema_agrees_with_the_contract(tmp_path: Path) -> None:
    """What the registry's serializer checks (jsonschema, the declared draft) accepts and refuses what we do."""
    export_json_schemas(tmp_path)
    schema = orjson.loads((tmp_path / "exposure-value.json").read_bytes())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert validator.META_SCHEMA["$id"].startswith("https://json-schema.org/draft/2020-12")
    ev = ExposureEvent(request_id="r", user_id="u", ts=1, items=[{"item_id": 1, "position": 0, "clicked": True}])  # type: ignore[list-item]
    good = orjson.loads(encode(ev))
    validator.validate(good)
    for bad in ({**good, "schema_version": SCHEMA_VERSION + 1}, {**good, "items": good["items"] * 2},
                {**good, "ts": -1}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)
        with pytest.raises(DecodeError):
            decode(orjson.dumps(bad), ExposureEvent)


def test_exported_unexposed_schema_takes_one_id_form(tmp_path: Path) -> None:
    """The registry's check of ``unexposed`` accepts what the streams stage writes (packed ids, version
    2) and the version 1 list, and refuses two id forms at once, as the contract does."""
    import numpy as np

    from schemas.events import UnexposedBatch
    from schemas.fast_codec import encode_unexposed

    export_json_schemas(tmp_path)
    schema = orjson.loads((tmp_path / "unexposed-value.json").read_bytes())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for ids in ([3, 9], [3, 2**40]):
        for version in (1, 2):
            value = orjson.loads(encode_unexposed("r", "u", 1, np.array(ids, np.int64), None, version=version))
            validator.validate(value)
            assert decode(orjson.dumps(value), UnexposedBatch).item_ids == ids
    both = {**orjson.loads(encode_unexposed("r", "u", 1, np.array([3], np.int64), None)), "item_ids": [3]}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(both)
    with pytest.raises(DecodeError):
        decode(orjson.dumps(both), UnexposedBatch)


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    ev = ExposureEvent(request_id="r", user_id="u7", ts=10, items=[{"item_id": 1, "position": 0, "clicked": True}])  # type: ignore[list-item]
    path = tmp_path / "e.jsonl"
    with open(path, "wb") as f:
        write_events(f, [("exposure", ev)])
        f.write(b'{"topic": "recall", "key": "u1", "value": "{broken"}\n')
    got = list(read_events(path))
    assert got[0].topic == "exposure" and got[0].key == b"u7" and got[0].ts == 10
    assert decode(got[0].value, ExposureEvent) == ev
    assert got[1].value == b"{broken"  # raw payloads survive, so replayed bad input reaches the DLQ


def test_settings_sources(tmp_path: Path) -> None:
    cfg = tmp_path / "gpl.toml"
    cfg.write_text('[labeler]\ncap = 7\ntop_n = 3\n[kafka]\npartitions = 6\n')
    s = load(cfg, env={"GPL_LABELER__CAP": "9", "GPL_DATA_DIR": "/x"}, trainer={"lr": 0.1})
    assert (s.labeler.cap, s.labeler.top_n, s.kafka.partitions, str(s.data_dir), s.trainer.lr) == (9, 3, 6, "/x", 0.1)
    with pytest.raises(ValueError, match="unknown setting"):
        load(env={"GPL_LABELR__CAP": "1"})
    with pytest.raises(ValueError):
        load(env={"GPL_LABELER__CAPP": "1"})
    with pytest.raises(ValidationError):  # frozen
        s.labeler.cap = 3  # type: ignore[misc]


def test_cli_help_and_schemas_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    help_text = build_parser().format_help()
    for cmd in ("demo", "up", "run", "replay", "schemas", "bench"):
        assert cmd in help_text
    assert main(["schemas", "export", str(tmp_path / "js")]) == 0
    assert (tmp_path / "js" / "anchors-value.json").exists()
    assert main(["--set", "labeler.cap=11", "config", "show"]) == 0
    assert '"cap": 11' in capsys.readouterr().out


def test_a_dead_letter_of_a_keyless_message_round_trips() -> None:
    """encode() leaves None out: the dead letter of a message without a key must still decode."""
    from schemas.codec import dead_letter
    from schemas.events import DeadLetter

    dl = dead_letter(topic="recall", partition=0, offset=3, key=None, value=b"x", error="e", reason="malformed_json",
                     stage="streams")
    assert decode(encode(dl), DeadLetter) == dl
