"""The transformers backend's prefix KV cache: the same greedy outputs as without it, fewer tokens computed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.anchor_settings import TransformersAnchors
from runtime.model_assets import ensure_llm
from workers.anchors.generators.base import AnchorPrompt
from workers.anchors.generators.transformers_backend import TransformersGenerator

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [
    AnchorPrompt("runner", ["Nike running shoes men lightweight", "Garmin GPS running watch"], 3),
    AnchorPrompt("reader", ["Harry Potter hardcover box set", "Lord of the Rings illustrated edition",
                            "Dragon fantasy novel paperback", "Terry Pratchett Discworld"], 3),
    AnchorPrompt("cook", ["Cast iron skillet"], 2),
]


@pytest.fixture(scope="module")
def generator() -> TransformersGenerator:
    os.environ["HF_HUB_OFFLINE"] = "1"
    default = REPO / ".gpl" / "models" / "smollm2-135m-instruct"
    model_dir = ensure_llm(Path(os.environ.get("GPL_TEST_MODEL_DIR", default)))
    return TransformersGenerator(model_dir, TransformersAnchors(k=3, max_new_tokens=48), threads=1)


@pytest.mark.llm
def test_prefix_cache_gives_the_same_greedy_outputs(generator: TransformersGenerator) -> None:
    prefix, cache = generator.shared_prefix()
    assert cache is not None and len(prefix) >= 8  # the chat template and system prompt
    rendered = [generator.render(p) for p in PROMPTS]
    assert all(generator.tokenizer(t, add_special_tokens=False)["input_ids"][: len(prefix)] == prefix
               for t in rendered)
    generator.prefix_cache = True
    with_cache = generator.complete(PROMPTS, 0)
    assert cache.get_seq_length() == len(prefix)  # the shared cache itself is never extended
    generator.prefix_cache = False
    without = generator.complete(PROMPTS, 0)
    assert [c.raw for c in with_cache] == [c.raw for c in without]
    for a, b in zip(with_cache, without, strict=True):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)
