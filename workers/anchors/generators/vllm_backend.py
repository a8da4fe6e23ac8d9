"""Anchors from the in-process vLLM engine (GPU batch workers): a thin adapter over the shared driver.

Everything backend-independent (prompt, parser, retries, fallback, log-prob mapping, prompt hash) is
:mod:`workers.anchors.generators`; this module only builds vLLM's inputs and reads its outputs.

* ``vllm`` is imported when the adapter is constructed, never at module import: the package is the
  optional extra ``pip install .[vllm]`` and exists only on GPU hosts. Without it the constructor
  raises :class:`VLLMUnavailable` saying how to get it.
* ``LLM(model=dir, enable_prefix_caching=True)``: every prompt starts with the same system text and
  worked example, so prefix caching computes that prefix once for all users.
* One ``generate`` call per attempt with every pending prompt (vLLM schedules its own batches; cutting
  them to ``batch_size`` would only idle the GPU between calls), one ``SamplingParams`` per prompt
  (each prompt's k sets its schema and token budget).
* Structured output: the JSON schema of :func:`~workers.anchors.generators.prompt.anchor_schema`, through
  ``StructuredOutputsParams`` (``SamplingParams.structured_outputs``, vLLM >= 0.10.2; the only API
  from 0.12) or ``GuidedDecodingParams`` (``SamplingParams.guided_decoding``, older releases),
  whichever the installed version has. With neither, the pre-fill of the transformers backend keeps
  the model in the JSON format instead. A schema-constrained answer must start at ``{``, so the
  pre-fill and the schema are never combined. The path taken is part of ``prompt_hash``.
* ``logprobs=1`` returns the sampled token's log-prob at every step (vLLM reports the model's raw
  log-probs by default, before temperature, as the transformers backend does); token ids and
  log-probs go through :func:`~workers.anchors.generators.logprobs.completion_from_tokens`, the helper the
  transformers backend uses, so per-anchor log-probs mean the same thing on both.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime.anchor_settings import VLLMAnchors
from workers.anchors.generators.base import AnchorPrompt
from workers.anchors.generators.logprobs import Completion, completion_from_tokens
from workers.anchors.generators.prompt import (
    PREFILL,
    PRESENCE_PENALTY,
    anchor_schema,
    attempt_sampling,
    generation_budget,
    render_chat,
)
from workers.anchors.generators.retrying import RetryingGenerator

log = logging.getLogger(__name__)


class VLLMUnavailable(ImportError):
    """vLLM is not installed in this environment (it is an optional extra for GPU hosts)."""


def import_vllm() -> ModuleType:
    """The ``vllm`` module, or a :class:`VLLMUnavailable` that says what to install and the alternatives."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise VLLMUnavailable(
            "anchors backend 'vllm' needs the vLLM engine, which is not installed here: "
            "`pip install '.[vllm]'` on a GPU host, or run `vllm serve` and use backend 'openai' "
            "(anchors.base_url); on CPU use backend 'transformers'"
        ) from e


def structured_api(vllm: ModuleType) -> tuple[str, type] | None:
    """(SamplingParams keyword, params class) of the installed vLLM's structured output, or None."""
    sp_mod: Any = getattr(vllm, "sampling_params", None)
    if sp_mod is None:
        try:
            sp_mod = importlib.import_module(f"{vllm.__name__}.sampling_params")
        except ImportError:
            return None
    for attr, cls_name in (("structured_outputs", "StructuredOutputsParams"),
                           ("guided_decoding", "GuidedDecodingParams")):
        cls = getattr(sp_mod, cls_name, None)
        if isinstance(cls, type):
            return attr, cls
    return None


class VLLMGenerator(RetryingGenerator):
    """The in-process vLLM engine as an AnchorGenerator. ``engine_kwargs`` go to ``vllm.LLM`` as given
    (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``, ``max_model_len``)."""

    def __init__(self, model_dir: Path | str, settings: VLLMAnchors, **engine_kwargs: Any) -> None:
        vllm = import_vllm()
        self._structured = structured_api(vllm)
        super().__init__(settings, "vllm+json_schema" if self._structured else "vllm+prefill")
        self.model = settings.model_name
        self._sampling_params: Any = vllm.SamplingParams
        engine = {"enable_prefix_caching": True, "seed": settings.seed, **engine_kwargs}
        self.llm: Any = vllm.LLM(model=str(model_dir), **engine)
        self.tokenizer: Any = self.llm.get_tokenizer()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self._stop_ids = frozenset({int(eos)} if eos is not None else set())
        if self._structured is None:
            log.warning("this vLLM has no structured-output API; using the JSON pre-fill instead")

    @property
    def structured(self) -> bool:
        return self._structured is not None

    def params(self, prompt: AnchorPrompt, attempt: int) -> Any:
        """The ``SamplingParams`` of one prompt at one attempt."""
        temperature, seed = attempt_sampling(self.settings, attempt)
        kw: dict[str, Any] = {
            "max_tokens": generation_budget(prompt.k, self.settings.max_new_tokens),
            "temperature": temperature,
            "seed": seed,
            "logprobs": 1,
            "presence_penalty": PRESENCE_PENALTY,
        }
        if temperature > 0:
            kw |= {"top_p": 0.95, "top_k": 50}
        if self._structured is not None:
            attr, cls = self._structured
            kw[attr] = cls(json=anchor_schema(prompt.k))
        return self._sampling_params(**kw)

    def complete(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        prefill = "" if self.structured else PREFILL
        texts = [render_chat(self.tokenizer, p, prefill=not self.structured) for p in prompts]
        outs = self.llm.generate(texts, [self.params(p, attempt) for p in prompts], use_tqdm=False)
        return [self._completion(o.outputs[0], prefill) for o in outs]

    def _complete_batched(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        """Every prompt in one ``generate`` call: the engine's scheduler does the batching."""
        return self.complete(prompts, attempt) if prompts else []

    def _completion(self, out: Any, prefill: str) -> Completion:
        ids = [int(t) for t in out.token_ids]
        lps = [token_logprob(out.logprobs, j, t) for j, t in enumerate(ids)]
        return completion_from_tokens(ids, lps, self._decode, self._stop_ids, prefill)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def token_logprob(logprobs: Any, pos: int, token_id: int) -> float:
    """Log-prob of the sampled ``token_id`` at step ``pos`` from vLLM's per-step logprobs container.

    vLLM gives a sequence of {token_id: Logprob(logprob=...)} (a list of dicts, or a FlatLogprobs
    object indexed the same way in newer releases); a missing entry reads as -100 (very unlikely),
    which the span mean treats like any other very unlikely token.
    """
    try:
        entry = logprobs[pos][token_id]
    except (TypeError, KeyError, IndexError):
        return -100.0
    value = getattr(entry, "logprob", entry)
    try:
        return float(value)
    except (TypeError, ValueError):
        return -100.0
