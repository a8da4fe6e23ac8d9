"""``gpl schemas register`` against confluent-kafka's in-memory registry, ``gpl schemas validate`` on files."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import MockSchemaRegistryClient

from gpl.cli import main
from runtime.serde import registry_client, registry_schema
from runtime.settings import SchemaRegistrySettings
from schemas.export import topic_schemas


class CompatMock(MockSchemaRegistryClient):
    """confluent-kafka's in-memory registry plus the one endpoint it leaves out: a subject's compatibility
    level (``PUT/GET /config/{subject}`` on a real registry), kept here with the order of the calls."""

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__(conf)
        self.levels: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def set_compatibility(self, subject_name: str | None = None, level: str | None = None) -> str:
        assert subject_name is not None and level is not None
        self.levels[subject_name] = level
        self.calls.append(("compatibility", subject_name))
        return level

    def get_compatibility(self, subject_name: str | None = None) -> str:
        assert subject_name is not None
        return self.levels[subject_name]

    def register_schema(self, subject_name: str, schema: Schema, normalize_schemas: bool = False) -> int:
        self.calls.append(("register", subject_name))
        return super().register_schema(subject_name, schema, normalize_schemas)


def test_register_sets_compatibility_and_is_idempotent(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SchemaRegistryClient, "new_client", staticmethod(CompatMock))
    url = f"mock://{uuid.uuid4().hex}"
    args = ["--set", f"schema_registry.url={url}", "schemas", "register", "--compatibility", "full"]
    assert main(args) == 0
    out = capsys.readouterr().out
    client = registry_client(SchemaRegistrySettings(url=url))
    assert isinstance(client, CompatMock)
    subjects = {subj for subj, _ in topic_schemas().values()}
    assert set(client.get_subjects()) == subjects and "recall.dlq-value" in subjects
    for topic, (subj, _) in topic_schemas().items():
        latest = client.get_latest_version(subj)
        assert latest.schema.schema_str == registry_schema(topic).schema_str
        assert client.get_compatibility(subj) == "FULL"
        assert f"{subj}: id {latest.schema_id}, version 1, compatibility FULL" in out
        # the level is set first, so it already governs this registration
        assert client.calls.index(("compatibility", subj)) < client.calls.index(("register", subj))
    assert main(args) == 0  # the same schemas again: same ids, no new versions
    assert client.get_versions("recall-value") == [1]


def test_register_without_compatibility_uses_the_library_mock(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"mock://{uuid.uuid4().hex}"
    assert main(["--set", f"schema_registry.url={url}", "schemas", "register", "--topics", "recall,exposure"]) == 0
    client = registry_client(SchemaRegistrySettings(url=url))
    assert sorted(client.get_subjects()) == ["exposure-value", "recall-value"]
    assert "compatibility (registry default)" in capsys.readouterr().out


def test_register_needs_a_url_and_known_topics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "register"]) == 2
    assert "schema_registry.url" in capsys.readouterr().err
    assert main(["--set", f"schema_registry.url=mock://{uuid.uuid4().hex}", "schemas", "register",
                 "--topics", "recall,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_validate_reports_every_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_recall = {"request_id": "r1", "user_id": "u1", "ts": 5, "candidates": [{"item_id": 1}]}
    lines = [
        orjson.dumps({"topic": "items", "value": {"item_id": 1, "text": "a film"}}),  # 1 good
        b"# a comment",  # 2 skipped
        orjson.dumps({"topic": "recall", "value": good_recall}),  # 3 good
        orjson.dumps({"topic": "recall", "value": {**good_recall, "ts": -5}}),  # 4 bad ts
        b'{"topic": "items", "value": ',  # 5 not JSON
        orjson.dumps({"topic": "clicks", "value": {}}),  # 6 unknown topic
        orjson.dumps({"topic": "exposure", "value": {"request_id": "r", "user_id": "u", "ts": 1, "items": [
            {"item_id": 1, "position": 0, "clicked": True}, {"item_id": 1, "position": 1, "clicked": False}]}}),  # 7
        orjson.dumps({"topic": "items", "value": "{broken"}),  # 8 a raw payload that is not JSON
    ]
    f = tmp_path / "events.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["schemas", "validate", str(f)]) == 1
    cap = capsys.readouterr()
    report = {int(line.split(":")[1]): line for line in cap.out.splitlines()}
    assert sorted(report) == [4, 5, 6, 7, 8]
    assert "recall: schema: RecallEvent: ts" in report[4]
    assert "malformed_json" in report[5] and "unknown_topic" in report[6]
    assert "more than once" in report[7] and "malformed_json" in report[8]
    assert "7 lines, 2 valid, 5 invalid" in cap.err
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(lines[0] + b"\n" + lines[2] + b"\n")
    assert main(["schemas", "validate", str(ok)]) == 0
    assert main(["schemas", "validate", str(tmp_path / "missing.jsonl")]) == 2
