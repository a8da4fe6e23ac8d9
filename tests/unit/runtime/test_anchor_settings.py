"""The anchors section: one settings model per backend, picked by ``anchors.backend``, under the old names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from runtime.anchor_settings import (
    ANCHOR_BACKENDS,
    FOREIGN_OPTION,
    AnchorsBase,
    ContentAnchors,
    MemoryAnchors,
    OpenAIAnchors,
    SIDAnchors,
    TransformersAnchors,
    VLLMAnchors,
    anchor_fields,
    as_backend,
    owners,
)
from runtime.settings import Settings, SettingsError, load, section_fields

# the flat class's defaults before the split: every backend keeps the ones it has
FLAT_DEFAULTS = {
    "backend": "content", "sid_dir": "", "beam_width": 16, "model_dir": "", "llm": "smollm2-135m",
    "model_name": "SmolLM2-135M-Instruct", "k": 4, "max_new_tokens": 96, "temperature": 0.0, "batch_size": 8,
    "batch_wait_ms": 200, "history_items": 8, "retries": 1, "seed": 0, "threads": 0, "prefix_cache": True,
    "base_url": "", "api_key": SecretStr(""), "served_model": "", "concurrency": 8, "timeout_s": 60.0,
    "http_retries": 3, "debounce_s": 30.0, "max_pending": 1024, "rate_limit": 0.0, "cache": True,
    "cache_max_entries": 1_000_000,
}


def test_each_backend_selects_its_model() -> None:
    expected = {"transformers": TransformersAnchors, "memory": MemoryAnchors, "openai": OpenAIAnchors,
                "vllm": VLLMAnchors, "sid": SIDAnchors, "content": ContentAnchors}
    assert dict(ANCHOR_BACKENDS) == expected
    for name, model in expected.items():
        s = load(env={}, anchors={"backend": name})
        assert type(s.anchors) is model and s.anchors.backend == name
        assert model().backend == name  # a model built directly selects itself


def test_defaults_are_unchanged() -> None:
    s = load(env={})
    assert isinstance(s.anchors, ContentAnchors)  # the default backend
    assert Settings().anchors.backend == "content"
    for model in ANCHOR_BACKENDS.values():
        dumped = model().model_dump()
        del dumped["backend"]
        assert dumped == {k: FLAT_DEFAULTS[k] for k in dumped}
    assert anchor_fields() == set(FLAT_DEFAULTS)  # every old name is some backend's field, none added
    assert section_fields("anchors") == anchor_fields()


def test_options_sit_where_they_are_read() -> None:
    common = set(AnchorsBase.model_fields)
    assert {"k", "history_items", "batch_size", "debounce_s", "max_pending", "rate_limit", "cache",
            "cache_max_entries", "llm", "model_dir"} <= common  # policy, and the local LLM asset (Dockerfile)
    assert owners("base_url") == ["openai"] and owners("beam_width") == ["sid"]
    assert owners("prefix_cache") == ["transformers"] and set(owners("threads")) == {"transformers", "sid"}
    assert set(owners("temperature")) == {"transformers", "memory", "openai", "vllm"}
    assert set(owners("model_name")) == {"transformers", "openai", "vllm"}
    assert owners("no_such_option") == []


def test_an_option_of_another_backend_is_one_line_naming_its_backend() -> None:
    with pytest.raises(SettingsError) as err:
        load(env={}, anchors={"base_url": "http://vllm:8000/v1"})
    (e,) = err.value.errors
    assert e["type"] == FOREIGN_OPTION and e["loc"] == ("anchors",)
    assert e["msg"] == "anchors.base_url is an option of anchors.backend=openai, not content"
    with pytest.raises(SettingsError) as err:
        load(env={}, anchors={"backend": "sid", "temperature": 0.5})
    assert err.value.errors[0]["msg"] == \
        "anchors.temperature is an option of anchors.backend=transformers|memory|openai|vllm, not sid"
    with pytest.raises(ValidationError, match="anchors.beam_width is an option of anchors.backend=sid"):
        OpenAIAnchors(beam_width=3)


def test_errors_name_settings_not_the_union() -> None:
    with pytest.raises(SettingsError) as err:
        load(env={}, anchors={"backend": "openai", "k": 0})
    assert [e["loc"] for e in err.value.errors] == [("anchors", "k")]  # not anchors.openai.k
    assert "anchors.k:" in str(err.value)
    with pytest.raises(SettingsError) as err:
        load(env={}, anchors={"backend": "gpt"})
    assert [e["loc"] for e in err.value.errors] == [("anchors", "backend")]
    assert "'content'" in err.value.errors[0]["msg"]
    with pytest.raises(SettingsError) as err:
        load(env={}, anchors={"bse_url": "x"})  # no backend has it: a typo
    assert [(e["type"], e["loc"]) for e in err.value.errors] == [("extra_forbidden", ("anchors", "bse_url"))]


def test_environment_and_file_keep_their_names(tmp_path: Path) -> None:
    env = {"GPL_ANCHORS__BACKEND": "openai", "GPL_ANCHORS__BASE_URL": "http://vllm:8000/v1",
           "GPL_ANCHORS__BATCH_SIZE": "64", "GPL_ANCHORS__API_KEY": "sk-x", "GPL_ANCHORS__MODEL_DIR": "/opt/m"}
    s = load(env=env)
    assert isinstance(s.anchors, OpenAIAnchors)
    assert (s.anchors.base_url, s.anchors.batch_size, s.anchors.model_dir) == ("http://vllm:8000/v1", 64, "/opt/m")
    assert s.anchors.api_key.get_secret_value() == "sk-x"
    toml = tmp_path / "gpl.toml"
    toml.write_text('[anchors]\nbackend = "sid"\nbeam_width = 4\nsid_dir = "/sid"\n')
    f = load(toml, env={"GPL_ANCHORS__K": "3"})
    assert isinstance(f.anchors, SIDAnchors)
    assert (f.anchors.beam_width, f.anchors.sid_dir, f.anchors.k) == (4, "/sid", 3)
    with pytest.raises(SettingsError, match="anchors.beam_width, anchors.sid_dir are options of anchors.backend=sid, "
                       "not vllm"):
        load(toml, env={"GPL_ANCHORS__BACKEND": "vllm"})  # the environment switches backend, the file's key stays


def test_the_image_model_dir_loads_under_every_backend() -> None:
    """The images bake GPL_ANCHORS__MODEL_DIR; compose and prod run them with openai, anyone with sid or content."""
    for name in ANCHOR_BACKENDS:
        s = load(env={"GPL_ANCHORS__MODEL_DIR": "/opt/gpl/models/x", "GPL_ANCHORS__BACKEND": name})
        assert s.llm_dir == Path("/opt/gpl/models/x")


def test_copies_that_switch_backend_keep_the_shared_fields() -> None:
    s = load(env={}, anchors={"backend": "openai", "base_url": "http://x/v1", "k": 3, "temperature": 0.2})
    sid = s.with_overrides(anchors={"backend": "sid"}).anchors
    assert isinstance(sid, SIDAnchors) and sid.k == 3  # the openai options are dropped, not refused
    vllm = s.with_overrides(anchors={"backend": "vllm"}).anchors
    assert isinstance(vllm, VLLMAnchors) and vllm.temperature == 0.2
    with pytest.raises(ValidationError, match="anchors.base_url is an option of anchors.backend=openai"):
        s.with_overrides(anchors={"backend": "vllm", "base_url": "http://y/v1"})  # named explicitly: refused
    text = as_backend(load(env={}, anchors={"k": 5, "llm": "qwen2.5-coder-1.5b"}).anchors, TransformersAnchors)
    assert text.k == 5 and text.model_name == "Qwen2.5-Coder-1.5B-Instruct" and text.temperature == 0.0
    same = load(env={}, anchors={"backend": "memory"}).anchors
    assert as_backend(same, MemoryAnchors) is same


def test_model_name_follows_llm_in_every_llm_backend() -> None:
    for name in ("transformers", "vllm", "openai"):
        s = load(env={}, anchors={"backend": name, "llm": "qwen2.5-coder-1.5b"})
        assert s.anchors.model_name == "Qwen2.5-Coder-1.5B-Instruct"
        own = load(env={}, anchors={"backend": name, "model_name": "mine"})
        assert own.anchors.model_name == "mine"
