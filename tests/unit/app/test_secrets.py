"""Secrets stay secret: settings, `gpl config show`, log lines, `gpl eval`'s results file, metrics bind host."""

from __future__ import annotations

import io
import json
import logging
import socket
import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from gpl.cli import main
from gpl.eval.movielens import build_movielens
from gpl.eval.run import EvalConfig, run_eval
from runtime.encoder import HashEncoder
from runtime.metrics import serve
from runtime.redact import MASK, install, mask_text, mask_url, public_settings
from runtime.settings import load

SASL = "sasl-Pa55-word"
QDRANT_KEY = "qdrant-k3y-abcdef"
LLM_KEY = "sk-llm-0123456789"
URL_PW = "url-pw-9876"
KEY_PW = "key-pass-4321"
ALL = (SASL, QDRANT_KEY, LLM_KEY, URL_PW, KEY_PW)


def secret_env() -> dict[str, str]:
    return {
        "GPL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "GPL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "GPL_KAFKA__SASL_USERNAME": "gpl",
        "GPL_KAFKA__SASL_PASSWORD": SASL,
        "GPL_KAFKA__SSL_KEY_PASSWORD": KEY_PW,
        "GPL_QDRANT__URL": f"https://admin:{URL_PW}@qdrant.example:6333",
        "GPL_QDRANT__API_KEY": QDRANT_KEY,
        "GPL_ANCHORS__BACKEND": "openai",  # the backend whose options these are
        "GPL_ANCHORS__API_KEY": LLM_KEY,
        "GPL_ANCHORS__BASE_URL": f"http://vllm:8000/v1?api_key={URL_PW}",
    }


def test_secrets_are_secret_strings_that_clients_still_receive() -> None:
    s = load(env=secret_env())
    for field in (s.kafka.sasl_password, s.kafka.ssl_key_password, s.qdrant.api_key, s.anchors.api_key):
        assert isinstance(field, SecretStr)
    text = repr(s) + str(s) + s.model_dump_json()
    assert not [x for x in (SASL, QDRANT_KEY, LLM_KEY, KEY_PW) if x in text]
    conf = s.kafka.client_config()  # librdkafka gets the real values
    assert conf["sasl.password"] == SASL and conf["ssl.key.password"] == KEY_PW
    again = s.with_overrides(trainer={"lr": 0.5})  # copies keep the secret
    assert again.kafka.sasl_password.get_secret_value() == SASL


@pytest.mark.parametrize("env", [
    {"GPL_KAFKA__SASL_PASWORD": SASL},  # a typo in the field name: extra_forbidden
    {"GPL_QDRANT__APIKEY": SASL},
    {"GPL_KAFKA__PARTITIONS": SASL},  # a secret put in the wrong variable: not an int
    {"GPL_KAFKA__SECURITY_PROTOCOL": SASL},
    {"GPL_KAFKA__EXTRA": SASL},  # not JSON
])
def test_a_mistyped_variable_never_echoes_its_value(env: dict[str, str]) -> None:
    with pytest.raises(ValueError) as err:
        load(env=env)
    assert SASL not in str(err.value)
    assert next(iter(env))[4:].lower().split("__")[-1] in str(err.value)  # it still names the setting


def test_validation_errors_of_copies_hide_the_input_too() -> None:
    with pytest.raises(ValidationError) as err:
        load(env={}).with_overrides(kafka={"sasl_pasword": SASL})
    assert SASL not in str(err.value)


def test_mask_url_and_text() -> None:
    assert mask_url("http://user:pw@host:6333/x?a=1") == f"http://{MASK}@host:6333/x?a=1"
    assert mask_url("https://host/v1?api_key=abc&x=2") == f"https://host/v1?api_key={MASK}&x=2"
    assert mask_url("http://qdrant:6333") == "http://qdrant:6333"
    assert mask_url("kafka-0:9092,kafka-1:9092") == "kafka-0:9092,kafka-1:9092"
    text = "GET http://bob:hunter22@llm/v1/models?token=t0k3n failed; sasl said hunter33"
    out = mask_text(text, ["hunter33"])
    assert "hunter22" not in out and "t0k3n" not in out and "hunter33" not in out and "llm/v1/models" in out


