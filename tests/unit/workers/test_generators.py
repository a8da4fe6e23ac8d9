"""The backend-independent parts of anchor generation: prompt, hash, parser/validator, retry, fallback.

Pure logic, so no broker and no model: MemoryGenerator drives the same retry/fallback code a real LLM
backend uses, with scripted answers standing in for malformed model output.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gpl.backends import make_generator
from runtime.anchor_settings import MemoryAnchors, TransformersAnchors
from runtime.settings import load
from workers.anchors.generators.base import AnchorPrompt
from workers.anchors.generators.logprobs import locate, span_logprobs
from workers.anchors.generators.memory import MemoryGenerator
from workers.anchors.generators.parsing import clean_anchors, fallback_anchors, parse_anchors
from workers.anchors.generators.prompt import (
    EXAMPLE_ANCHORS,
    FALLBACK_LOGPROB,
    PREFILL,
    build_messages,
    generation_budget,
    prompt_hash,
)

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------------- parser

@pytest.mark.parametrize(
    ("raw", "k", "expected"),
    [
        ('{"interests": ["trail running", "GPS watches", "green tea"]}', 3,
         ["trail running", "GPS watches", "green tea"]),
        # the pre-filled form the TransformersGenerator parses
        (PREFILL + 'fantasy novels", "Tolkien"]}', 4, ["fantasy novels", "Tolkien"]),
        # code fences, with and without a language tag
        ('```json\n{"interests": ["a cappella", "choir music"]}\n```', 4, ["a cappella", "choir music"]),
        ('```\n["kitchen knives", "baking"]\n```', 4, ["kitchen knives", "baking"]),
        # prose around the JSON
        ('Sure! Here you go: {"interests": ["board games", "puzzles"]} Hope it helps.', 4,
         ["board games", "puzzles"]),
        # another key, a bare array, objects in the array
        ('{"topics": ["jazz", "vinyl records"]}', 4, ["jazz", "vinyl records"]),
        ('["drones", "RC cars"]', 4, ["drones", "RC cars"]),
        ('{"interests": [{"interest": "yoga"}, {"name": "pilates"}]}', 4, ["yoga", "pilates"]),
        # truncated at the token budget: keep the complete strings, drop the cut one
        ('{"interests": ["running shoes", "marathon training", "sports nutri', 4,
         ["running shoes", "marathon training"]),
        # numbered and bulleted lists, with explanations cut by the length limit
        ("1. Running gear\n2. Fitness trackers\n3) Healthy drinks", 4,
         ["Running gear", "Fitness trackers", "Healthy drinks"]),
        ("Here they are:\nsci-fi films\nspace documentaries", 4, ["sci-fi films", "space documentaries"]),
        ("Interests:\n- sci-fi films\n* space documentaries\n• astronomy", 4,
         ["sci-fi films", "space documentaries", "astronomy"]),
        # duplicates (case-insensitive), empties, placeholders, echoes of the worked example
        ('{"interests": ["Lego", "lego", "", "  ", "interest 1", "...", "hiking", "remote control", '
         '"camping gear"]}', 4, ["Lego", "remote control"]),
        # a worked-example answer not grounded in the history is an echo (no history given here)
        ('{"interests": ["trail running", "GPS watches", "hiking"]}', 4, ["trail running", "GPS watches"]),
        # too long: more than 8 words or 80 characters
        ('{"interests": ["one two three four five six seven eight nine", "ok anchor", "' + "x" * 90 + '"]}',
         4, ["ok anchor"]),
        # more than k: keep the first k
        ('{"interests": ["a1", "b2", "c3", "d4", "e5"]}', 3, ["a1", "b2", "c3"]),
        # quotes and trailing punctuation are trimmed, escapes decoded
        ('{"interests": ["\\"retro games\\".", "caf\\u00e9 culture;"]}', 4, ["retro games", "café culture"]),
    ],
)
def test_parse_accepts_what_is_usable(raw: str, k: int, expected: list[str]) -> None:
    assert parse_anchors(raw, k) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   \n ",
        "I cannot help with that request because it is about shopping.",
        '{"interests": []}',
        '{"interests": ["interest 1", "interest 2"]}',  # copied the format's placeholder
        '{"interests": ["camping gear", "hiking", "outdoor cooking"]}',  # echoed the worked example
        '{"interests": [1, 2, null, true]}',
        "{{{{[[[[",
        '"""',
        "```json\n```",
        "Here are the interests:\n",
    ],
)
def test_parse_rejects_unusable(raw: str) -> None:
    assert parse_anchors(raw, 4) == []


