"""Both adapters of a stage's I/O have the port's shape: the Kafka one and the in-memory twin.

mypy proves it statically (``_fits_the_port`` in each adapter's module); this test checks it at run
time, member by member and signature by signature, so a method added to one adapter and used by a
stage cannot be missing from the other.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from runtime.kafka import Accounting
from runtime.settings import load
from runtime.stage_io import StageIO
from runtime.stage_io_memory import MemoryStageIO, MemoryTopics
from runtime.stage_port import StagePort

METHODS = sorted(n for n, v in vars(StagePort).items()
                 if callable(v) and (not n.startswith("_") or n in ("__enter__", "__exit__")))
PROPERTIES = sorted(n for n, v in vars(StagePort).items() if isinstance(v, property))
ATTRIBUTES = sorted(StagePort.__annotations__)


def _shape(fn: object) -> list[tuple[str, object, object]]:
    """Parameter names, kinds and defaults (annotations are mypy's job)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


def test_the_port_names_what_the_stages_use() -> None:
    assert {"subscribe", "poll", "decode", "dead_letter", "processing", "done", "rewind", "pause", "resume",
            "flush", "commit", "close"} <= set(METHODS)
    assert PROPERTIES == ["consumer", "producer"]
    assert ATTRIBUTES == ["accounting", "dlq", "ledger", "paused", "stage", "wire"]


@pytest.mark.parametrize("adapter", [StageIO, MemoryStageIO])
def test_every_method_of_the_port_has_the_same_signature(adapter: type) -> None:
    for name in METHODS:
        assert _shape(getattr(adapter, name)) == _shape(getattr(StagePort, name)), name


def test_both_adapters_are_ports_at_run_time(tmp_path: Path) -> None:
    """Constructing the Kafka adapter opens clients but contacts no broker until it subscribes."""
    kafka = load(env={}, data_dir=str(tmp_path)).kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    twin = MemoryStageIO(MemoryTopics(), "porttest")
    with StageIO(kafka, "porttest", Accounting("porttest")) as real:
        for io in (real, twin):
            assert isinstance(io, StagePort)
            for name in PROPERTIES + ATTRIBUTES:
                assert hasattr(io, name), (type(io).__name__, name)
        assert real.consumer.assignment() == twin.consumer.assignment() == []