def test_config_show_masks_every_secret(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in secret_env().items():
        monkeypatch.setenv(k, v)
    extra = json.dumps({"sasl.password": SASL, "client.id": "gpl-test"})
    assert main(["--set", f"kafka.extra={extra}", "config", "show"]) == 2  # refused: kafka.sasl_password is its place
    err = capsys.readouterr().err
    assert "kafka.sasl_password" in err and SASL not in err and len(err.strip().splitlines()) == 1, err
    extra = json.dumps({"broker_credentials_password": SASL, "client.id": "gpl-test"})  # faust's free-form dict
    assert main(["--set", f"kafka.faust_extra={extra}", "config", "show"]) == 0
    out = capsys.readouterr().out
    assert not [x for x in ALL if x in out], out
    shown = json.loads(out)
    assert shown["kafka"]["sasl_password"] == MASK and shown["qdrant"]["api_key"] == MASK
    assert shown["kafka"]["ssl_key_password"] == MASK and shown["anchors"]["api_key"] == MASK
    assert shown["qdrant"]["url"] == f"https://{MASK}@qdrant.example:6333"  # the host is still visible
    assert shown["kafka"]["faust_extra"] == {"broker_credentials_password": MASK, "client.id": "gpl-test"}
    assert shown["kafka"]["ssl_ca_location"] == "" and shown["kafka"]["sasl_username"] == MASK


def test_unset_secrets_show_as_empty() -> None:
    shown = public_settings(load(env={}))
    assert shown["kafka"]["sasl_password"] == "" and shown["qdrant"]["api_key"] == ""
    assert shown["data_dir"] == ".gpl" and shown["labeler"]["calibrator_path"] is None


def test_log_lines_are_masked() -> None:
    s = load(env=secret_env())
    stream = io.StringIO()
    logger = logging.getLogger("gpl.test.redact")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        install(s, logger)
        logger.warning("connecting to %s", s.qdrant.url)
        logger.warning("auth failed for password %s", s.kafka.sasl_password.get_secret_value())
        try:
            raise RuntimeError(f"401 from http://svc:{URL_PW}@llm with key {s.anchors.api_key.get_secret_value()}")
        except RuntimeError:
            logger.exception("generation failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert not [x for x in ALL if x in out], out
    assert "qdrant.example:6333" in out and out.count(MASK) >= 4


def test_eval_results_file_has_no_secret(tmp_path: Path) -> None:
    ds = build_movielens(tmp_path / "ml", users=8, max_requests_per_user=4, candidates=30)
    settings = load(env=secret_env(), data_dir=str(tmp_path / "data"), encoder={"model": "hash-bow-64"},
                    trainer={"hash_buckets": 256, "id_dim": 4, "hidden": 8})
    cfg = EvalConfig(methods=["exposed"], seeds=1, epochs=1, anchors="memory", out=tmp_path / "out",
                     progress=False, plots=False)
    run_eval(ds, settings, cfg, encoder=HashEncoder())
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir() if p.is_file())
    assert not [x for x in ALL if x in written]
    anchors = json.loads((tmp_path / "out" / "results.json").read_text())["config"]["anchors"]
    assert anchors["api_key"] == MASK and anchors["base_url"] == f"http://vllm:8000/v1?api_key={MASK}"
    assert anchors["k"] == settings.anchors.k  # the rest of the configuration is still recorded


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_bind_host_is_a_setting() -> None:
    assert load(env={}).metrics_host == "0.0.0.0"
    s = load(env={"GPL_METRICS_HOST": "127.0.0.1", "GPL_METRICS_PORT": str(_free_port())})
    server = serve(s.metrics_port, s.metrics_host)
    assert server is not None
    try:
        assert server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read()
        assert b"gpl_messages_total" in body
    finally:
        server.shutdown()
        server.server_close()
    assert serve(0, "127.0.0.1") is None
