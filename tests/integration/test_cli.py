"""The command line as an operator meets it: main(argv) in process, `gpl up` as a real subprocess."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient

from gpl import cli
from gpl.stack import STAGES
from runtime.broker import EmbeddedBroker, free_port
from runtime.settings import Settings
from schemas.topics import TOPICS, all_topic_names
from tests.fixtures.settings import make_settings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("clean_gpl_env")




def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("gpl",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpl {cli.version()}"
    assert cli.version().count(".") >= 1


def test_every_help_shows_choices_and_defaults() -> None:
    for path, parser in _walk(cli.build_parser()):
        text = parser.format_help()
        for a in parser._actions:
            if isinstance(a, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            name = "/".join(a.option_strings) or a.dest
            for choice in a.choices or ():
                assert str(choice) in text, f"{' '.join(path)} {name}: choice {choice} not in --help"
            flag = isinstance(a.default, bool)  # store_true/false: the flag itself says it
            if not flag and a.default is not None and a.default != [] and a.default != argparse.SUPPRESS:
                assert a.help and "default" in parser._get_formatter()._get_help_string(a).lower(), (
                    f"{' '.join(path)} {name}: default {a.default!r} not shown")


def test_stage_typos_fail_before_anything_starts(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def no_stack(*a: object, **k: object) -> None:
        raise AssertionError("the stack must not start on a bad stage name")

    monkeypatch.setattr("gpl.stack.Stack", no_stack)
    for argv in (["run", "--stage", "labler"], ["up", "--stages", "indexer", "indexr"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "invalid choice" in err and "labeler" in err
    run = next(p for path, p in _walk(cli.build_parser()) if path == ("gpl", "run"))
    stage = next(a for a in run._actions if a.dest == "stages")
    assert tuple(stage.choices or ()) == (*STAGES, "all")


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_settings_are_one_line_with_a_suggestion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(["--set", "kafka.partitons=3", "config", "show"], capsys)
    assert "kafka.partitons" in err and "did you mean kafka.partitions?" in err
    err = _one_line_error(["--set", "kafka.partitions=x", "config", "show"], capsys)
    assert err.startswith("gpl: bad setting kafka.partitions: ") and "'x'" not in err  # values may be secrets
    monkeypatch.setenv("GPL_TRAINER__BATCH_SIZ", "3")
    err = _one_line_error(["config", "show"], capsys)
    assert "GPL_TRAINER__BATCH_SIZ" in err and "did you mean trainer.batch_size?" in err
    monkeypatch.delenv("GPL_TRAINER__BATCH_SIZ")
    monkeypatch.setenv("GPL_KAFAK__PARTITIONS", "3")
    err = _one_line_error(["config", "show"], capsys)
    assert "did you mean GPL_KAFKA__PARTITIONS?" in err
    monkeypatch.delenv("GPL_KAFAK__PARTITIONS")
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    assert "not valid TOML" in _one_line_error(["--config", str(bad), "config", "show"], capsys)
    with pytest.raises(SystemExit):
        cli.main(["--set", "kafka.partitions", "config", "show"])


def test_topics_list_without_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topics", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TOPIC", "RECORD", "KEY", "CLEANUP", "DLQ"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert list(rows) == list(TOPICS)
    assert rows["items"][1:4] == ["ItemEvent", "item_id", "compact"] and rows["recall"][3] == "delete"


@pytest.mark.integration
def test_topics_create_and_list_on_a_broker(fresh_broker: EmbeddedBroker, capsys: pytest.CaptureFixture[str]) -> None:
    b = fresh_broker.bootstrap
    assert cli.main(["topics", "create", "--bootstrap", b, "recall", "scratch-copy"]) == 0
    out = capsys.readouterr().out
    assert "created  recall" in out and "created  scratch-copy" in out
    assert cli.main(["topics", "create", "--bootstrap", b, "recall"]) == 0
    assert "exists   recall" in capsys.readouterr().out
    md = AdminClient({"bootstrap.servers": b}).list_topics(timeout=10).topics
    assert len(md["scratch-copy"].partitions) == 4  # kafka.partitions default
    assert cli.main(["--set", f"kafka.bootstrap_servers={b}", "topics", "list"]) == 0
    rows = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[1:]}
    assert rows["recall"][-2:] == ["4", "missing"] and rows["items"][-2:] == ["missing", "missing"]
    assert cli.main(["topics", "create"]) == 2  # no broker: a clear refusal, not a traceback
    assert "--bootstrap" in capsys.readouterr().err
    assert cli.main(["topics", "create", "--bootstrap", b]) == 0
    assert set(all_topic_names()) <= set(AdminClient({"bootstrap.servers": b}).list_topics(timeout=10).topics)


@pytest.mark.integration
def test_replay_caps_pacing_sleeps_and_targets_another_cluster(
        fresh_broker: EmbeddedBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two items a year apart at --speed 1000 would sleep 8.8 hours; --max-wait 0.2 caps it. No bars off a TTY."""
    b = fresh_broker.bootstrap
    # the cluster named by --bootstrap is the embedded broker: its profile (one record per produce batch) goes
    # with it, as the stack applies it (a multi-record batch shows it a wrong high watermark)
    quirks = [f"--set=kafka.{k}={v}".lower() for k, v in fresh_broker.profile()["kafka"].items()]
    assert cli.main(["topics", "create", "--bootstrap", b, "items"]) == 0
    year_ms = 365 * 86_400_000
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(orjson.dumps({"topic": "items", "value": {"item_id": i, "text": f"item {i}",
                                                                          "ts": 1_000_000_000_000 + i * year_ms}})
                                + b"\n" for i in range(3)))
    capsys.readouterr()
    t0 = time.monotonic()
    assert cli.main([*quirks, "replay", str(events), "--speed", "1000", "--max-wait", "0.2", "--bootstrap", b]) == 0
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert orjson.loads(out.strip().splitlines()[-1]) == {"items": 3}
    assert 0.4 <= took < 10, took  # two capped gaps of 0.2 s, not two of 8.8 hours
    assert "replay events.jsonl" not in err and "ev/s" not in err  # stderr is no terminal here

    # a topic copy into a target that does not exist yet: created with the source's partition count
    assert cli.main([*quirks, "replay", "--topic", "items", "--to", "items-copy", "--bootstrap", b]) == 0
    stats = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["copied"] == 3 and stats["created_target"] == 1
    md = AdminClient({"bootstrap.servers": b}).list_topics(timeout=10).topics
    assert len(md["items-copy"].partitions) == len(md["items"].partitions)


