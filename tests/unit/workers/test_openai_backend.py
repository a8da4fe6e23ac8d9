"""The OpenAI-compatible backend: retry/backoff/fallback logic against a local stub, and for real
against ``transformers serve`` with the local SmolLM2 directory (marked ``llm``).

The stub is a real HTTP server on loopback (stdlib ``http.server``) whose answers the test scripts:
the client's transport, timeouts and connection handling are the real ones, only the model is not.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gpl.bench.anchor_backends import TransformersServe, transformers_serve_cmd
from runtime.anchor_settings import OpenAIAnchors
from workers.anchors.generators.base import AnchorPrompt, GeneratorUnavailable
from workers.anchors.generators.openai_backend import OpenAIGenerator, backoff_delay
from workers.anchors.generators.prompt import NO_LOGPROB, anchor_schema, prompt_hash

REPO = Path(__file__).resolve().parents[3]
Reply = tuple[int, dict[str, Any] | str, dict[str, str]]  # status, JSON body (or text), headers


def chat_reply(content: str, tokens: list[str] | None = None, lp: float = -0.25) -> dict[str, Any]:
    """A chat.completion body; with ``tokens``, per-token log-probs in the OpenAI format."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}
    if tokens is not None:
        assert "".join(tokens) == content
        choice["logprobs"] = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                           "top_logprobs": []} for t in tokens]}
    return {"id": "x", "object": "chat.completion", "choices": [choice],
            "usage": {"completion_tokens": len(tokens) if tokens else 7, "prompt_tokens": 100}}


class Stub:
    """A scripted OpenAI-compatible server: ``script(body, n) -> Reply`` answers the n-th POST."""

    def __init__(self, script: Callable[[dict[str, Any], int], Reply],
                 delay: Callable[[int], float] | None = None, models: list[str] | None = None) -> None:
        self.script = script
        self.delay = delay or (lambda n: 0.0)
        self.models = models
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                if stub.models is None:
                    self._send(500, "Internal Server Error", {})
                else:
                    self._send(200, {"object": "list", "data": [{"id": m} for m in stub.models]}, {})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    n = len(stub.bodies)
                    stub.bodies.append(body)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    time.sleep(stub.delay(n))
                    status, payload, headers = stub.script(body, n)
                    self._send(status, payload, headers)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _send(self, status: int, payload: dict[str, Any] | str, headers: dict[str, str]) -> None:
                data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
                self.send_response(status)
                kind = "application/json" if isinstance(payload, dict) else "text/plain"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stubs() -> Iterator[list[Stub]]:
    made: list[Stub] = []
    yield made
    for s in made:
        s.close()


def make(stubs: list[Stub], script: Callable[[dict[str, Any], int], Reply], *,
         settings: OpenAIAnchors | None = None, delay: Callable[[int], float] | None = None,
         models: list[str] | None = None) -> tuple[Stub, OpenAIGenerator, list[float]]:
    """A stub and a generator wired to it; the generator's backoff sleeps are recorded, not slept."""
    stub = Stub(script, delay, models)
    stubs.append(stub)
    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)

    cfg = settings or OpenAIAnchors(retries=0, http_retries=3, served_model="m")
    gen = OpenAIGenerator(cfg, base_url=stub.url, sleep=fake_sleep, rng=random.Random(0))
    return stub, gen, slept


PROMPT = AnchorPrompt("runner", ["Trail running shoes", "GPS running watch"], 2)
GOOD = '{"interests": ["trail running", "gps watches"]}'
GOOD_TOKENS = ['{"', 'interests', '":', ' ["', 'trail', ' running', '",', ' "', 'gps', ' watches', '"]}']


# ----------------------------------------------------------------------------------- pure helpers

def test_backoff_is_exponential_jittered_and_capped() -> None:
    rng = random.Random(1)
    for retry in range(8):
        window = min(4.0, 0.5 * 2 ** retry)
        for _ in range(50):
            d = backoff_delay(retry, 0.5, 4.0, rng)
            assert window / 2 <= d <= window
    assert backoff_delay(0, 0.5, 4.0, rng, retry_after=3.0) == 3.0  # the server asked for longer
    assert backoff_delay(0, 0.5, 4.0, rng, retry_after=60.0) == 4.0  # ... but never beyond the cap
    assert backoff_delay(3, 0.5, 4.0, rng, retry_after=0.0) >= 2.0  # a shorter ask does not shorten it


