"""``gpl`` meets the per-backend anchors settings: a cross-backend key is one line, config show has the section."""

from __future__ import annotations

import json

import pytest

from gpl import cli

pytestmark = pytest.mark.usefixtures("clean_gpl_env")




def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_an_option_of_another_backend_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["--set", "anchors.base_url=http://vllm:8000/v1", "config", "show"], capsys)
    assert err == "gpl: anchors.base_url is an option of anchors.backend=openai, not content"
    monkeypatch.setenv("GPL_ANCHORS__BACKEND", "sid")
    monkeypatch.setenv("GPL_ANCHORS__PREFIX_CACHE", "false")
    err = _error(["config", "show"], capsys)
    assert err == "gpl: anchors.prefix_cache is an option of anchors.backend=transformers, not sid"
    monkeypatch.delenv("GPL_ANCHORS__PREFIX_CACHE")
    err = _error(["--set", "anchors.bem_width=3", "config", "show"], capsys)  # a typo: did you mean
    assert "unknown setting anchors.bem_width" in err and "did you mean anchors.beam_width?" in err
    err = _error(["--set", "anchors.k=0", "config", "show"], capsys)
    assert err.startswith("gpl: bad setting anchors.k: ")


def test_config_show_prints_the_selected_backends_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "show"]) == 0
    anchors = json.loads(capsys.readouterr().out)["anchors"]
    assert anchors["backend"] == "content" and anchors["k"] == 4 and "base_url" not in anchors
    argv = ["--set", "anchors.backend=openai", "--set", "anchors.base_url=http://vllm:8000/v1",
            "--set", "anchors.api_key=sk-secret", "config", "show"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    anchors = json.loads(out)["anchors"]
    assert anchors["base_url"] == "http://vllm:8000/v1" and anchors["model_name"] == "SmolLM2-135M-Instruct"
    assert "sk-secret" not in out


def test_every_backend_has_its_settings_model_and_a_factory() -> None:
    """The two registries name the same backends: a settings model (runtime) and a factory (gpl/backends.py)."""
    from gpl.backends import FACTORIES
    from runtime.anchor_settings import ANCHOR_BACKENDS

    assert list(FACTORIES) == list(ANCHOR_BACKENDS)