def test_example_answers_survive_only_when_grounded_in_history() -> None:
    raw = '{"interests": ["trail running", "hiking", "healthy snacks"]}'
    hist = ["Hiking boots waterproof", "Trail running shoes"]
    assert parse_anchors(raw, 4, hist) == ["trail running", "hiking"]
    # "snack" grounds "snacks"
    assert parse_anchors(raw, 4, ["Organic snack bars"]) == ["trail running", "healthy snacks"]


def test_clean_anchors_normalises_whitespace_and_limits() -> None:
    got = clean_anchors(["  vintage\n  cameras ", "Vintage cameras", "film"], 5)
    assert got == ["vintage cameras", "film"]
    assert clean_anchors([e.upper() for e in EXAMPLE_ANCHORS[:5]], 5) == []
    # what the prompt did not show for this k cannot be an echo
    assert clean_anchors(EXAMPLE_ANCHORS[4:6], 2) == EXAMPLE_ANCHORS[4:6]


def test_fallback_anchors_are_recent_history_texts() -> None:
    hist = ["old item", "Garmin GPS running watch", "Nike shoes", "nike shoes", " "]
    assert fallback_anchors(hist, 2) == ["nike shoes", "Garmin GPS running watch"]
    long = "w " * 30
    assert fallback_anchors([long], 3) == [" ".join(["w"] * 8)]
    assert fallback_anchors([], 3) == []


# --------------------------------------------------------------------------------- log-prob mapping

def test_locate_and_span_logprobs() -> None:
    raw = PREFILL + 'ab", "cd"]}'
    spans = locate(raw, ["ab", "cd", "zz"])
    p = len(PREFILL)
    assert spans == [(p, p + 2), (p + 6, p + 8), None]
    # generated tokens: 'ab' | '", "' | 'cd' | '"]}'
    ends = [2, 6, 8, 11]
    lps = [-0.5, -0.1, -2.0, -0.3]
    out = span_logprobs(spans, ends, lps, p)
    assert out[0] == pytest.approx(-0.5)
    assert out[1] == pytest.approx(-2.0)
    assert out[2] == pytest.approx(sum(lps) / 4)  # not found: mean over all generated tokens


def test_locate_is_case_insensitive_as_last_resort() -> None:
    assert locate("x Running Shoes y", ["running shoes"]) == [(2, 15)]


# ------------------------------------------------------------------------------------ prompt + hash

def test_messages_show_history_in_order_and_ask_for_k() -> None:
    msgs = build_messages(AnchorPrompt("u", ["first item", "second item"], 3))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    last = msgs[-1]["content"]
    assert last.index("first item") < last.index("second item")
    assert "Name 3 different interests" in last
    assert msgs[2]["content"].startswith(PREFILL)  # the worked example answers in the pre-filled form