def test_request_body_has_schema_logprobs_and_budget() -> None:
    gen = OpenAIGenerator(OpenAIAnchors(served_model="srv"), base_url="http://127.0.0.1:9/v1")
    body = gen.body(AnchorPrompt("u", ["a"], 3), 0, structured=True, logprobs=True)
    assert body["model"] == "srv" and body["logprobs"] is True and body["temperature"] == 0.0
    assert body["response_format"]["json_schema"]["schema"] == anchor_schema(3)
    assert anchor_schema(3)["properties"]["interests"]["minItems"] == 3
    assert body["max_tokens"] == 46 and body["messages"][-1]["role"] == "user"
    retry = gen.body(AnchorPrompt("u", ["a"], 3), 1, structured=False, logprobs=False)
    assert "response_format" not in retry and "logprobs" not in retry
    assert retry["temperature"] > 0 and retry["seed"] == 1  # a retry samples, with another seed
    gen.close()


def test_missing_base_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="base_url"):
        OpenAIGenerator(OpenAIAnchors())


# --------------------------------------------------------------------------- against a local stub

def test_429_then_success_with_backoff_and_logprobs(stubs: list[Stub]) -> None:
    def script(body: dict[str, Any], n: int) -> Reply:
        if n < 2:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}
        return 200, chat_reply(GOOD, GOOD_TOKENS, lp=-0.5), {}

    stub, gen, slept = make(stubs, script)
    (g,) = gen.generate([PROMPT])
    assert g.anchors == ["trail running", "gps watches"] and g.parsed_first_try and not g.fallback
    assert g.logprobs == [pytest.approx(-0.5), pytest.approx(-0.5)]  # mapped through the token spans
    assert g.tokens == len(GOOD_TOKENS)
    assert len(stub.bodies) == 3 and gen.stats["resends"] == 2
    assert len(slept) == 2 and 0.25 <= slept[0] <= 0.5 and 0.5 <= slept[1] <= 1.0  # exponential, jittered
    assert stub.bodies[0]["response_format"]["type"] == "json_schema"
    gen.close()


def test_exhausted_retries_raise_unavailable_never_fallback(stubs: list[Stub]) -> None:
    stub, gen, slept = make(stubs, lambda body, n: (503, "overloaded", {}))
    before = REGISTRY.get_sample_value("gpl_anchor_generations_total",
                                       {"model": gen.model, "outcome": "fallback"}) or 0.0
    with pytest.raises(GeneratorUnavailable, match="failed 4 times"):
        gen.generate([PROMPT])
    assert len(stub.bodies) == 4 and len(slept) == 3
    after = REGISTRY.get_sample_value("gpl_anchor_generations_total",
                                      {"model": gen.model, "outcome": "fallback"}) or 0.0
    assert after == before  # an outage writes no fallback anchors
    gen.close()


def test_auth_failure_is_unavailable_at_once(stubs: list[Stub]) -> None:
    stub, gen, slept = make(stubs, lambda body, n: (401, {"error": "bad key"}, {}))
    with pytest.raises(GeneratorUnavailable, match="401"):
        gen.generate([PROMPT])
    assert len(stub.bodies) == 1 and slept == []
    gen.close()


def test_timeout_is_retried(stubs: list[Stub]) -> None:
    cfg = OpenAIAnchors(retries=0, http_retries=2, timeout_s=0.3, served_model="m")
    stub, gen, slept = make(stubs, lambda body, n: (200, chat_reply(GOOD), {}), settings=cfg,
                            delay=lambda n: 1.0 if n == 0 else 0.0)
    (g,) = gen.generate([PROMPT])
    assert g.anchors == ["trail running", "gps watches"]
    assert gen.stats["resends"] == 1 and len(slept) == 1
    gen.close()


def test_server_refusing_response_format_falls_back_to_plain_prompting(stubs: list[Stub]) -> None:
    def script(body: dict[str, Any], n: int) -> Reply:
        if "response_format" in body:
            return 400, {"error": {"message": "response_format is not supported"}}, {}
        return 200, chat_reply("Sure! ```json\n" + GOOD + "\n```"), {}  # no logprobs either

    stub, gen, _ = make(stubs, script)
    hash_structured = gen.prompt_hash
    gens = gen.generate([PROMPT, AnchorPrompt("other", ["Cast iron skillet"], 2)])
    assert all(g.anchors for g in gens) and not any(g.fallback for g in gens)
    assert not gen.structured and gen.stats["shape_fallbacks"] == 1
    assert gen.prompt_hash != hash_structured and gen.prompt_hash == prompt_hash(gen.settings, "openai")
    assert gens[0].logprobs == [NO_LOGPROB, NO_LOGPROB]  # the server gave none: "unknown", not invented
    assert gens[0].tokens == 7  # from usage
    n = len(stub.bodies)
    gen.generate([PROMPT])  # remembered: no structured request any more
    assert len(stub.bodies) == n + 1 and "response_format" not in stub.bodies[-1]
    gen.close()


