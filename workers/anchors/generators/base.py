"""The anchor generator seam: prompts in, :class:`Generation` out, never an exception for malformed model output.

The anchors worker sees only :class:`AnchorGenerator`. Backends (transformers, OpenAI-compatible HTTP, vLLM,
in-memory) live in sibling modules so that their optional dependencies are imported only when chosen;
the factory that picks one from the settings is the application's (``gpl/backends.py``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    pass

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
