"""Anchor generators: the seam between the anchors worker and whatever LLM writes the interest anchors.

The worker only sees :class:`AnchorGenerator`: prompts in, :class:`Generation` out, never an exception
for malformed model output. Everything that does not depend on the backend lives here once:

* the prompt (system + one worked example + the user's recent items, through the model's chat
  template, with the assistant turn pre-filled with ``{"interests": ["`` so even a 135M model stays in
  the JSON format) and its :func:`prompt_hash`, which names the template *and* the generation
  parameters so every anchor set can say exactly how it was produced;
* a tolerant parser (:func:`parse_anchors`) and validator (:func:`clean_anchors`): small models wrap
  JSON in code fences, truncate it at the token budget, switch to numbered lists, repeat themselves
  or echo the worked example — we salvage what is usable and reject the rest;
* the retry policy: an unparseable answer is asked again with sampling (another seed, a warmer
  temperature) up to ``AnchorSettings.retries`` times;
* the documented **fallback** (:func:`fallback_anchors`) when every attempt failed: the user's most
  recent positive items' own texts become the anchors. Each such anchor sits exactly on an item the
  user liked, so matching degrades to item-to-item similarity instead of failing; the generation is
  marked ``fallback=True``, carries the low fixed log-prob :data:`FALLBACK_LOGPROB`, and is counted.

Per-anchor log-probs are an approximation (documented in :func:`span_logprobs`): the mean log-prob of
the generated tokens whose characters overlap the anchor's text in the raw output.

Backends all derive from :class:`RetryingGenerator`, which owns the shared driver (ask, parse, re-ask,
fall back, count); a backend only implements :meth:`RetryingGenerator.complete` and turns its model's
answer into a :class:`Completion` (with :func:`completion_from_tokens` when it has token ids, with
:func:`token_ends` when it has token texts). Here: :class:`TransformersGenerator` (Hugging Face
transformers, CPU by default) and :class:`MemoryGenerator` (pure Python, deterministic, for tests).
``workers.generators_openai.OpenAIGenerator`` (any OpenAI-compatible server: ``vllm serve``,
``transformers serve``) and ``workers.generators_vllm.VLLMGenerator`` (the in-process vLLM engine) live
in their own modules so that their optional dependencies are imported only when chosen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gpl.metrics import ANCHOR_GENERATIONS, ANCHOR_PARSE_FAILURES, ANCHOR_TOKENS
from gpl.settings import AnchorSettings

if TYPE_CHECKING:
    from gpl.settings import Settings

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- contracts


@dataclass(frozen=True)
class AnchorPrompt:
    """What the LLM sees of one user: recent positive item texts (most recent last) and how many anchors."""

    user_id: str
    history: list[str]
    k: int


@dataclass
class Generation:
    """One user's anchors and how they came about (for lineage, metrics and the confidence weight).

    ``logprobs[i]`` is the mean token log-prob of ``anchors[i]``; ``tokens`` counts the tokens generated
    over all attempts (the cost); ``attempts`` is how many times the model was asked; ``fallback`` says
    the anchors are the history texts because no attempt was usable.
    """

    anchors: list[str]
    logprobs: list[float]
    raw: str
    tokens: int
    parsed_first_try: bool
    attempts: int
    fallback: bool


class GeneratorUnavailable(RuntimeError):
    """The backend cannot answer at all (server down, retries exhausted, refused credentials).

    Unlike malformed output, which is retried and then replaced by the fallback, this says nothing
    about the user: the caller must keep the requests and try again later, never write fallback
    anchors for them (a server outage would otherwise overwrite everyone's anchors with the fallback).
    """


class AnchorGenerator(Protocol):
    model: str
    prompt_hash: str

    def generate(self, prompts: list[AnchorPrompt]) -> list[Generation]:
        """One :class:`Generation` per prompt, in order. Malformed model output never raises."""
        ...


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


def attempt_sampling(settings: AnchorSettings, attempt: int) -> tuple[float, int]:
    """(temperature, seed) of an attempt: as configured first, then warmer with another seed.

    Every backend uses this, so a retry means the same thing whichever model answers.
    """
    if attempt == 0:
        return settings.temperature, settings.seed
    return max(settings.temperature, RETRY_TEMPERATURE), settings.seed + attempt


def prompt_hash(settings: AnchorSettings, backend: str) -> str:
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


# ------------------------------------------------------------------------------------- parse/validate

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.DOTALL)
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_LIST_LINE = re.compile(r"^\s*(?:\d{1,2}\s*[.):-]|[-*•+])\s*(.+?)\s*$")
_PLACEHOLDER = re.compile(r"^(?:interests?|anchors?|items?|topics?|descriptions?)\s*\d*$|^\.+$|^\W*$",
                          re.IGNORECASE)
_KEYS = {"interests", "interest", "anchors", "items", "topics"}


def parse_anchors(raw: str, k: int, history: Sequence[str] = ()) -> list[str]:
    """Interest strings from a model's raw answer, validated; ``[]`` when nothing usable is in it.

    Tried in order, first non-empty result wins: JSON (an object with an ``interests``-like list, or a
    bare array) anywhere in the text after stripping code fences; the complete quoted strings of a
    truncated JSON array; numbered or bulleted lines; short plain lines. ``history`` (the item texts
    the model saw) tells an echo of the worked example from a genuine interest (see clean_anchors).
    """
    text = raw.strip()
    fenced = _FENCE.search(text)
    if fenced:  # the fenced block if it has content, else whatever is around the fence markers
        inside = fenced.group(1).strip()
        text = inside or re.sub(r"```[a-zA-Z0-9_-]*", "", text).strip()
    for candidates in (_from_json(text), _from_quoted(text), _from_lines(text, bulleted=True),
                       _from_lines(text, bulleted=False)):
        anchors = clean_anchors(candidates, k, history)
        if anchors:
            return anchors
    return []


def _from_json(text: str) -> list[str]:
    dec = json.JSONDecoder()
    for start, ch in enumerate(text):
        if ch not in "[{":
            continue
        try:
            obj, _ = dec.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        found = _strings_of(obj)
        if found:
            return found
    return []


def _strings_of(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        lists = [v for key, v in obj.items() if str(key).lower() in _KEYS and isinstance(v, list)]
        lists = lists or [v for v in obj.values() if isinstance(v, list)]
        return _strings_of(lists[0]) if lists else []
    if isinstance(obj, list):
        out: list[str] = []
        for el in obj:
            if isinstance(el, str):
                out.append(el)
            elif isinstance(el, dict):  # [{"interest": "..."}]: take its first string value
                out.extend([v for v in el.values() if isinstance(v, str)][:1])
        return out
    return []


def _from_quoted(text: str) -> list[str]:
    """Complete quoted strings after the first ``[``: what survives of JSON cut at the token budget."""
    bracket = text.find("[")
    if bracket < 0:
        return []
    out = []
    for m in _QUOTED.finditer(text, bracket):
        try:
            out.append(json.loads(f'"{m.group(1)}"'))
        except json.JSONDecodeError:
            out.append(m.group(1))
    return [s for s in out if s.lower() not in _KEYS]


def _from_lines(text: str, *, bulleted: bool) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if bulleted:
        return [m.group(1) for ln in lines if (m := _LIST_LINE.match(ln))]
    if len(lines) < 2:  # one plain sentence is prose, not a list of interests
        return []
    return [ln.strip() for ln in lines if not ln.rstrip().endswith(":")]  # "Here are ...:" is a header


def clean_anchors(candidates: Sequence[str], k: int, history: Sequence[str] = ()) -> list[str]:
    """Normalise, drop empties, placeholders, over-long strings and echoes of the example; dedupe; ≤ k.

    An echo is one of the worked example's answers (as shown for this k) that shares no word with the
    user's history: the model copied the example ("healthy snacks" tacked onto a gamer's list) rather
    than read the user. The same string grounded in the history ("hiking" for hiking boots) stays.
    """
    example = {a.lower() for a in EXAMPLE_ANCHORS[: max(1, min(k, len(EXAMPLE_ANCHORS)))]}  # as shown
    stems = _stems(" ".join(history))
    out: list[str] = []
    seen: set[str] = set()
    for c in candidates:
        s = " ".join(str(c).split()).strip(" \"'`.,;:*-")
        if not s or _PLACEHOLDER.match(s):
            continue
        if len(s) > MAX_ANCHOR_CHARS or len(s.split()) > MAX_ANCHOR_WORDS:
            continue
        key = s.lower()
        if key in seen or (key in example and not _stems(s) & stems):
            continue
        seen.add(key)
        out.append(s)
        if len(out) >= k:
            break
    return out


def _stems(text: str) -> set[str]:
    """Crude stems for the echo check: lower-cased words of 3+ letters cut to 4 ("snacks" ~ "snack")."""
    return {w[:4] for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3}


def fallback_anchors(history: Sequence[str], k: int) -> list[str]:
    """The fallback anchors: the most recent distinct history texts, newest first, cut to anchor length.

    An anchor equal to a liked item's text embeds onto (or next to) that item's own vector, so
    pseudo-labels from a fallback set reduce to "similar to something the user just liked".
    """
    out: list[str] = []
    seen: set[str] = set()
    for text in reversed(history):
        words = text.split()[:MAX_ANCHOR_WORDS]
        s = " ".join(words)[:MAX_ANCHOR_CHARS].strip()
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
        if len(out) >= k:
            break
    return out


def locate(raw: str, anchors: Sequence[str]) -> list[tuple[int, int] | None]:
    """Character span of each anchor in the raw output, searched left to right (case-insensitive last)."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    low = raw.lower()
    for a in anchors:
        i = raw.find(a, cursor)
        if i < 0:
            i = low.find(a.lower())
        if i < 0:
            spans.append(None)
            continue
        spans.append((i, i + len(a)))
        cursor = i + len(a)
    return spans


def span_logprobs(spans: Sequence[tuple[int, int] | None], token_ends: Sequence[int],
                  token_logprobs: Sequence[float], offset: int) -> list[float]:
    """Mean log-prob of the generated tokens overlapping each span (an approximation, on purpose).

    Token boundaries rarely coincide with the anchor's characters (a leading space or quote is often
    inside the first token), so we take every generated token whose character range
    ``[end_{j-1}, end_j)`` (shifted by ``offset``, the length of the pre-filled text) overlaps the
    anchor's span. An anchor we cannot find in the raw text gets the mean over all generated tokens.
    """
    overall = sum(token_logprobs) / len(token_logprobs) if token_logprobs else FALLBACK_LOGPROB
    out = []
    for span in spans:
        if span is None:
            out.append(overall)
            continue
        lo, hi = span
        vals = []
        start = offset
        for end_rel, lp in zip(token_ends, token_logprobs, strict=True):
            end = offset + end_rel
            if start < hi and end > lo:
                vals.append(lp)
            start = end
        out.append(sum(vals) / len(vals) if vals else overall)
    return out


# ------------------------------------------------------------------------------ retry/fallback driver


@dataclass
class Completion:
    """One raw answer of a backend, with what is needed to map anchors back to tokens.

    ``raw`` is the answer as parsed (pre-fill included); its first ``prefix_len`` characters were not
    generated. ``token_logprobs[j]`` is the log-prob of generated token j and ``token_ends[j]`` the
    character offset, within the generated part, where that token's text ends. A backend that knows
    its token count but not the log-probs (a server ignoring ``logprobs``) leaves both lists empty,
    sets ``has_logprobs=False`` and gives the count in ``n_tokens``.
    """

    raw: str
    token_logprobs: list[float]
    token_ends: list[int]
    prefix_len: int = 0
    n_tokens: int | None = None
    has_logprobs: bool = True

    @property
    def tokens(self) -> int:
        return self.n_tokens if self.n_tokens is not None else len(self.token_logprobs)


def anchor_logprobs(comp: Completion, anchors: Sequence[str]) -> list[float]:
    """Per-anchor log-probs of a completion: the one mapping every backend uses (see span_logprobs).

    :data:`NO_LOGPROB` for each anchor when the backend gave no token log-probs.
    """
    if not comp.has_logprobs:
        return [NO_LOGPROB] * len(anchors)
    return span_logprobs(locate(comp.raw, anchors), comp.token_ends, comp.token_logprobs, comp.prefix_len)


def finite_logprob(x: float) -> float:
    """A token log-prob usable in a mean: -inf/NaN (a masked or underflowed token) become -100."""
    return x if math.isfinite(x) else -100.0


def completion_from_tokens(ids: Sequence[int], lps: Sequence[float], decode: Callable[[list[int]], str],
                           stop_ids: set[int] | frozenset[int], prefill: str) -> Completion:
    """A :class:`Completion` from generated token ids and their log-probs (backends with a tokenizer).

    Cuts the row at its first stop token (the stop token still cost a step: counted, covering no
    characters), and gives each text token its character end through *prefix* decodes, not per-token
    decodes: a byte-level BPE token may hold half a UTF-8 character.
    """
    ids = list(ids)
    stop = next((j for j, t in enumerate(ids) if t in stop_ids), None)
    text_ids = ids if stop is None else ids[:stop]
    ends = [len(decode(text_ids[: j + 1])) for j in range(len(text_ids))]
    text = decode(text_ids)
    lp = [finite_logprob(x) for x in lps[: len(text_ids)]]
    if stop is not None and stop < len(lps):
        lp.append(finite_logprob(lps[stop]))
        ends.append(ends[-1] if ends else 0)
    return Completion(prefill + text, lp, ends, len(prefill))


def token_ends(pieces: Sequence[str | bytes]) -> list[int]:
    """Character end of each token given the tokens' texts or bytes (backends without a tokenizer).

    Bytes are preferred when a server sends them: a multi-byte character split over two tokens then
    ends where its last byte is, like the prefix decodes of :func:`completion_from_tokens`.
    """
    ends: list[int] = []
    if pieces and all(isinstance(p, bytes) for p in pieces):
        acc = b""
        for piece in pieces:
            acc += piece  # type: ignore[operator]
            ends.append(len(acc.decode("utf-8", errors="ignore")))
        return ends
    total = 0
    for piece in pieces:
        total += len(piece.decode("utf-8", errors="ignore") if isinstance(piece, bytes) else piece)
        ends.append(total)
    return ends


class RetryingGenerator:
    """The shared ``generate``: ask, parse, re-ask the failures with sampling, fall back, count.

    Subclasses implement :meth:`complete` (one batched model call at a given attempt number, see
    :func:`attempt_sampling`). :meth:`_complete_batched` cuts the prompts into ``batch_size`` chunks;
    a backend that schedules its own batches (an engine, a server) overrides it to send all at once.
    A backend that cannot answer at all raises :class:`GeneratorUnavailable` (never for bad output).
    """

    model: str
    prompt_hash: str

    def __init__(self, settings: AnchorSettings, backend: str) -> None:
        self.settings = settings
        self.prompt_hash = prompt_hash(settings, backend)

    def complete(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        raise NotImplementedError

    def generate(self, prompts: list[AnchorPrompt]) -> list[Generation]:
        """Attempt 0 as configured (greedy by default); only the prompts that failed are asked again."""
        results: list[Generation | None] = [None] * len(prompts)
        tokens = [0] * len(prompts)
        last_raw = [""] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(self.settings.retries + 1):
            if not pending:
                break
            completions = self._complete_batched([prompts[i] for i in pending], attempt)
            still: list[int] = []
            for i, comp in zip(pending, completions, strict=True):
                tokens[i] += comp.tokens
                last_raw[i] = comp.raw
                anchors = parse_anchors(comp.raw, prompts[i].k, prompts[i].history)
                if not anchors:
                    ANCHOR_PARSE_FAILURES.labels(model=self.model).inc()
                    still.append(i)
                    continue
                results[i] = Generation(anchors, anchor_logprobs(comp, anchors), comp.raw, tokens[i],
                                        attempt == 0, attempt + 1, False)
            pending = still
        for i in pending:
            anchors = fallback_anchors(prompts[i].history, prompts[i].k)
            log.warning("anchors for %s unparseable after %d attempts; fallback to history texts: %r",
                        prompts[i].user_id, self.settings.retries + 1, last_raw[i][:200])
            results[i] = Generation(anchors, [FALLBACK_LOGPROB] * len(anchors), last_raw[i], tokens[i],
                                    False, self.settings.retries + 1, True)
        out = [r for r in results if r is not None]
        for g in out:
            outcome = "fallback" if g.fallback else ("parsed" if g.parsed_first_try else "retried")
            ANCHOR_GENERATIONS.labels(model=self.model, outcome=outcome).inc()
        ANCHOR_TOKENS.labels(model=self.model).inc(sum(tokens))
        return out

    def _complete_batched(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        size = self.settings.batch_size
        out: list[Completion] = []
        for s in range(0, len(prompts), size):
            out.extend(self.complete(prompts[s : s + size], attempt))
        return out


# ----------------------------------------------------------------------------------- transformers


class WordRepetitionPenalty:
    """Logits processor: make tokens with letters or digits that this answer already used less likely.

    transformers' own repetition penalty also counts the prompt (whose item titles are exactly what
    an anchor may reuse) and punctuation (which JSON must repeat); this one looks only at tokens
    generated after ``start`` and only at ``word_mask`` tokens. Same rule as the usual penalty:
    positive logits are divided by ``penalty``, negative ones multiplied.
    """

    def __init__(self, word_mask: Any, start: int, penalty: float) -> None:
        self.word_mask = word_mask  # bool tensor (vocab,)
        self.start = start
        self.penalty = penalty

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.start :]
        if generated.shape[1] == 0 or self.penalty == 1.0:
            return scores
        used = torch.zeros_like(scores, dtype=torch.bool)
        used.scatter_(1, generated, True)
        used &= self.word_mask[: scores.shape[1]]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(used, penalised, scores)


class TransformersGenerator(RetryingGenerator):
    """Hugging Face transformers, batched, greedy by default; CPU unless ``device`` says otherwise.

    Batches are padded on the LEFT: a decoder-only model continues from the last position, so every
    row's prompt must end at the same index. Log-probs come from the *raw* logits
    (``output_logits=True``) through a log-softmax, not from the processed scores: a sampled retry
    warps the scores by its temperature, and we want the model's own probability of the text in both
    cases.

    ``threads`` sets torch's intra-op thread count for the process (None leaves it alone). On small
    shared CPUs one thread is often faster for a 135M model: OpenMP workers spin-wait on a core that
    another process holds.
    """

    def __init__(self, model_dir: Path | str, settings: AnchorSettings, *, device: str = "cpu",
                 threads: int | None = None) -> None:
        super().__init__(settings, "transformers")
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = settings.model_name
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        auto_lm: Any = AutoModelForCausalLM  # its stubs type from_pretrained oddly; the call is standard
        self.lm: Any = auto_lm.from_pretrained(str(model_dir))
        self.lm.to(device)
        self.lm.eval()
        eos = self.lm.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._stop_ids = {int(e) for e in [*eos_ids, self.tokenizer.eos_token_id] if e is not None}
        self._word_mask = self._word_tokens(int(self.lm.config.vocab_size))

    def _word_tokens(self, vocab_size: int) -> Any:
        """Bool mask over the vocabulary: tokens whose text holds a letter or digit (0.1 s, once)."""
        torch = self._torch
        mask = torch.zeros(max(vocab_size, len(self.tokenizer)), dtype=torch.bool)
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        for i, piece in enumerate(pieces):
            if piece and any(ch.isalnum() for ch in self.tokenizer.convert_tokens_to_string([piece])):
                mask[i] = True
        return mask.to(self.device)

    def render(self, prompt: AnchorPrompt) -> str:
        """The exact text fed to the model: chat template with the generation prompt, then the pre-fill."""
        return render_chat(self.tokenizer, prompt)

    def complete(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        torch = self._torch
        enc = self.tokenizer([self.render(p) for p in prompts], return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        budget = generation_budget(max(p.k for p in prompts), self.settings.max_new_tokens)
        temperature, seed = attempt_sampling(self.settings, attempt)
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "return_dict_in_generate": True,
                                  "output_logits": True, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs |= {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 50}
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(
            [WordRepetitionPenalty(self._word_mask, enc["input_ids"].shape[1], WORD_REPETITION_PENALTY)]
        )
        # fork_rng: the attempt's seed must not disturb (or depend on) anyone else's use of the global RNG
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.lm.generate(**enc, **kwargs)
        gen = out.sequences[:, enc["input_ids"].shape[1]:]
        steps = len(out.logits)
        logprobs = torch.zeros(gen.shape[0], steps)
        for t in range(steps):  # one step at a time: never a (batch, steps, vocab) tensor
            lsm = torch.log_softmax(out.logits[t].float(), dim=-1)
            logprobs[:, t] = lsm.gather(1, gen[:, t : t + 1]).squeeze(1).cpu()
        return [self._completion(gen[r].tolist(), logprobs[r].tolist()) for r in range(gen.shape[0])]

    def _completion(self, ids: list[int], lps: list[float]) -> Completion:
        return completion_from_tokens(ids, lps, self._decode, self._stop_ids, PREFILL)

    def _decode(self, ids: list[int]) -> str:
        # no clean-up: it is meant for WordPiece and would move characters of a byte-level BPE text
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


# --------------------------------------------------------------------------------------- in memory

_STOP = frozenset({"a", "an", "and", "the", "of", "for", "with", "in", "on", "to", "by", "from", "at", "or",
                   "is", "are", "new", "set", "pack", "x"})
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]+")


class MemoryGenerator(RetryingGenerator):
    """Deterministic pure-Python twin for tests: anchors are the history's most salient words.

    Words are ranked by frequency over the history, ties by recency; each anchor is one such word.
    The raw answer is the JSON a well-behaved LLM would write, so it goes through the same parser,
    retry and fallback code as a real backend. ``script(prompt, attempt) -> raw`` replaces the answer
    to drive the malformed-output paths in tests.
    """

    def __init__(self, settings: AnchorSettings | None = None, *,
                 script: Callable[[AnchorPrompt, int], str] | None = None, model: str = "memory") -> None:
        super().__init__(settings or AnchorSettings(backend="memory"), "memory")
        self.model = model
        self.script = script
        self.calls = 0

    def complete(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        self.calls += 1
        out = []
        for p in prompts:
            raw = self.script(p, attempt) if self.script else self._answer(p)
            prefix = len(PREFILL) if raw.startswith(PREFILL) else 0
            # "tokens" are whitespace-delimited pieces with a deterministic pseudo log-prob in (-1.05, -0.05]
            ends: list[int] = []
            lps: list[float] = []
            for m in re.finditer(r"\S+\s*", raw[prefix:]):
                ends.append(m.end())
                lps.append(-(0.05 + hashlib.blake2b(m.group().encode(), digest_size=1).digest()[0] / 255.0))
            out.append(Completion(raw, lps, ends, prefix))
        return out

    @staticmethod
    def _answer(p: AnchorPrompt) -> str:
        counts: Counter[str] = Counter()
        last_seen: dict[str, int] = {}
        for pos, text in enumerate(p.history):
            for w in _WORD.findall(text.lower()):
                if w in _STOP:
                    continue
                counts[w] += 1
                last_seen[w] = pos
        ranked = sorted(counts, key=lambda w: (-counts[w], -last_seen[w], w))
        return json.dumps({"interests": ranked[: p.k]})


# ----------------------------------------------------------------------------------------- factory


def make_generator(settings: Settings, *, threads: int | None = None) -> AnchorGenerator:
    """The generator ``settings.anchors.backend`` names.

    ``transformers`` fetches/converts the local model first; ``vllm`` does too unless
    ``anchors.model_dir`` names the model (a directory or a hub id the GPU host can read); ``openai``
    needs ``anchors.base_url``. ``threads`` (else ``anchors.threads``; 0 = torch's default) applies to
    the transformers backend.
    """
    cfg = settings.anchors
    backend = cfg.backend
    if backend == "memory":
        return MemoryGenerator(cfg)
    if backend == "transformers":
        from gpl.llm import ensure_llm

        n = threads if threads is not None else (cfg.threads or None)
        return TransformersGenerator(ensure_llm(settings.llm_dir), cfg, threads=n)
    if backend == "openai":
        from workers.generators_openai import OpenAIGenerator

        return OpenAIGenerator(cfg)
    if backend == "vllm":
        from workers.generators_vllm import VLLMGenerator, import_vllm

        import_vllm()  # fail with the install hint before fetching a model the engine cannot run
        if cfg.model_dir:
            return VLLMGenerator(cfg.model_dir, cfg)
        from gpl.llm import ensure_llm

        return VLLMGenerator(ensure_llm(settings.llm_dir), cfg)
    raise ValueError(f"unknown anchors backend {backend!r}")
