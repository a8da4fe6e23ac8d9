"""Test helpers: produce contracts to the real broker, drain topics, run a stage in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel

from runtime.encoder import HashEncoder
from runtime.kafka import consumer, producer
from runtime.settings import Settings
from runtime.vectors.index import Points, VectorIndex
from runtime.vectors.memory import MemoryIndex
from schemas.codec import encode
from schemas.events import ItemEvent
from schemas.topics import spec


def produce(settings: Settings, topic: str, msgs: list[BaseModel | bytes], keys: list[str] | None = None) -> None:
    p = producer(settings.kafka)
    for i, m in enumerate(msgs):
        if isinstance(m, bytes):
            key = (keys[i] if keys else "bad").encode()
            p.produce(topic, m, key=key)
        else:
            k = getattr(m, spec(topic).key)
            p.produce(topic, encode(m), key=str(k).encode())
    assert p.flush(10) == 0


def records(settings: Settings, topic: str, *, expect: int | None = None, timeout: float = 30.0,
            settle: float = 1.5) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every record of a topic, read from the beginning with a throw-away group, until
    ``expect`` records (then 0.3 s more without one) or, without ``expect``, ``settle`` s without one."""
    c = consumer(settings.kafka, f"drain-{topic}-{time.monotonic_ns()}")
    c.subscribe([topic])
    out: list[tuple[bytes | None, bytes | None]] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msgs = c.consume(100, timeout=0.3)
            for m in msgs:
                if m.error() is None:
                    out.append((m.key(), m.value()))
                    last = time.monotonic()
            if expect is not None and len(out) >= expect and time.monotonic() - last > 0.3:
                break
            if expect is None and out and time.monotonic() - last > settle:
                break
    finally:
        c.close()
    return out


def drain(settings: Settings, topic: str, *, expect: int | None = None, timeout: float = 30.0,
          settle: float = 1.5) -> list[Any]:
    """The JSON values of a topic (:func:`records`); ``unexposed`` ones read through their contract, so a
    test sees ``item_ids`` whichever id form (list or packed) the streams stage wrote."""
    from schemas.codec import decode
    from schemas.events import UnexposedBatch

    def value(v: bytes) -> Any:
        return decode(v, UnexposedBatch).model_dump(mode="json") if topic == "unexposed" else orjson.loads(v)
    return [value(v) for _, v in records(settings, topic, expect=expect, timeout=timeout, settle=settle)
            if v is not None]


def drain_raw(settings: Settings, topic: str, expect: int, timeout: float = 30.0) -> list[bytes]:
    """The raw values of a topic (framed ones, or to decode with a contract)."""
    return [v for _, v in records(settings, topic, expect=expect, timeout=timeout) if v is not None]


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str | Callable[[], str] = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


@contextmanager
def running(stage: Any, name: str = "stage") -> Iterator[threading.Event]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            stage.run(stop)
        except BaseException as e:  # noqa: BLE001 - surfaced to the test below
            errors.append(e)

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(40)
    if errors:
        raise errors[0]


def item_index(items: list[ItemEvent], collection: str, encoder: HashEncoder | None = None) -> VectorIndex:
    enc = encoder or HashEncoder()
    idx = MemoryIndex()
    idx.ensure_collection(collection, enc.dim)
    vecs = enc.encode([it.text for it in items])
    idx.upsert(collection, Points(np.asarray([it.item_id for it in items], np.int64), vecs,
                                  [{"text": it.text, "category": it.category} for it in items]))
    return idx
