"""Log lines as text for a terminal or as one JSON object per line for a log pipeline (``log_format``).

Why: a shared cluster's log collector (Loki, Elasticsearch, Cloud Logging) indexes fields, not free
text; with ``GPL_LOG_FORMAT=json`` every line of every process — the stage children of ``gpl up``
included — is a JSON object with the same keys: ``ts`` (epoch ms, like every time here), ``level``,
``logger``, ``msg``, ``pid``, ``stage`` where the process runs one, and ``exc`` with a traceback. The
secrets filter (runtime/redact.py) runs before the formatter, so masked text is what gets encoded.
"""

from __future__ import annotations

import logging

import orjson

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def __init__(self, stage: str = "") -> None:
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"ts": int(record.created * 1000), "level": record.levelname,
                                  "logger": record.name, "msg": record.getMessage(), "pid": record.process}
        if self.stage:
            out["stage"] = self.stage
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out).decode()


def configure_logging(level: str, fmt: str = "text", *, stage: str = "") -> None:
    """The root logger at ``level`` in ``fmt`` (``text`` or ``json``); ``stage`` names a stage's process."""
    text = f"%(asctime)s {stage}[%(process)d] %(levelname)s %(message)s" if stage else TEXT
    logging.basicConfig(level=level, format=text)
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter(stage))
