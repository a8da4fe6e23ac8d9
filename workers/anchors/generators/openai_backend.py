"""Anchors from any OpenAI-compatible chat server: ``vllm serve`` (compose/deploy), ``transformers serve``.

Only the transport lives here; prompt, parser, retry-on-parse-failure, fallback, log-prob mapping and prompt
hash are the shared ones of :mod:`workers.anchors.generators` (this class is a
:class:`~workers.anchors.generators.retrying.RetryingGenerator` whose :meth:`complete` is one HTTP request per
prompt).

Why each piece:

* **One request per prompt, many in flight.** A serving engine batches concurrent requests itself
  (continuous batching, prefix caching of our long shared system + worked-example prefix), so the
  client's job is to keep ``concurrency`` requests in flight, bounded by a semaphore so one large
  micro-batch cannot flood the server.
* **Structured output.** ``response_format = json_schema`` of ``{"interests": [k strings]}`` (see
  :func:`~workers.anchors.generators.prompt.anchor_schema`): a grammar-constrained decoder cannot write prose or a
  broken array, which is what a small model does most. There is no pre-fill on this path (the chat
  API has no portable way to continue an assistant turn, and a schema-constrained answer must start
  at ``{``). A server that *refuses* the field (HTTP 400/422) is asked again without it, and the
  generator remembers that for its lifetime (``structured`` goes False and ``prompt_hash`` changes
  with it, so lineage says how the anchors were made). A server that silently ignores it
  (``transformers serve`` 5.x does) is indistinguishable from one that honours it; the tolerant
  parser covers both.
* **Log-probs.** ``logprobs: true`` asks for each generated token's log-prob; they map to anchors with
  the same span rule as the in-process backends (:func:`~workers.anchors.generators.logprobs.anchor_logprobs`). A
  server that returns none (``transformers serve`` ignores the field) gives every anchor
  :data:`~workers.anchors.generators.prompt.NO_LOGPROB` (0.0, which the labeler reads as "unknown": its generation
  confidence term becomes 1, i.e. neutral) and the token count comes from ``usage``.
* **Transport failures are not model failures.** 429, 5xx, 408/409/425, timeouts and connection errors
  are re-sent up to ``http_retries`` times with exponential backoff and jitter (``Retry-After`` is
  honoured when larger); when they are exhausted, or the server refuses our credentials or URL
  (401/403/404), :class:`~workers.anchors.generators.base.GeneratorUnavailable` is raised so the worker keeps the
  requests for later instead of writing fallback anchors for everyone during an outage. A 400/413/422
  that survives the feature fallbacks is about this one prompt: it counts as an unparseable attempt
  (retried with sampling, then the documented fallback).

The class exposes a synchronous ``generate`` (what the worker calls) and drives its coroutines on a
private event loop, so one ``httpx.AsyncClient`` and its connection pool live across calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx

from runtime.anchor_settings import OpenAIAnchors
from runtime.redact import mask_url
from workers.anchors.generators.base import AnchorPrompt, GeneratorUnavailable
from workers.anchors.generators.logprobs import Completion, finite_logprob, token_ends
from workers.anchors.generators.prompt import (
    PRESENCE_PENALTY,
    anchor_schema,
    attempt_sampling,
    build_messages,
    generation_budget,
    prompt_hash,
)
from workers.anchors.generators.retrying import RetryingGenerator

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404, 405})
BAD_REQUEST_STATUS = frozenset({400, 413, 422})
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before re-send number ``retry`` (0-based): "equal jitter" exponential backoff.

    Half of ``min(cap, base * 2**retry)`` is fixed and half is uniform, so clients that failed together
    spread out instead of retrying in lockstep, yet none re-sends immediately. A server's
    ``Retry-After`` wins when it asks for longer (capped, so a bogus header cannot stall a worker).
    """
    window = min(cap, base * (2 ** retry))
    delay = window / 2 + rng.uniform(0, window / 2)
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, cap)
    return delay


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: rare from model servers; fall back to our own backoff
        return None


