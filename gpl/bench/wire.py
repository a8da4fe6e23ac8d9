"""``gpl bench wire``: what each wire path costs per message (why ``validate_payloads`` is off by default).

One RecallEvent of ``candidates`` candidates is read through the streams fast path
(:func:`streams.join.decode_recall`) after :meth:`runtime.serde.Wire.payload`, and written by
:meth:`~runtime.serde.Wire.encode`, as plain JSON, framed without a registry, framed with the
registry's schema-id check, and framed with JSON Schema validation of the payload (confluent-kafka's
``JSONDeserializer``/``JSONSerializer`` with ``validate``). The registry is confluent-kafka's in-memory
one, so the figures are the client-side cost only (ids are cached after the first lookup anyway).
Medians of ``repeats`` calls, in milliseconds.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable

from runtime.serde import Wire, registry_client, registry_schema
from runtime.settings import SchemaRegistrySettings
from schemas.codec import encode
from schemas.events import RecallEvent
from schemas.wire import frame, subject
from streams.join import decode_recall


def _median_ms(f: Callable[[], object], repeats: int) -> float:
    f()  # warm: caches, validators
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


def bench_wire(candidates: int = 1000, repeats: int = 50) -> dict[str, object]:
    url = f"mock://bench-{uuid.uuid4().hex}"
    checked = SchemaRegistrySettings(url=url, output_format="confluent")
    validated = checked.model_copy(update={"validate_payloads": True})
    sid = registry_client(checked).register_schema(subject("recall"), registry_schema("recall"))
    ev = RecallEvent(request_id="r", user_id="u", ts=1, item_ids=list(range(candidates)), scores=[0.5] * candidates)
    plain, framed = encode(ev), frame(sid, encode(ev))
    bare, w_checked, w_validated = Wire(), Wire(checked), Wire(validated)
    n = candidates + 1
    read = {
        "plain": lambda: decode_recall(bare.payload("recall", plain), n),
        "framed_no_registry": lambda: decode_recall(bare.payload("recall", framed), n),
        "framed_id_check": lambda: decode_recall(w_checked.payload("recall", framed), n),
        "framed_validate_payloads": lambda: decode_recall(w_validated.payload("recall", framed), n),
    }
    write = {
        "plain": lambda: bare.encode("recall", ev),
        "confluent": lambda: w_checked.encode("recall", ev),
        "confluent_validate_payloads": lambda: w_validated.encode("recall", ev),
    }
    return {
        "candidates": candidates, "repeats": repeats,
        "read_ms": {k: _median_ms(f, repeats) for k, f in read.items()},
        "write_ms": {k: _median_ms(f, repeats) for k, f in write.items()},
    }