def test_demo_rejects_funnel_options_in_the_semisynth_world(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--requests-per-user", "3"]) == 2
    assert "--requests-per-user apply to --world funnel" in capsys.readouterr().err


def test_demo_export_honours_requests_per_user(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    assert cli.main(["demo", "--world", "funnel", "--users", "3", "--requests-per-user", "2", "--candidates", "50",
                     "--export-jsonl", str(out)]) == 0
    recalls = [orjson.loads(ln)["value"] for ln in out.read_bytes().splitlines() if b'"recall"' in ln[:20]]
    per_user: dict[str, int] = {}
    for r in recalls:
        per_user[r["user_id"]] = per_user.get(r["user_id"], 0) + 1
        assert len(r["item_ids"]) <= 50  # columnar recall (schema_version 2)
    assert len(per_user) == 3 and max(per_user.values()) == 2


def test_streams_state_lives_under_the_data_dir(tmp_path: Path) -> None:
    from runtime.vectors.memory import MemoryIndex
    from streams.app import StreamsProcessor

    s: Settings = make_settings(tmp_path, "127.0.0.1:1")
    proc = StreamsProcessor(s, MemoryIndex())
    assert Path(proc.app.conf.datadir).resolve().is_relative_to(s.data_dir.resolve())


@pytest.mark.integration
@pytest.mark.parametrize("broker", ["embedded", "kafka"])
def test_up_pins_the_port_and_prints_a_ready_line(tmp_path: Path, broker: str, request: pytest.FixtureRequest) -> None:
    if broker == "kafka":
        request.getfixturevalue("kafka_dist")  # skips without Java or Maven
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")} | {
        "PYTHONPATH": str(ROOT), "GPL_DATA_DIR": str(tmp_path / "data"), "GPL_METRICS_PORT": str(metrics_port)}
    # --broker kafka fetches the jars into this data dir with Maven (from its local repository after `make setup`)
    proc = subprocess.Popen([sys.executable, "-m", "gpl.cli", "up", "--port", str(port), "--broker", broker],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        # a reader thread, not select(): the text wrapper buffers several lines behind one readable fd
        reader = threading.Thread(target=lambda: lines.extend(ln.strip() for ln in proc.stdout or ()), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not any(ln.startswith("ready") for ln in lines):
            time.sleep(0.2)
        ready = next((ln for ln in lines if ln.startswith("ready")), None)
        assert ready is not None, (lines, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        assert ready.split()[1:] == [f"bootstrap=127.0.0.1:{port}",
                                     f"metrics=http://127.0.0.1:{metrics_port}/metrics"]
        md = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10).topics
        assert set(all_topic_names()) <= set(md)
        assert not (tmp_path / "gpl-streams-data").exists()
        assert any(ln.startswith("broker") and f"({broker}" in ln for ln in lines), lines
        # the embedded broker's clients are told its profile; Apache Kafka's need nothing beyond the defaults
        assert any("GPL_KAFKA__PRODUCER_BATCH_MESSAGES=1" in ln for ln in lines) == (broker == "embedded")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0


def test_no_progress_is_implied_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpl eval` (gpl/commands/eval.py) draws bars unless --no-progress; in a service log (no TTY) it is implied."""
    seen: dict[str, bool] = {}

    def fake_run(args: argparse.Namespace, settings: Settings) -> int:
        seen["no_progress"] = args.no_progress
        return 0

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    ev = next(p for path, p in _walk(parser) if path == ("gpl", "eval"))
    ev.set_defaults(run=fake_run)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert cli.main(["eval", "semisynth"]) == 0 and seen["no_progress"] is True
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main(["eval", "semisynth"]) == 0 and seen["no_progress"] is False


def test_up_refuses_a_busy_port_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        assert cli.main(["up", "--port", str(port)]) == 2
        assert time.monotonic() - t0 < 5
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
