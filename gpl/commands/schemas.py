"""``gpl schemas export | register | validate``: the contracts as JSON Schema, in a registry, on files.

* ``export DIR`` writes ``<topic>-value.json`` per topic and dead-letter topic (``schemas/export.py``).
* ``register`` puts the same schemas under their subjects in the Confluent Schema Registry of
  ``schema_registry.url``, optionally setting each subject's compatibility level first, so the level
  already governs this registration; a refused (incompatible) schema is reported and the exit is 1.
* ``validate FILE.jsonl`` checks every line of a JSONL event file (``schemas/jsonl.py``) against its
  topic's contract before it is replayed: each bad line is reported with its number and reason, and
  the exit is 1 if there was one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from runtime.settings import Settings

COMPATIBILITY = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE",
                 "NONE")


def register(sub: argparse._SubParsersAction) -> None:
    sc = sub.add_parser("schemas", help="contracts: JSON Schema export, registry, file validation")
    act = sc.add_subparsers(metavar="ACTION")
    ex = act.add_parser("export", help="write one JSON Schema per topic, named <topic>-value.json")
    ex.add_argument("out", type=Path, nargs="?", default=Path("schemas/json"), help="directory to write into")
    ex.set_defaults(run=run_export)
    rg = act.add_parser("register", help="register every topic's schema under <topic>-value (schema_registry.url)")
    rg.add_argument("--compatibility", type=str.upper, choices=COMPATIBILITY, default=None,
                    help="set this compatibility level on each subject before registering")
    rg.add_argument("--topics", default="", help="comma list of topics (default: all, dead-letter topics too)")
    rg.set_defaults(run=run_register)
    va = act.add_parser("validate", help="check each line of a JSONL event file against its topic's contract")
    va.add_argument("file", type=Path, help="JSONL event file: {\"topic\": ..., \"value\": {...}} per line")
    va.add_argument("--max-errors", type=int, default=100, help="stop reporting after this many bad lines")
    va.set_defaults(run=run_validate)


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.export import export_json_schemas

    for p in export_json_schemas(args.out):
        print(p)
    return 0


def run_register(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from runtime.serde import registry_client, registry_schema
    from schemas.export import topic_schemas

    if not settings.schema_registry.url:
        print("set schema_registry.url (GPL_SCHEMA_REGISTRY__URL or --set schema_registry.url=...)", file=sys.stderr)
        return 2
    known = topic_schemas()
    topics = [t.strip() for t in args.topics.split(",") if t.strip()] or list(known)
    unknown = [t for t in topics if t not in known]
    if unknown:
        print(f"unknown topics: {', '.join(unknown)}", file=sys.stderr)
        return 2
    client = registry_client(settings.schema_registry)
    failed = 0
    for topic in topics:
        subj = known[topic][0]
        try:
            if args.compatibility:
                _set_compatibility(client, settings, subj, args.compatibility)
            schema_id = client.register_schema(subj, registry_schema(topic))
            version = client.lookup_schema(subj, registry_schema(topic)).version
        except SchemaRegistryError as e:
            failed += 1
            print(f"{subj}: refused: {e}", file=sys.stderr)
            continue
        level = args.compatibility or "(registry default)"
        print(f"{subj}: id {schema_id}, version {version}, compatibility {level}")
    return 1 if failed else 0


def _set_compatibility(client: Any, settings: Settings, subject: str, level: str) -> None:
    """Set a subject's level; confluent's in-memory registry (mock://) has no such endpoint and fails with
    an HTTP error about the URL scheme, which says nothing useful: it is refused in one line instead."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from gpl.oneline import OperatorError

    try:
        client.set_compatibility(subject_name=subject, level=level)
    except SchemaRegistryError:
        raise
    except Exception:
        if settings.schema_registry.url.startswith("mock://"):
            raise OperatorError("the mock registry (mock://) keeps no compatibility levels: drop --compatibility, "
                                "or use a real registry URL") from None
        raise


@dataclass(frozen=True)
class LineError:
    line: int
    topic: str
    reason: str
    detail: str


def validate_jsonl(path: Path) -> tuple[int, list[LineError]]:
    """(lines checked, bad lines) of a JSONL event file; every line is checked, none stops the rest."""
    checked = 0
    errors: list[LineError] = []
    for n, line in _lines(path):
        checked += 1
        err = _check_line(n, line)
        if err is not None:
            errors.append(err)
    return checked, errors


def run_validate(args: argparse.Namespace, settings: Settings) -> int:
    if not args.file.is_file():
        print(f"gpl: {args.file}: no such file or directory; check the path", file=sys.stderr)
        return 2
    checked, errors = validate_jsonl(args.file)
    for e in errors[: args.max_errors]:
        print(f"{args.file}:{e.line}: {e.topic or '?'}: {e.reason}: {e.detail}")
    if len(errors) > args.max_errors:
        print(f"... and {len(errors) - args.max_errors} more")
    print(f"{checked} lines, {checked - len(errors)} valid, {len(errors)} invalid", file=sys.stderr)
    return 1 if errors else 0


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith(b"#"):  # blank lines and comments, as schemas/jsonl.py skips them
                yield n, line


def _check_line(n: int, line: bytes) -> LineError | None:
    from schemas.codec import DecodeError, decode
    from schemas.export import topic_schemas

    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return LineError(n, "", "malformed_json", str(e))
    if not isinstance(obj, dict) or not isinstance(obj.get("topic"), str):
        return LineError(n, "", "schema", "a line is an object with a string 'topic' and a 'value'")
    topic = obj["topic"]
    known = topic_schemas()
    if topic not in known:
        return LineError(n, topic, "unknown_topic", f"known: {', '.join(known)}")
    value = obj.get("value")
    raw = value.encode() if isinstance(value, str) else orjson.dumps(value)  # str: a raw payload, as replayed
    try:
        decode(raw, known[topic][1])
    except DecodeError as e:
        return LineError(n, topic, e.reason, str(e))
    return None