def test_bad_request_for_one_prompt_is_an_unusable_answer(stubs: list[Stub]) -> None:
    cfg = OpenAIAnchors(retries=1, served_model="m")

    def script(body: dict[str, Any], n: int) -> Reply:
        if "Huge" in body["messages"][-1]["content"]:
            return 400, {"error": "context length exceeded"}, {}
        return 200, chat_reply(GOOD), {}

    stub, gen, _ = make(stubs, script, settings=cfg)
    big = AnchorPrompt("big", ["Huge item text"], 2)
    good, bad = gen.generate([PROMPT, big])
    assert not good.fallback
    assert bad.fallback and bad.anchors == ["Huge item text"] and bad.attempts == 2
    assert gen.structured  # other prompts succeed with the schema: the feature was not the problem
    gen.close()


def test_concurrency_is_bounded(stubs: list[Stub]) -> None:
    cfg = OpenAIAnchors(retries=0, concurrency=2, served_model="m")
    stub, gen, _ = make(stubs, lambda body, n: (200, chat_reply(GOOD), {}), settings=cfg, delay=lambda n: 0.1)
    t0 = time.monotonic()
    gens = gen.generate([AnchorPrompt(f"u{i}", ["Trail running shoes"], 2) for i in range(6)])
    assert len(gens) == 6 and stub.max_in_flight == 2
    assert time.monotonic() - t0 >= 0.3  # 6 requests, 2 at a time, 0.1 s each
    gen.close()


def test_model_is_discovered_when_not_configured(stubs: list[Stub]) -> None:
    cfg = OpenAIAnchors(retries=0)
    stub, gen, _ = make(stubs, lambda body, n: (200, chat_reply(GOOD), {}), settings=cfg,
                        models=["/models/smollm2"])
    gen.generate([PROMPT])
    assert stub.bodies[0]["model"] == "/models/smollm2"
    gen.close()
    stub2, gen2, _ = make(stubs, lambda body, n: (200, chat_reply(GOOD), {}), settings=cfg, models=None)
    gen2.generate([PROMPT])
    assert stub2.bodies[0]["model"] == cfg.model_name  # /models failed: the configured name
    gen2.close()


# -------------------------------------------------------------------- for real: transformers serve

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TransformersServe, Path]]:
    if transformers_serve_cmd() is None:
        pytest.skip("transformers serve needs fastapi, uvicorn and openai "
                    "(pip install 'transformers[serving]')")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from runtime.model_assets import ensure_llm

    model_dir = ensure_llm(Path(os.environ.get("GPL_TEST_MODEL_DIR",
                                                REPO / ".gpl" / "models" / "smollm2-135m-instruct")))
    server = TransformersServe(model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield server, model_dir
    finally:
        server.stop()


@pytest.mark.llm
def test_openai_generator_against_transformers_serve(served: tuple[TransformersServe, Path]) -> None:
    server, model_dir = served
    k = 3
    # transformers serve is pinned to the directory it loaded: the request's model must name it
    cfg = OpenAIAnchors(base_url=server.url, served_model=str(model_dir), k=k,
                         max_new_tokens=40, retries=1, concurrency=2, timeout_s=120)
    prompts = [
        AnchorPrompt("runner", ["Nike running shoes men lightweight", "Garmin GPS running watch",
                                "Compression socks for marathon"], k),
        AnchorPrompt("reader", ["Harry Potter hardcover box set", "Lord of the Rings illustrated edition",
                                "Dragon fantasy novel paperback"], k),
    ]
    with OpenAIGenerator(cfg) as gen:
        before = REGISTRY.get_sample_value("gpl_anchor_generations_total",
                                           {"model": gen.model, "outcome": "fallback"}) or 0.0
        out = gen.generate(prompts)
        after = REGISTRY.get_sample_value("gpl_anchor_generations_total",
                                          {"model": gen.model, "outcome": "fallback"}) or 0.0
    assert len(out) == 2
    for g in out:
        assert 1 <= len(g.anchors) <= k and len(g.logprobs) == len(g.anchors)
        assert all(math.isfinite(lp) for lp in g.logprobs)
        assert g.tokens > 0  # from the server's usage
        if not g.fallback:
            assert g.logprobs == [NO_LOGPROB] * len(g.anchors)  # transformers serve returns no log-probs
    assert after - before == sum(g.fallback for g in out)  # parsed, or a counted fallback
    assert gen.stats["requests"] >= 2 and gen.stats["resends"] == 0
