"""The anchors prompt, shared by every backend, and the hash that names it.

System message + one worked example + the user's recent items, through the model's chat template, with
the assistant turn pre-filled with ``{"interests": ["`` so even a 135M model stays in the JSON format.
:func:`prompt_hash` names the template *and* the generation parameters, so every anchor set can say
exactly how it was produced.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from runtime.anchor_settings import TextAnchors
from workers.anchors.generators.base import AnchorPrompt

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- prompt

PROMPT_VERSION = "anchors-v1"
SYSTEM_PROMPT = (
    "You read the items a shopper liked and name the shopper's interests. Answer with JSON only."
)
USER_TEMPLATE = (
    "Liked items, oldest first:\n{items}\n\nName {k} different interests of this shopper, 1 to 4 words each."
)
# One worked example as a previous chat turn: a 135M model copies the *form* of an example far more
# reliably than it follows a described format. Echoes of its answers are dropped (see clean_anchors):
# a model that repeats the example has not looked at the user.
EXAMPLE_HISTORY = ["Two-person camping tent", "Hiking boots waterproof", "Portable gas stove",
                   "Trail mix snack pack"]
EXAMPLE_ANCHORS = ["camping gear", "hiking", "outdoor cooking", "healthy snacks", "trail running", "fishing",
                   "survival tools", "travel backpacks"]
# The assistant turn starts with this text: the model only has to continue the JSON array.
PREFILL = '{"interests": ["'

MAX_ANCHOR_WORDS = 8
MAX_ANCHOR_CHARS = 80
MAX_ITEM_CHARS = 160  # a history item's text is cut to this in the prompt: titles, not descriptions
TOKENS_PER_ANCHOR = 10  # generation budget: k * this + 16, capped by settings.max_new_tokens
RETRY_TEMPERATURE = 0.8  # retries sample (another seed) at least this warm: greedy would repeat itself
# Greedy decoding by a 135M model loops ("running shoes", "running shoes", ...). A repetition penalty on
# the *generated* word tokens only (not the prompt, not JSON punctuation) gave k distinct anchors on
# every test history where plain greedy gave one; see WordRepetitionPenalty.
WORD_REPETITION_PENALTY = 1.3
FALLBACK_LOGPROB = -5.0  # log-prob given to fallback anchors: finite, and low enough to read as weak
# Log-prob of anchors from a backend that returns no token log-probs (an OpenAI-compatible server that
# ignores ``logprobs``, e.g. ``transformers serve``). 0 is the labeler's "unknown": its generation
# confidence term exp(0) = 1 then leaves the weight to the other terms instead of inventing a number.
NO_LOGPROB = 0.0
# Servers other than our own transformers loop cannot run WordRepetitionPenalty; OpenAI's and vLLM's
# presence penalty is the closest standard knob (additive, generated tokens only, not the prompt).
PRESENCE_PENALTY = 0.5


def build_messages(prompt: AnchorPrompt) -> list[dict[str, str]]:
    """The chat (system, worked example, the user's items) for one user, before the chat template."""
    example_k = max(1, min(prompt.k, len(EXAMPLE_ANCHORS)))
    example_answer = json.dumps({"interests": EXAMPLE_ANCHORS[:example_k]})
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": _user_message(EXAMPLE_HISTORY, example_k)},
        {"role": "assistant", "content": example_answer},
        {"role": "user", "content": _user_message(prompt.history, prompt.k)},
    ]


def _user_message(history: Sequence[str], k: int) -> str:
    items = "\n".join(f"- {' '.join(t.split())[:MAX_ITEM_CHARS]}" for t in history)
    return USER_TEMPLATE.format(items=items, k=k)


def generation_budget(k: int, max_new_tokens: int) -> int:
    """New tokens allowed for k anchors: enough for k short phrases in JSON, never more than configured.

    A small model that rambles is cut early (the parser salvages complete items from truncated JSON),
    which bounds the cost of one user at roughly TOKENS_PER_ANCHOR * k tokens.
    """
    return max(8, min(max_new_tokens, TOKENS_PER_ANCHOR * k + 16))


def render_chat(tokenizer: Any, prompt: AnchorPrompt, *, prefill: bool = True) -> str:
    """The exact text an in-process backend feeds its model: the chat template with the generation
    prompt, then (unless structured output constrains the answer from its first character) the pre-fill.
    """
    text = tokenizer.apply_chat_template(build_messages(prompt), tokenize=False, add_generation_prompt=True)
    return str(text) + (PREFILL if prefill else "")


def anchor_schema(k: int) -> dict[str, Any]:
    """JSON schema of the answer for structured output: exactly ``k`` short strings under "interests".

    ``minItems = maxItems = k`` makes a constrained decoder write k items instead of stopping at one;
    ``maxLength`` keeps one item from eating the token budget. Uniqueness is not in the schema (most
    grammar engines do not support ``uniqueItems``): clean_anchors drops duplicates.
    """
    return {
        "type": "object",
        "properties": {
            "interests": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_ANCHOR_CHARS},
                "minItems": k,
                "maxItems": k,
            }
        },
        "required": ["interests"],
        "additionalProperties": False,
    }


def attempt_sampling(settings: TextAnchors, attempt: int) -> tuple[float, int]:
    """(temperature, seed) of an attempt: as configured first, then warmer with another seed.

    Every backend uses this, so a retry means the same thing whichever model answers.
    """
    if attempt == 0:
        return settings.temperature, settings.seed
    return max(settings.temperature, RETRY_TEMPERATURE), settings.seed + attempt


def prompt_hash(settings: TextAnchors, backend: str) -> str:
    """Stable id of everything that shapes an anchor besides the history: template and generation params.

    Two anchor sets with the same hash were produced by the same instructions and decoding policy, so
    their log-probs and quality are comparable; a change to any of these gives a new hash.
    """
    spec = {
        "version": PROMPT_VERSION,
        "system": SYSTEM_PROMPT,
        "user": USER_TEMPLATE,
        "example_history": EXAMPLE_HISTORY,
        "example_anchors": EXAMPLE_ANCHORS,
        "prefill": PREFILL,
        "limits": [MAX_ANCHOR_WORDS, MAX_ANCHOR_CHARS, MAX_ITEM_CHARS, TOKENS_PER_ANCHOR],
        "retry_temperature": RETRY_TEMPERATURE,
        "word_repetition_penalty": WORD_REPETITION_PENALTY if backend == "transformers" else None,
        "fallback_logprob": FALLBACK_LOGPROB,
        "backend": backend,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "history_items": settings.history_items,
        "retries": settings.retries,
        "seed": settings.seed,
    }
    if backend.startswith(("openai", "vllm")):  # only these send it; older hashes stay as they were
        spec["presence_penalty"] = PRESENCE_PENALTY
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()
