"""What the refactors of the house may not change, pinned byte for byte (issue 23, "Done when").

The stages were split into loops over engines and the packages moved; users see none of it only if the
bytes on the wire, the sample ids, the dead-letter records, the anchors and the metric catalogue stay what
they were. :func:`snapshot` computes each of them from fixed inputs through the code the stages run
(the join engine and the fast encoders of the streams stage, the labeler's ``label_batch``, the content
anchor source, ``dead_letter``, ``sample_id``, the trainer's checkpoint payload, every Prometheus family
the stages declare);
``tests/golden/wire.json`` holds their sha256 digests and the catalogue as computed on commit 5dc3e30, before
this issue's last moves (the stored file says which commit made it). A difference is a change users see:
if it is meant, regenerate with ``python tests/unit/app/test_wire_golden.py > tests/golden/wire.json`` and
say why in the commit.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "tests" / "golden" / "wire.json"
T0 = 1_700_000_000_000
ENC = "hash-bow-64"
DIM = 16


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _streams(tmp: Path) -> dict[str, str]:
    """Recall then exposure, exposure then recall, a recall with unknown items: what the streams stage sends."""
    from runtime.encoder import HashEncoder
    from runtime.kafka import Accounting
    from runtime.settings import load
    from runtime.vectors.index import Points
    from runtime.vectors.memory import MemoryIndex
    from schemas.events import ExposedItem, ExposureEvent
    from schemas.fast_codec import encode_real_samples, encode_unexposed
    from schemas.topics import EXPOSURE, RECALL
    from streams.catalog import Catalog
    from streams.clock import EventClock
    from streams.join import Recall
    from streams.join_engine import JoinEngine, RealLabels

    settings = load(env={}, data_dir=str(tmp), streams={"join_wait_s": 30, "allowed_lateness_s": 5,
                                                        "idle_advance_s": 0})
    index = MemoryIndex()
    col = settings.encoder.collection
    index.ensure_collection(col, HashEncoder().dim)
    ids = list(range(1, 40))
    index.upsert(col, Points(np.asarray(ids, np.int64), HashEncoder().encode([f"item {i}" for i in ids]),
                             [{"text": f"item {i}"} for i in ids]))
    engine = JoinEngine({}, settings.streams, Accounting("golden"), Catalog(index, col),
                        EventClock(5_000, 0, (RECALL.name, EXPOSURE.name)), now=lambda: 2_000_000_000_000)
    out: dict[str, str] = {}

    def recall(rid: str, user: str, items: list[int], ts: int) -> list[object]:
        rec = Recall(rid, user, ts, np.asarray(items, np.int64), np.linspace(1, 0, len(items)).astype(np.float32))
        return list(engine.on_recall(rec, 0, 0))

    def exposure(rid: str, user: str, shown: list[int], clicked: set[int], ts: int) -> list[object]:
        ev = ExposureEvent(request_id=rid, user_id=user, ts=ts, items=[
            ExposedItem(item_id=i, position=p, clicked=i in clicked) for p, i in enumerate(shown)])
        return list(engine.on_exposure(ev, ev.model_dump_json().encode(), 0, 1))

    script = [("r1", recall("r1", "u1", list(range(1, 31)), T0) + exposure("r1", "u1", [3, 7, 11], {7}, T0 + 10)),
              ("r2", exposure("r2", "u2", [2, 4], set(), T0 + 20) + recall("r2", "u2", [1, 2, 3, 4, 5, 6], T0 + 30))]
    for name, outputs in script:
        for j, o in enumerate(outputs):
            if isinstance(o, RealLabels):
                body = encode_real_samples(o.exposure)
            else:
                e = o.exposure  # type: ignore[attr-defined]
                for version in (1, 2):  # the packed ids (the default) and the JSON list older labelers read
                    for scores in (None, o.scores):  # type: ignore[attr-defined]
                        body = encode_unexposed(e.request_id, e.user_id, e.ts, o.item_ids,  # type: ignore[attr-defined]
                                                scores, version=version)
                        out[f"streams.{name}.{j}.unexposed.v{version}.{scores is None}"] = _sha(body)
                continue
            out[f"streams.{name}.{j}.{type(o).__name__}"] = _sha(body)
    return out


def _labeler() -> dict[str, str]:
    """The labeler's SampleBatch bytes for three unexposed batches, fixed map and every confidence term."""
    from runtime.settings import LabelerSettings
    from schemas.events import Anchor, AnchorSet
    from workers.labeler.anchor_book import AnchorBook
    from workers.labeler.assemble import label_batch
    from workers.labeler.item_matrix import ItemMatrix

    rng = np.random.default_rng(7)
    ids = np.arange(1000, 1200, dtype=np.int64)
    items = ItemMatrix(collection="items__hash", encoder=ENC)
    items.add(ids, _unit(rng, ids.size))
    book = AnchorBook(ENC, items)
    vecs = _unit(rng, 4)
    book.put(AnchorSet(user_id="u", version=1, model="m", prompt_hash="ph", encoder=ENC, generated_at=1_000,
                       history=[1000, 1001, 1002], fallback=False,
                       anchors=[Anchor(text=f"a{k}", vector=v.tolist(), logprob=-0.5) for k, v in enumerate(vecs)]))
    settings = LabelerSettings(label_source="map", use_coherence=True, use_consistency=True, use_generation=True,
                               use_margin=True)
    out: dict[str, str] = {}
    for n, (request, cands) in enumerate([("req-1", ids[10:60]), ("req-2", ids[50:200]), ("req-3", ids[:5])]):
        raw = orjson.dumps({"schema_version": 1, "request_id": request, "user_id": "u", "ts": 5_000 + n,
                            "item_ids": cands.tolist(), "recall_scores": [0.5] * len(cands)})
        body, _ = label_batch(raw, book, items, settings, collection="items__hash")
        out[f"labeler.{request}"] = _sha(body)
    return out


