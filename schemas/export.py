"""``gpl schemas export``: one JSON Schema file per topic contract, for producers in other languages."""

from __future__ import annotations

from pathlib import Path

import orjson

from schemas.events import DeadLetter
from schemas.topics import TOPICS


def export_json_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for t in TOPICS.values():
        p = out_dir / f"{t.name}.schema.json"
        schema = t.value_type.model_json_schema()
        schema["x-topic"] = {"name": t.name, "key": t.key, "compacted": t.compacted, "dlq": t.dlq_name}
        p.write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        written.append(p)
    p = out_dir / "dlq.schema.json"
    p.write_bytes(orjson.dumps(DeadLetter.model_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    written.append(p)
    return written
