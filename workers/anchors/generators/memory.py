"""A deterministic pure-Python generator (keywords of the history): the in-memory twin for tests and replays.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from runtime.anchor_settings import MemoryAnchors, TextAnchors
from workers.anchors.generators.base import AnchorPrompt
from workers.anchors.generators.logprobs import Completion
from workers.anchors.generators.prompt import PREFILL
from workers.anchors.generators.retrying import RetryingGenerator

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

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

    def __init__(self, settings: TextAnchors | None = None, *,
                 script: Callable[[AnchorPrompt, int], str] | None = None, model: str = "memory") -> None:
        super().__init__(settings or MemoryAnchors(), "memory")
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
