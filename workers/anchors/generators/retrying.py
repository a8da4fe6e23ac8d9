"""The shared generation driver every backend derives from: ask, parse, re-ask, fall back, count.

A backend only implements :meth:`RetryingGenerator.complete`; an unparseable answer is asked again with
sampling (another seed, a warmer temperature) up to ``TextAnchors.retries`` times, then replaced by
the counted fallback (``fallback=True``, log-prob :data:`FALLBACK_LOGPROB`).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from runtime.anchor_settings import TextAnchors
from workers.anchors.generators.base import AnchorPrompt, Generation
from workers.anchors.generators.logprobs import Completion, anchor_logprobs
from workers.anchors.generators.parsing import fallback_anchors, parse_anchors
from workers.anchors.generators.prompt import FALLBACK_LOGPROB, prompt_hash
from workers.anchors.metrics import ANCHOR_GENERATIONS, ANCHOR_PARSE_FAILURES, ANCHOR_TOKENS

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class RetryingGenerator:
    """The shared ``generate``: ask, parse, re-ask the failures with sampling, fall back, count.

    Subclasses implement :meth:`complete` (one batched model call at a given attempt number, see
    :func:`attempt_sampling`). :meth:`_complete_batched` cuts the prompts into ``batch_size`` chunks;
    a backend that schedules its own batches (an engine, a server) overrides it to send all at once.
    A backend that cannot answer at all raises :class:`GeneratorUnavailable` (never for bad output).
    """

    model: str
    prompt_hash: str

    def __init__(self, settings: TextAnchors, backend: str) -> None:
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