def _anchors_and_records() -> dict[str, str]:
    from schemas.codec import dead_letter
    from schemas.ids import sample_id
    from workers.anchors.vector_anchors import ContentAnchorSource

    rng = np.random.default_rng(3)
    a = ContentAnchorSource().one(_unit(rng, 12), 4)
    anchors = orjson.dumps({"vectors": np.asarray(a.vectors, np.float32).round(6).tolist(),
                            "logprobs": [round(float(x), 6) for x in a.logprobs], "labels": list(a.labels)})
    dl = dead_letter(topic="recall", partition=2, offset=41, key=b"u1", value=b"{not json", error="bad json",
                     reason="decode", stage="streams").model_dump(mode="json")
    dl.pop("ts")  # the wall clock of the failure
    ids = [sample_id("req-1", 1234), sample_id("req-1", 1234, 7), sample_id("r\u00e9q", 2**62, 2**40)]
    return {"anchors.content": _sha(anchors), "dlq.record": _sha(orjson.dumps(dl, option=orjson.OPT_SORT_KEYS)),
            "sample_ids": _sha("\n".join(ids).encode())}


def _checkpoint(tmp: Path) -> dict[str, str]:
    """A trainer checkpoint's layout (format, keys, model tensor names and shapes, holdout and settings), from
    the payload the trainer writes, without the wall-clock time and the weights' values."""
    import torch

    from runtime.settings import load
    from workers.model import ModelConfig
    from workers.trainer.state import build, payload
    from workers.trainer.vector_wait import VectorWait

    holdout_mod = importlib.import_module(payload.__module__)
    settings = load(env={}, data_dir=str(tmp))
    torch.manual_seed(0)
    model, opt = build(ModelConfig.from_settings(settings.trainer, DIM), 0.01)
    holdout = holdout_mod.Holdout(4)
    holdout.add("u1", 7, 1.0, [1, 2])
    ckpt = payload(settings, version=3, model=model, opt=opt, offsets={("samples", 1): 42}, counts={"trained": 5},
                   seen={9, 3}, holdout=holdout, memory=None, waiting=VectorWait())

    def shape(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return [str(v.dtype), list(v.shape)]
        if isinstance(v, dict):
            return {str(k): shape(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [shape(x) for x in v]
        return v

    ckpt.pop("wall_time")
    layout = shape({k: v for k, v in ckpt.items() if k not in ("optimizer_state",)})
    layout["optimizer_state"] = sorted(ckpt["optimizer_state"])
    return {"trainer.checkpoint": _sha(orjson.dumps(layout, option=orjson.OPT_SORT_KEYS))}


def _metrics() -> list[str]:
    """Every family the stages declare: name, type, help and label names (what dashboards and alerts read)."""
    from prometheus_client import REGISTRY

    for path in sorted(p for pkg in ("runtime", "streams", "workers", "gpl")
                       for p in (ROOT / pkg).rglob("*metrics*.py") if p.stem != "metrics_relay"):
        importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    out = []
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - the registry has no public listing
        name = getattr(collector, "_name", "")
        if name.startswith("gpl_"):
            labels = ",".join(getattr(collector, "_labelnames", ()))
            kind = getattr(collector, "_type", "")
            buckets = ",".join(map(str, getattr(collector, "_upper_bounds", ())))
            out.append(f"{name} {kind} [{labels}] [{buckets}] {getattr(collector, '_documentation', '')}")
    return sorted(out)


def snapshot() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        digests = {**_streams(Path(tmp)), **_labeler(), **_anchors_and_records(), **_checkpoint(Path(tmp))}
    return {"digests": dict(sorted(digests.items())), "metrics": _metrics()}


def test_wire_output_sample_ids_dead_letters_and_metrics_are_unchanged() -> None:
    golden = json.loads(GOLDEN.read_text())
    now = snapshot()
    assert now["digests"] == golden["digests"], "wire bytes changed (module docstring: regenerate only if meant)"
    missing = sorted(set(golden["metrics"]) - set(now["metrics"]))
    added = sorted(set(now["metrics"]) - set(golden["metrics"]))
    assert not missing and not added, f"metric catalogue changed: missing {missing}, added {added}"


if __name__ == "__main__":
    json.dump({"made_on": sys.argv[1] if len(sys.argv) > 1 else "", **snapshot()}, sys.stdout, indent=1)
    print()
