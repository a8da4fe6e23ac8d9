"""The command line as an operator meets it (issue 22): the README's commands parse as written, ``--set``
goes before or after the command, ``up`` and ``run`` take one stage-list syntax, ``gpl --version`` answers
without the heavy imports, and ``gpl up``'s ready line comes once its stages hold their partitions."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from gpl import cli
from tests.helpers import wait_for
from tests.integration.test_health import _get

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]
HEAVY = ("pydantic", "confluent_kafka", "faust", "numpy", "torch", "gpl.stack", "runtime.settings")


def fenced_commands(text: str) -> list[str]:
    """Every ``gpl …`` line of the fenced code blocks (continuations joined, comments and pipes cut)."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if re.search(r"(^|\s)gpl\s", line):
                out.append(re.split(r"\s#|\||&&|;", line)[0].strip())
    return out


def test_every_fenced_command_of_the_docs_parses_as_written() -> None:
    commands = [(doc.name, c) for doc in DOCS for c in fenced_commands(doc.read_text())]
    assert len(commands) >= 5, commands  # the README's own, at least
    parser = cli.build_parser()
    for doc, command in commands:
        words = shlex.split(command)
        argv = words[words.index("gpl") + 1:]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = parser.parse_args(argv)
        except SystemExit as e:
            assert not e.code, f"{doc}: `{command}` does not parse: {err.getvalue().strip()}"
            continue
        assert hasattr(args, "run"), f"{doc}: `{command}` names no command"


