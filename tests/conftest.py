"""Shared fixtures: the real embedded broker (one per session) and settings pointing at it.

Integration tests use the real Tansu broker and the real embedded Qdrant engine, started here.
Each test gets its own topic namespace? No: topics are fixed names, so each test that needs a clean
slate gets its own broker via ``fresh_broker``; cheap (Tansu starts in ~100 ms).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gpl.runtime.broker import EmbeddedBroker  # noqa: E402
from gpl.runtime.kafka import create_topics  # noqa: E402
from gpl.runtime.settings import Settings, load  # noqa: E402


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as b:
        yield b


def make_settings(tmp_path: Path, bootstrap: str, partitions: int = 2, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "kafka": {"bootstrap_servers": bootstrap, "partitions": partitions},
        # the fixed map unless a test asks for the calibrator (tests/test_calibrated_labeler.py does)
        "labeler": {"label_source": "map"},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}  # type: ignore[dict-item]
        else:
            base[k] = v
    return load(env={}, **base)


@pytest.fixture
def settings(tmp_path: Path, fresh_broker: EmbeddedBroker) -> Settings:
    s = make_settings(tmp_path, fresh_broker.bootstrap)
    create_topics(s.kafka)
    return s
