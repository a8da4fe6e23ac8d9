"""The vLLM adapter without vLLM: a clear error when the extra is missing, and its plumbing (one batched
``generate`` call, structured-output API of either vLLM generation, log-prob mapping) against a fake
``vllm`` module. vLLM itself cannot run on these machines (no GPU); the fake stands in for the engine
only, the adapter's own code runs unchanged. Pure logic, so mocking is the right tool here.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from runtime.anchor_settings import VLLMAnchors
from workers.anchors.generators.base import AnchorPrompt
from workers.anchors.generators.prompt import PREFILL, anchor_schema, prompt_hash

EOS = 0


def test_missing_vllm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    from workers.anchors.generators.vllm_backend import VLLMGenerator, VLLMUnavailable

    with pytest.raises(VLLMUnavailable, match=r"pip install '\.\[vllm\]'.*backend 'openai'"):
        VLLMGenerator("/nonexistent", VLLMAnchors())
    assert issubclass(VLLMUnavailable, ImportError)


def test_importing_the_module_does_not_import_vllm() -> None:
    import workers.anchors.generators.vllm_backend  # noqa: F401

    if importlib.util.find_spec("vllm") is None:
        assert "vllm" not in sys.modules


# ------------------------------------------------------------------------------------ fake engine

@dataclass
class Logprob:
    logprob: float


@dataclass
class FakeOutput:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]


@dataclass
class FakeRequestOutput:
    outputs: list[FakeOutput]


class CharTokenizer:
    """One token per character (id = code point), EOS = 0: spans and log-probs are exact to check."""

    eos_token_id = EOS

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool,
                            add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(i) for i in ids if i != EOS)


@dataclass
class Engine:
    """Records what the adapter asks; answers each prompt with two anchors, 'alpha' and 'beta'."""

    kwargs: dict[str, Any]
    calls: list[tuple[list[str], list[Any]]] = field(default_factory=list)

    def get_tokenizer(self) -> CharTokenizer:
        return CharTokenizer()

    def generate(self, texts: list[str], params: list[Any], use_tqdm: bool = True) -> list[FakeRequestOutput]:
        self.calls.append((texts, params))
        out = []
        for text in texts:
            full = '{"interests": ["alpha", "beta"]}'
            answer = full[len(PREFILL):] if text.endswith(PREFILL) else full
            ids = [ord(ch) for ch in answer] + [EOS]
            a, b = answer.index("alpha"), answer.index("beta")
            lps = [-2.0 if a <= j < a + 5 else -1.0 if b <= j < b + 4 else -0.1 for j in range(len(answer))]
            lps.append(-0.01)  # the EOS step
            out.append(FakeRequestOutput([FakeOutput(answer, ids, [{t: Logprob(lp)} for t, lp in zip(ids, lps,
                                                                                                      strict=True)])]))
        return out


def fake_vllm(monkeypatch: pytest.MonkeyPatch, api: str | None) -> list[Engine]:
    """Install a fake ``vllm`` with the structured-output API of a given generation (or none)."""
    engines: list[Engine] = []
    mod = types.ModuleType("vllm")
    sp = types.ModuleType("vllm.sampling_params")

    class SamplingParams:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

    def llm(model: str, **kw: Any) -> Engine:
        engines.append(Engine({"model": model, **kw}))
        return engines[-1]

    if api is not None:
        @dataclass
        class Params:
            json: Any = None

        Params.__name__ = api
        setattr(sp, api, Params)
    mod.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    mod.LLM = llm  # type: ignore[attr-defined]
    mod.sampling_params = sp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)
    return engines


PROMPTS = [AnchorPrompt(f"u{i}", [f"item {i} alpha", "beta gear"], 2) for i in range(5)]


@pytest.mark.parametrize(("api", "attr"), [("StructuredOutputsParams", "structured_outputs"),
                                           ("GuidedDecodingParams", "guided_decoding")])
def test_structured_output_either_api_one_generate_call(monkeypatch: pytest.MonkeyPatch, api: str,
                                                        attr: str) -> None:
    engines = fake_vllm(monkeypatch, api)
    from workers.anchors.generators.vllm_backend import VLLMGenerator

    s = VLLMAnchors(batch_size=2, retries=1)
    gen = VLLMGenerator("/models/x", s, gpu_memory_utilization=0.5)
    (engine,) = engines
    assert engine.kwargs == {"model": "/models/x", "enable_prefix_caching": True, "seed": 0,
                             "gpu_memory_utilization": 0.5}
    out = gen.generate(PROMPTS)
    assert len(engine.calls) == 1  # all five prompts in one call, not cut to batch_size
    texts, params = engine.calls[0]
    assert len(texts) == 5 and not any(t.endswith(PREFILL) for t in texts)  # schema, so no pre-fill
    kw = params[0].kw
    assert kw["logprobs"] == 1 and kw["temperature"] == 0.0 and kw["max_tokens"] == 36
    assert kw[attr].json == anchor_schema(2)
    assert gen.prompt_hash == prompt_hash(s, "vllm+json_schema")
    for g in out:
        assert g.anchors == ["alpha", "beta"] and g.parsed_first_try and not g.fallback
        assert g.logprobs == [pytest.approx(-2.0), pytest.approx(-1.0)]  # same span rule as transformers
        assert g.tokens == len('{"interests": ["alpha", "beta"]}') + 1  # the EOS step counts


def test_without_structured_output_the_prefill_keeps_json(monkeypatch: pytest.MonkeyPatch) -> None:
    engines = fake_vllm(monkeypatch, None)
    from workers.anchors.generators.vllm_backend import VLLMGenerator

    s = VLLMAnchors()
    gen = VLLMGenerator("/models/x", s)
    out = gen.generate(PROMPTS[:2])
    texts, params = engines[0].calls[0]
    assert all(t.endswith(PREFILL) for t in texts)
    assert "structured_outputs" not in params[0].kw and "guided_decoding" not in params[0].kw
    assert gen.prompt_hash == prompt_hash(s, "vllm+prefill") != prompt_hash(s, "vllm+json_schema")
    assert [g.anchors for g in out] == [["alpha", "beta"]] * 2
    assert out[0].raw.startswith(PREFILL)
    assert out[0].logprobs == [pytest.approx(-2.0), pytest.approx(-1.0)]