def test_prompt_hash_is_stable_and_sensitive() -> None:
    s = TransformersAnchors()
    h = prompt_hash(s, "transformers")
    assert h == prompt_hash(TransformersAnchors(), "transformers")
    assert len(h) == 16
    # not the process's string-hash seed: the same in another interpreter
    code = ("from runtime.anchor_settings import TransformersAnchors; "
            "from workers.anchors.generators.prompt import prompt_hash; "
            "print(prompt_hash(TransformersAnchors(), 'transformers'))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == h
    assert prompt_hash(TransformersAnchors(temperature=0.5), "transformers") != h
    assert prompt_hash(TransformersAnchors(max_new_tokens=50), "transformers") != h
    assert prompt_hash(s, "memory") != h
    # batch size and k do not change what one user's prompt or decoding is
    assert prompt_hash(TransformersAnchors(batch_size=1), "transformers") == h


def test_generation_budget() -> None:
    assert generation_budget(4, 96) == 56
    assert generation_budget(32, 96) == 96
    assert generation_budget(1, 8) == 8


# ------------------------------------------------------------------------------ MemoryGenerator + retry

def _metric(outcome: str, model: str) -> float:
    v = REGISTRY.get_sample_value("gpl_anchor_generations_total", {"model": model, "outcome": outcome})
    return v or 0.0


def test_memory_generator_is_deterministic_and_well_formed() -> None:
    g = MemoryGenerator(MemoryAnchors(), model="mem-det")
    hist = ["Trail running shoes", "Running watch GPS", "Trail mix"]
    p = AnchorPrompt("u1", hist, 3)
    a, b = g.generate([p])[0], g.generate([p])[0]
    assert a == b
    assert a.anchors == ["trail", "running", "mix"]  # frequency first, then recency
    assert len(a.logprobs) == 3 and all(math.isfinite(x) and x < 0 for x in a.logprobs)
    assert a.parsed_first_try and a.attempts == 1 and not a.fallback and a.tokens > 0
    assert g.prompt_hash == prompt_hash(MemoryAnchors(), "memory")


def test_retry_then_success_is_counted() -> None:
    answers = {0: "I am not sure.", 1: '{"interests": ["jazz", "vinyl"]}'}
    g = MemoryGenerator(MemoryAnchors(retries=2), model="mem-retry",
                        script=lambda p, attempt: answers[attempt])
    before = _metric("retried", "mem-retry")
    gen = g.generate([AnchorPrompt("u", ["Blue Note jazz LP"], 4)])[0]
    assert gen.anchors == ["jazz", "vinyl"]
    assert not gen.parsed_first_try and gen.attempts == 2 and not gen.fallback
    assert _metric("retried", "mem-retry") == before + 1
    assert g.calls == 2  # the third attempt was not needed


def test_unparseable_output_falls_back_and_is_counted() -> None:
    g = MemoryGenerator(MemoryAnchors(retries=1), model="mem-fallback",
                        script=lambda p, attempt: "```\nlorem ipsum dolor sit amet consectetur\n```")
    before = _metric("fallback", "mem-fallback")
    ok, bad = AnchorPrompt("ok", ["Cast iron skillet", "Chef knife"], 2), AnchorPrompt("bad", ["x"], 2)
    gens = g.generate([ok, bad])
    for gen in gens:
        assert gen.fallback and gen.attempts == 2 and not gen.parsed_first_try
        assert gen.logprobs == [FALLBACK_LOGPROB] * len(gen.anchors)
        assert gen.raw.startswith("```")  # the last raw answer is kept for inspection
    assert gens[0].anchors == ["Chef knife", "Cast iron skillet"]
    assert _metric("fallback", "mem-fallback") == before + 2


def test_only_failing_prompts_are_retried() -> None:
    seen: list[tuple[str, int]] = []

    def script(p: AnchorPrompt, attempt: int) -> str:
        seen.append((p.user_id, attempt))
        return '["fine"]' if p.user_id == "good" or attempt > 0 else "no"

    g = MemoryGenerator(MemoryAnchors(retries=3), script=script)
    gens = g.generate([AnchorPrompt("good", ["a"], 2), AnchorPrompt("late", ["b"], 2)])
    assert [x.attempts for x in gens] == [1, 2]
    assert seen == [("good", 0), ("late", 0), ("late", 1)]


def test_batches_respect_batch_size() -> None:
    g = MemoryGenerator(MemoryAnchors(batch_size=2))
    gens = g.generate([AnchorPrompt(f"u{i}", [f"widget{i} words"], 1) for i in range(5)])
    assert len(gens) == 5 and g.calls == 3


def test_make_generator_backends(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path), anchors={"backend": "memory"})
    assert isinstance(make_generator(s), MemoryGenerator)
    with pytest.raises(ValueError, match="needs anchors.base_url"):
        make_generator(load(env={}, data_dir=str(tmp_path), anchors={"backend": "openai"}))
    from workers.anchors.generators.openai_backend import OpenAIGenerator

    g = make_generator(load(env={}, data_dir=str(tmp_path),
                            anchors={"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}))
    assert isinstance(g, OpenAIGenerator)
    g.close()
    # vLLM: the extra is not installed here, and the error says what to do (see test_vllm_adapter)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match=r"pip install '\.\[vllm\]'"):
            make_generator(load(env={}, data_dir=str(tmp_path), anchors={"backend": "vllm"}))


def test_word_repetition_penalty_spares_prompt_and_punctuation() -> None:
    torch = pytest.importorskip("torch")
    from workers.anchors.generators.transformers_backend import WordRepetitionPenalty

    word_mask = torch.tensor([True, True, False, True])  # token 2 is punctuation
    proc = WordRepetitionPenalty(word_mask, start=2, penalty=2.0)
    ids = torch.tensor([[3, 3, 1, 2]])  # prompt: 3, 3; generated: 1 (word), 2 (punctuation)
    scores = torch.tensor([[1.0, 4.0, 4.0, -1.0]])
    out = proc(ids, scores.clone())
    assert out.tolist() == [[1.0, 2.0, 4.0, -1.0]]