def test_set_goes_before_or_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`gpl up --set broker.storage=s3` (the README's) was "unrecognized arguments"."""
    cli.build_parser().parse_args(["up", "--set", "broker.storage=s3"])
    assert cli.main(["--set", "kafka.partitions=5", "config", "show", "--set", "kafka.linger_ms=7"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["kafka"]["partitions"] == 5 and shown["kafka"]["linger_ms"] == 7
    assert cli.main(["config", "show", "--set", "kafka.partitons=5"]) == 2  # the same one-line refusal after it
    assert "did you mean kafka.partitions" in capsys.readouterr().err


def test_up_and_run_take_one_stage_list(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    for command in ("up", "run"):
        documented = parser.parse_args([command, "--stages", "labeler", "trainer"]).stages
        assert documented == parser.parse_args([command, "--stage", "labeler", "--stage", "trainer"]).stages
        assert documented == ["labeler", "trainer"]
        assert parser.parse_args([command, "--stages", "all"]).stages == ["all"]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run_help = commands.choices["run"].format_help()
    assert "--stages STAGE [STAGE ...]" in run_help and "--stage " not in run_help  # one form documented
    assert cli.main(["run", "--embedded"]) == 2
    assert "--stages STAGE" in capsys.readouterr().err


def test_version_answers_without_the_heavy_imports() -> None:
    probe = ("import sys\nfrom gpl.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    version, loaded = p.stdout.splitlines()
    assert version.startswith("gpl ") and loaded == "[]", p.stdout
    best = min(_timed([sys.executable, "-m", "gpl.cli", "--version"]) for _ in range(3))
    assert best < 0.3, f"gpl --version took {best:.2f} s (best of 3)"


def _timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True, cwd=ROOT, timeout=60)
    return time.perf_counter() - t


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
def test_up_says_ready_once_its_stages_hold_partitions(tmp_path: Path) -> None:
    """The ready line used to come right after the stages started, seconds before a child-process stage
    joined its group: a script that waited for it found /readyz still 503."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")} | {
        "PYTHONPATH": str(ROOT), "GPL_DATA_DIR": str(tmp_path / "data"), "GPL_METRICS_PORT": str(port),
        "GPL_METRICS_HOST": "127.0.0.1", "GPL_LABELER__LABEL_SOURCE": "map"}
    proc = subprocess.Popen([sys.executable, "-m", "gpl.cli", "up", "--stages", "labeler"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    readyz: list[int] = []

    def read() -> None:
        for ln in proc.stdout or ():
            if ln.startswith("ready"):  # the probe at the moment the line comes
                readyz.append(_get(f"http://127.0.0.1:{port}/readyz")[0])
            lines.append(ln.strip())

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: bool(readyz) or proc.poll() is not None, 180, "the ready line")
        assert readyz == [200], (lines, readyz, proc.poll() is not None and proc.stderr and proc.stderr.read())
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.integration
def test_json_log_format_reaches_the_parent_and_the_stage_children(tmp_path: Path) -> None:
    """GPL_LOG_FORMAT=json: every log line of `gpl up` and of its stage process is one JSON object."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")} | {
        "PYTHONPATH": str(ROOT), "GPL_DATA_DIR": str(tmp_path / "data"), "GPL_LABELER__LABEL_SOURCE": "map",
        "GPL_LOG_FORMAT": "json", "GPL_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen([sys.executable, "-m", "gpl.cli", "up", "--stages", "labeler"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(ln.strip() for ln in proc.stdout or ()), daemon=True).start()
    try:
        wait_for(lambda: any(ln.startswith("ready") for ln in lines) or proc.poll() is not None, 180, "ready")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    logged = [ln for ln in err.splitlines() if ln.strip()]
    assert not [ln for ln in logged if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", ln)], err  # no text lines
    records = [orjson.loads(ln) for ln in logged if ln.startswith("{")]
    assert {"ts", "level", "logger", "msg", "pid"} <= set(records[0]), records[0]
    assert any(r.get("stage") == "labeler" for r in records), err  # from the child process
    assert any("stage" not in r for r in records), err  # from gpl up itself


@pytest.mark.integration
def test_a_stop_while_the_stages_join_is_clean(tmp_path: Path) -> None:
    """SIGTERM (an orchestrator's stop) before the ready line: the stages stop and `gpl up` exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")} | {
        "PYTHONPATH": str(ROOT), "GPL_DATA_DIR": str(tmp_path / "data"), "GPL_LABELER__LABEL_SOURCE": "map"}
    proc = subprocess.Popen([sys.executable, "-m", "gpl.cli", "up", "--stages", "labeler"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(ln.strip() for ln in proc.stdout or ()), daemon=True).start()
    try:
        wait_for(lambda: any(ln.startswith("stages") for ln in lines) or proc.poll() is not None, 120, "stages")
        time.sleep(1.0)  # the labeler's process is still starting: no partitions yet
        assert not any(ln.startswith("ready") for ln in lines), lines
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, (proc.returncode, err[-2000:])


@pytest.mark.integration
def test_up_with_bootstrap_uses_that_cluster(tmp_path: Path, broker: Any) -> None:
    """`gpl up --bootstrap HOST:PORT` is `--set kafka.bootstrap_servers=…`: no local broker starts, the stack's
    topics are created on the given cluster and the ready line names it."""
    from confluent_kafka.admin import AdminClient

    from schemas.topics import all_topic_names

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPL_")} | {
        "PYTHONPATH": str(ROOT), "GPL_DATA_DIR": str(tmp_path / "data"), "GPL_KAFKA__PARTITIONS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpl.cli", "up", "--bootstrap", broker.bootstrap], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(ln.strip() for ln in proc.stdout or ()), daemon=True).start()
    try:
        wait_for(lambda: any(ln.startswith("ready") for ln in lines) or proc.poll() is not None, 120, "ready")
        assert f"bootstrap={broker.bootstrap}" in next(ln for ln in lines if ln.startswith("ready")), lines
        broker_line = next(ln for ln in lines if ln.startswith("broker"))
        assert broker_line.split() == ["broker", broker.bootstrap], broker_line  # no local broker named
        on_broker = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
        assert set(all_topic_names()) <= set(on_broker)
        assert not (tmp_path / "data" / "tansu.log").exists() and not (tmp_path / "data" / "kafka-broker").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