class OpenAIGenerator(RetryingGenerator):
    """Anchors from ``POST {base_url}/chat/completions`` (see the module docstring for the policy).

    ``transport`` (an ``httpx`` transport), ``sleep`` and ``rng`` are injection points for tests of the
    retry logic; production uses the defaults. ``stats`` counts requests, re-sends and fallbacks of the
    request shape since construction.
    """

    settings: OpenAIAnchors  # the server's options (concurrency, timeouts, re-sends) besides the shared ones

    def __init__(self, settings: OpenAIAnchors, *, base_url: str | None = None, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None, rng: random.Random | None = None,
                 backoff_base_s: float = BACKOFF_BASE_S, backoff_cap_s: float = BACKOFF_CAP_S) -> None:
        super().__init__(settings, "openai+json_schema")
        url = (base_url if base_url is not None else settings.base_url).rstrip("/")
        if not url:
            raise ValueError("anchors backend 'openai' needs anchors.base_url (GPL_ANCHORS__BASE_URL), "
                             "e.g. http://vllm:8000/v1")
        self.base_url = url
        self.shown_url = mask_url(url)  # for logs and errors: no credentials from the URL
        self.model = settings.model_name
        self.structured = True
        self.want_logprobs = True
        self.served_model: str | None = settings.served_model or None
        self._api_key = api_key if api_key is not None else settings.api_key.get_secret_value()
        self._transport = transport
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random(settings.seed)
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._loop: asyncio.AbstractEventLoop | None = None  # made on first use, not by unused instances
        self._client: httpx.AsyncClient | None = None
        self.stats = {"requests": 0, "resends": 0, "shape_fallbacks": 0, "bad_requests": 0}

    # ----------------------------------------------------------------------------- sync surface

    def complete(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        return self._run(self._complete_all(prompts, attempt))

    def _complete_batched(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        """All prompts at once: the semaphore, not ``batch_size``, bounds what is in flight."""
        return self.complete(prompts, attempt) if prompts else []

    def close(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        if self._client is not None:
            self._loop.run_until_complete(self._client.aclose())
            self._client = None
        self._loop.close()

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                self._client = None  # a client belongs to the loop it was used in
            return self._loop.run_until_complete(coro)
        coro.close()
        raise RuntimeError("OpenAIGenerator.generate is synchronous; call it from a thread without a "
                           "running event loop (e.g. asyncio.to_thread)")

    # ---------------------------------------------------------------------------------- async core

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            limits = httpx.Limits(max_connections=self.settings.concurrency,
                                  max_keepalive_connections=self.settings.concurrency)
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                             transport=self._transport, limits=limits,
                                             timeout=httpx.Timeout(self.settings.timeout_s))
        return self._client

    async def _complete_all(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        client = self._http()
        if self.served_model is None:
            self.served_model = await self._discover_model(client)
        sem = asyncio.Semaphore(self.settings.concurrency)

        async def one(p: AnchorPrompt) -> Completion:
            async with sem:
                return await self._complete_one(client, p, attempt)

        try:
            async with asyncio.TaskGroup() as tg:  # one failure cancels the rest: the batch is redone
                tasks = [tg.create_task(one(p)) for p in prompts]
        except* GeneratorUnavailable as eg:
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _discover_model(self, client: httpx.AsyncClient) -> str:
        """The model id to send: ``model_name`` if the server lists it, else the only one it serves.

        ``vllm serve /models/x`` serves "/models/x" unless given ``--served-model-name``; asking once
        saves a configuration step. Any failure (``transformers serve`` answers 500 offline) falls back
        to ``model_name``; set ``anchors.served_model`` to skip the question.
        """
        try:
            resp = await client.get("/models", timeout=min(10.0, self.settings.timeout_s))
            ids = [str(m["id"]) for m in resp.json().get("data", [])] if resp.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            ids = []
        if self.settings.model_name in ids or len(ids) != 1:
            return self.settings.model_name
        log.info("server at %s serves %r; using it for %s", self.shown_url, ids[0], self.settings.model_name)
        return ids[0]

    def body(self, prompt: AnchorPrompt, attempt: int, *, structured: bool, logprobs: bool) -> dict[str, Any]:
        """The chat-completions request of one prompt (public: tests and the docs show it)."""
        temperature, seed = attempt_sampling(self.settings, attempt)
        body: dict[str, Any] = {
            "model": self.served_model or self.settings.model_name,
            "messages": build_messages(prompt),
            "max_tokens": generation_budget(prompt.k, self.settings.max_new_tokens),
            "temperature": temperature,
            "seed": seed,
            "presence_penalty": PRESENCE_PENALTY,
        }
        if temperature > 0:
            body["top_p"] = 0.95
        if logprobs:
            body["logprobs"] = True
        if structured:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "interests", "schema": anchor_schema(prompt.k), "strict": True},
            }
        return body

    async def _complete_one(self, client: httpx.AsyncClient, prompt: AnchorPrompt,
                            attempt: int) -> Completion:
        """Ask with the richest request shape the server has not refused yet; step down on 400/422."""
        shapes = [(self.structured, self.want_logprobs)]
        if self.structured:
            shapes.append((False, self.want_logprobs))
        if self.want_logprobs:
            shapes += [(self.structured, False), (False, False)]
        tried: list[tuple[bool, bool]] = []
        last: httpx.Response | None = None
        for structured, logprobs in shapes:
            if (structured, logprobs) in tried:
                continue
            tried.append((structured, logprobs))
            body = self.body(prompt, attempt, structured=structured, logprobs=logprobs)
            resp = await self._post(client, body)
            if resp.status_code == 200:
                self._adopt_shape(structured, logprobs, resp)
                return self._completion(resp)
            last = resp
        assert last is not None
        self.stats["bad_requests"] += 1
        log.warning("server refused the request for %s (%d): %s; counted as an unusable answer",
                    prompt.user_id, last.status_code, last.text[:300])
        return Completion("", [], [], n_tokens=0, has_logprobs=False)

    def _adopt_shape(self, structured: bool, logprobs: bool, resp: httpx.Response) -> None:
        """Remember that the server refused a feature, once, and say so in the prompt hash and the log."""
        if self.structured and not structured:
            self.structured = False
            self.stats["shape_fallbacks"] += 1
            self.prompt_hash = prompt_hash(self.settings, "openai")
            log.warning("%s refuses response_format=json_schema; plain prompting from now on", self.shown_url)
        if self.want_logprobs and not logprobs:
            self.want_logprobs = False
            self.stats["shape_fallbacks"] += 1
            log.warning("%s refuses logprobs; anchors get logprob %.1f (unknown)", self.shown_url, 0.0)

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
        """POST with re-sends on transient failures; the final non-transient response is returned.

        Raises GeneratorUnavailable when re-sends are exhausted or the server refuses us as a whole.
        """
        base, cap = self._backoff
        retries = self.settings.http_retries
        for n in range(retries + 1):
            self.stats["requests"] += 1
            retry_after: float | None = None
            try:
                resp = await client.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code in FATAL_STATUS:
                    raise GeneratorUnavailable(
                        f"{self.shown_url} answered {resp.status_code}: {resp.text[:300]}")
                if resp.status_code not in RETRY_STATUS:
                    return resp
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                retry_after = _retry_after(resp)
            if n == retries:
                raise GeneratorUnavailable(f"{self.shown_url} failed {retries + 1} times; last: {problem}")
            delay = backoff_delay(n, base, cap, self._rng, retry_after)
            self.stats["resends"] += 1
            log.info("re-sending to %s in %.2fs after %s", self.shown_url, delay, problem)
            await self._sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _completion(resp: httpx.Response) -> Completion:
        """The answer text and, when present, per-token log-probs and character ends."""
        try:
            data = resp.json()
            choice = data["choices"][0]
            raw = str((choice.get("message") or {}).get("content") or "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Completion(resp.text[:2000], [], [], n_tokens=0, has_logprobs=False)
        usage = data.get("usage") or {}
        n_usage = usage.get("completion_tokens") if isinstance(usage, dict) else None
        lp_obj = choice.get("logprobs")
        content = lp_obj.get("content") if isinstance(lp_obj, dict) else None
        if content:
            lps = [finite_logprob(float(t.get("logprob", -100.0))) for t in content]
            pieces: list[str | bytes] = [
                bytes(t["bytes"]) if isinstance(t.get("bytes"), list) else str(t.get("token", ""))
                for t in content
            ]
            return Completion(raw, lps, token_ends(pieces), 0,
                              n_tokens=int(n_usage) if isinstance(n_usage, int) else None)
        return Completion(raw, [], [], 0, n_tokens=int(n_usage) if isinstance(n_usage, int) else 0,
                          has_logprobs=False)
