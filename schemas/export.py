"""``gpl schemas export``: one JSON Schema per topic, named after its registry subject.

The files are what producers in other languages and the Confluent Schema Registry see, so they say
everything the pydantic contracts check that JSON Schema can say: the draft (2020-12, which
confluent-kafka's JSON serializer validates with ``jsonschema``), a stable ``$id``, the unit of every
epoch-millisecond field, the ``schema_version`` range this build reads, and ``uniqueItems`` where a
contract refuses repeats. File names are subjects (``<topic>-value.json``, Confluent's
TopicNameStrategy), so ``gpl schemas register`` registers a file under its own name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import orjson
from pydantic import BaseModel

from schemas.contract import SCHEMA_VERSION, SECONDS_HIGH, SECONDS_LOW, EpochMs
from schemas.dlq import DeadLetter
from schemas.plain import plain
from schemas.topics import TOPICS, by_name
from schemas.wire import subject

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "urn:gpl-stream:schema:"
EPOCH_MS = "epoch milliseconds (UTC)"
# what the contract's plausibility bound refuses (schemas.contract.looks_like_seconds), said in JSON Schema
NOT_SECONDS = {"not": {"minimum": SECONDS_LOW, "exclusiveMaximum": SECONDS_HIGH},
               "x-refused-as-seconds": f"{SECONDS_LOW} <= ts < {SECONDS_HIGH}: epoch seconds, not milliseconds"}


def topic_schemas() -> dict[str, tuple[str, type[BaseModel]]]:
    """topic → (subject, record type) for every topic and every dead-letter topic."""
    out: dict[str, tuple[str, type[BaseModel]]] = {}
    for t in TOPICS.values():
        out[t.name] = (subject(t.name), t.value_type)
        if t.dlq:
            out[t.dlq_name] = (subject(t.dlq_name), DeadLetter)
    return out


def json_schema(topic: str) -> dict[str, Any]:
    """The complete JSON Schema of a topic's values (what the registry stores under its subject)."""
    subj, model = topic_schemas()[topic]
    schema = model.model_json_schema()
    _annotate(model, schema)
    for name, sub in schema.get("$defs", {}).items():
        nested = _models_of(model).get(name)
        if nested is not None:
            _annotate(nested, sub)
    spec = by_name(topic) if not topic.endswith(".dlq") else None
    x_topic: dict[str, Any] = {"name": topic, "subject": subj}
    if spec is not None:
        x_topic |= {"key": spec.key, "compacted": spec.compacted, "dlq": spec.dlq_name}
    _plain_descriptions(schema)
    return {"$schema": DRAFT, "$id": f"{ID_BASE}{subj}:v{_version(model)}", **schema, "x-topic": x_topic}


def _plain_descriptions(node: Any) -> None:
    """Every ``description`` in plain text: pydantic copies the class docstrings, written for Sphinx."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = plain(value)
            else:
                _plain_descriptions(value)
    elif isinstance(node, list):
        for value in node:
            _plain_descriptions(value)


def _version(model: type[BaseModel]) -> int:
    """The newest schema_version of a contract: the one its writers put by default."""
    field = model.model_fields.get("schema_version")
    return field.default if field is not None and isinstance(field.default, int) else SCHEMA_VERSION


def schema_text(topic: str) -> str:
    """The schema as the registry receives it (sorted keys: the same text each time, one id)."""
    return orjson.dumps(json_schema(topic), option=orjson.OPT_SORT_KEYS).decode()


def export_json_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for topic, (subj, _) in topic_schemas().items():
        p = out_dir / f"{subj}.json"
        p.write_bytes(orjson.dumps(json_schema(topic), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        written.append(p)
    return written


def _is_epoch_ms(metadata: list[Any]) -> bool:
    """A field declared as :data:`schemas.contract.EpochMs` carries EpochMs's own constraint objects
    (pydantic reuses them; an equal bound written elsewhere, like ``position >= 0``, is another object)."""
    constraints = [m for info in get_args(EpochMs)[1:] for m in getattr(info, "metadata", [info])]
    return bool(constraints) and all(any(m is c for m in metadata) for c in constraints)


def _annotate(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """Say in the schema what pydantic's own export leaves to validators and type aliases."""
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        prop = props.get(name)
        if prop is None:
            continue
        if _is_epoch_ms(field.metadata):
            desc = prop.get("description", "")
            if EPOCH_MS not in desc:
                prop["description"] = f"{desc}; {EPOCH_MS}" if desc else f"event time in {EPOCH_MS}"
            prop |= NOT_SECONDS
        if name == "schema_version":  # its default is the newest version of this contract (recall: 2)
            top = _version(model)
            prop |= {"minimum": 1, "maximum": top, "description": f"contract version; this build reads 1..{top}"}


def _models_of(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Nested models by class name (pydantic names its ``$defs`` after them)."""
    found: dict[str, type[BaseModel]] = {}
    todo = [model]
    while todo:
        m = todo.pop()
        for field in m.model_fields.values():
            for t in (field.annotation, *get_args(field.annotation)):
                if isinstance(t, type) and issubclass(t, BaseModel) and t.__name__ not in found:
                    found[t.__name__] = t
                    todo.append(t)
    return found
