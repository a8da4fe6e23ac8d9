"""Per-anchor log-probs from a raw completion.

An approximation, documented in :func:`span_logprobs`: the mean log-prob of the generated tokens whose
characters overlap the anchor's text in the raw output. Backends with token ids use
:func:`completion_from_tokens`, those with token texts :func:`token_ends`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.anchors.generators.prompt import FALLBACK_LOGPROB, NO_LOGPROB

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


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
