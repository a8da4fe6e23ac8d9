"""pytest-benchmark of the labeler's hot path (``pytest tests/unit/workers/bench_labeler.py --benchmark-enable``).

With the project's default ``--benchmark-disable`` each benchmark body runs once, as a smoke test.
Each round labels a cycle of distinct requests (not one request over and over: repeating the same
candidate ids lets the CPU's branch predictor and caches learn them, and the figure would flatter).
For the side-by-side figure against the naive loop, single-threaded, run ``python -m gpl.bench.labeler``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from gpl.bench.labeler import fast, single_thread, synthetic
from gpl.bench.labeler_reference import naive, same_samples
from schemas.events import SampleBatch
from workers.labeler.assemble import Labeling

CANDIDATES = 1000


@pytest.fixture(scope="module")
def data() -> tuple[Labeling, list[bytes]]:
    return synthetic(candidates=CANDIDATES, k=8, dim=384, batches=16, items=5000, users=8, label_source="map")


def _cycle(fn: Callable[[bytes], bytes], raws: list[bytes]) -> Callable[[], int]:
    def run() -> int:
        n = 0
        for raw in raws:
            n += len(fn(raw))
        return n
    return run


@pytest.mark.parametrize("impl", ["fast", "naive"])
def test_bench_label_batch(benchmark: BenchmarkFixture, data: tuple[Labeling, list[bytes]], impl: str
                           ) -> None:
    ctx, raws = data
    fn = fast(ctx) if impl == "fast" else naive(ctx)
    SampleBatch.model_validate_json(fn(raws[0]))  # what is timed is a valid SampleBatch
    assert same_samples(fast(ctx)(raws[1]), naive(ctx)(raws[1]))  # and both paths give the same samples
    benchmark.group = "label_batch (1,000 candidates x 16 requests, K=8, dim=384)"
    benchmark.extra_info["candidates_per_round"] = CANDIDATES * len(raws)
    with single_thread():
        assert benchmark(_cycle(fn, raws)) > 0
