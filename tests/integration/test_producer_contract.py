"""One producer contract (issue 22, item 4): the docs, the exported schemas, the validators and the stream agree.

* ``ts`` in epoch seconds is refused everywhere a producer's record is judged: the pydantic contract,
  ``gpl schemas validate`` (a subprocess: its exit code and its report), the exported JSON Schema, and
  the streams stage on the real broker (a ``schema`` dead letter whose error asks "seconds?").
* The exported recall schema says ``uniqueItems``; docs/producers.md's record table names the fields the
  contracts have, at the version the record classes write.
* Every ``--help`` page and every schema description is plain text, and every flag says what it means.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import orjson
import pytest
from pydantic import BaseModel

from gpl.cli import build_parser
from runtime.broker import Broker
from runtime.kafka import create_topics
from schemas.codec import DecodeError, decode
from schemas.events import RECALL_SCHEMA_VERSION, ExposureEvent, ItemEvent, RecallEvent
from schemas.export import json_schema, topic_schemas
from schemas.fast_codec import decode_recall, decode_unexposed
from schemas.plain import has_markup, plain

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 1_700_000_000  # 2023-11-14 in epoch seconds: the mistake
MS = SECONDS * 1000


def recall_json(ts: int, ids: list[int] | None = None) -> bytes:
    return orjson.dumps({"schema_version": 2, "request_id": "r1", "user_id": "u1", "ts": ts,
                         "item_ids": ids or [1, 2], "scores": [0.5, 0.4][: len(ids or [1, 2])]})


@pytest.mark.parametrize("model", [RecallEvent, ExposureEvent, ItemEvent])
def test_the_contract_refuses_seconds(model: type) -> None:
    value = {"request_id": "r", "user_id": "u", "ts": SECONDS, "item_ids": [1], "items": [],
             "item_id": 1, "text": "t"}
    with pytest.raises(DecodeError, match=r"seconds\?") as e:
        decode(orjson.dumps(value), model)
    assert e.value.reason == "schema" and str(MS) in str(e.value)  # says what to send instead
    assert decode(orjson.dumps({**value, "ts": MS}), model).ts == MS
    assert decode(orjson.dumps({**value, "ts": 5}), model).ts == 5  # synthetic clocks counting from 0 pass


def test_the_fast_decoders_refuse_seconds_like_the_contract() -> None:
    with pytest.raises(DecodeError, match=r"seconds\?"):
        decode_recall(recall_json(SECONDS), 100)
    assert decode_recall(recall_json(MS), 100).ts == MS
    unexposed = {"schema_version": 2, "request_id": "r", "user_id": "u", "ts": SECONDS, "item_ids": [3, 4]}
    with pytest.raises(DecodeError, match=r"seconds\?"):
        decode_unexposed(orjson.dumps(unexposed))
    assert decode_unexposed(orjson.dumps({**unexposed, "ts": MS})).ts == MS


def test_exported_recall_schema_says_unique_and_not_seconds() -> None:
    schema = json_schema("recall")
    assert schema["properties"]["item_ids"]["uniqueItems"] is True
    check = jsonschema.Draft202012Validator(schema)
    good = orjson.loads(recall_json(MS))
    assert not list(check.iter_errors(good))
    assert list(check.iter_errors({**good, "ts": SECONDS}))
    assert list(check.iter_errors({**good, "item_ids": [1, 1]}))
    for topic in topic_schemas():
        text = orjson.dumps(json_schema(topic)).decode()
        assert not has_markup(text), f"{topic}: reStructuredText in a schema description"


def test_schemas_validate_refuses_seconds(tmp_path: Path) -> None:
    f = tmp_path / "events.jsonl"
    f.write_bytes(b"\n".join(orjson.dumps({"topic": "recall", "value": orjson.loads(recall_json(ts))})
                             for ts in (MS, SECONDS)) + b"\n")
    out = subprocess.run([sys.executable, "-m", "gpl.cli", "schemas", "validate", str(f)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"{f}:2: recall: schema:" in out.stdout and "seconds?" in out.stdout
    assert ":1:" not in out.stdout and "2 lines, 1 valid, 1 invalid" in out.stderr


def test_producers_doc_names_the_contracts_fields() -> None:
    """Each backquoted field in docs/producers.md's record table is a field of the record it names."""
    doc = (ROOT / "docs/producers.md").read_text()
    models: dict[str, type[BaseModel]] = {"RecallEvent": RecallEvent, "ExposureEvent": ExposureEvent,
                                          "ItemEvent": ItemEvent}
    rows = [line for line in doc.splitlines() if re.match(r"\| `(recall|exposure|items)` \|", line)]
    assert len(rows) == 3
    nested = {"item_id", "position", "clicked"}  # the exposure's items
    for row in rows:
        record = row.split("|")[2]
        name = re.search(r"`(\w+Event)`", record).group(1)  # type: ignore[union-attr]
        fields = set(re.findall(r"`(\w+)`", record)) - {name}
        assert fields - nested <= set(models[name].model_fields), (name, fields)
    assert "`candidates`" not in rows[0] and "`item_ids`" in rows[0]
    assert f"{RECALL_SCHEMA_VERSION} for `recall`" in doc
    example = doc.split("```python", 1)[1].split("```", 1)[0]
    assert "item_ids=" in example and "Candidate(" not in example


def _parsers(p: argparse.ArgumentParser, path: str = "gpl") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, child in a.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_help_page_is_plain_text_and_every_flag_explained() -> None:
    pages = list(_parsers(build_parser()))
    assert len(pages) > 30
    unexplained = []
    for path, p in pages:
        assert not has_markup(p.format_help()), f"{path} --help prints reStructuredText"
        for a in p._actions:
            if isinstance(a, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            meaning = re.sub(r"\(default:[^)]*\)", "", (a.help or "").replace("%(default)s", "X")).strip()
            if not meaning:
                unexplained.append(f"{path} {'/'.join(a.option_strings) or a.dest}")
    assert not unexplained, f"flags with no meaning in their help: {unexplained}"


def test_plain_keeps_words_and_drops_markup() -> None:
    assert plain("``item_ids`` of :class:`RecallEvent` via :func:`~schemas.ids.x` (`docs <http://x>`_)") \
        == "item_ids of RecallEvent via schemas.ids.x (docs)"


@pytest.mark.integration
def test_the_stream_dead_letters_seconds(tmp_path: Path, broker: Broker) -> None:
    """On the real broker: a recall in seconds goes to recall.dlq as ``schema`` with "seconds?"; the same
    recall in milliseconds joins."""
    from streams.app import StreamsProcessor
    from tests.fixtures.settings import make_settings
    from tests.helpers import drain, item_index, produce, running, wait_for
    from tests.integration.test_streams import ITEMS, exposure

    s = make_settings(tmp_path, broker, partitions=1, streams={"join_wait_s": 5.0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    produce(s, "recall", [recall_json(SECONDS), recall_json(MS).replace(b'"r1"', b'"r2"')], keys=["u1", "u1"])
    produce(s, "exposure", [exposure("r2", "u1", [1], {1}, ts=MS + 5)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["joined"] >= 1, 60, lambda: f"the join: {proc.accounting.snapshot()}")
        dlq = drain(s, "recall.dlq", expect=1)
    assert [d["reason"] for d in dlq] == ["schema"] and "seconds?" in dlq[0]["error"]
