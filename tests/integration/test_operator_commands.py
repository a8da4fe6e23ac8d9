"""Operator commands in an incident (issue 22, item 5).

* Failures an operator can fix end in one stderr line with what to do and exit status 2: an unreachable
  broker or registry, a missing file or checkpoint, ``--compatibility`` on the mock registry, an unknown
  ``--reason`` (which lists the reasons). Run as subprocesses: the exit code and the whole stderr count.
* A reader that closes the pipe early (``gpl topics list | head -1``) gets no BrokenPipeError.
* Every command that talks to a broker takes ``--bootstrap``.
* ``dlq show`` prints the whole error; ``dlq redrive`` stamps a redrive count, skips a dead letter sent
  by another filter's run or past ``--max-redrives``; the stream dead-letters a redriven record that
  fails again as ``redrive_exhausted`` (real broker).
* Every dead-letter reason written in the code is declared in ``schemas.events.DLQ_REASONS``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from gpl.cli import build_parser
from gpl.commands.dlq import redrive
from runtime.broker import Broker
from runtime.kafka import consumer, create_topics, producer
from schemas.codec import dead_letter, encode, redrive_count
from schemas.events import DLQ_REASONS, REDRIVE_HEADER

ROOT = Path(__file__).resolve().parents[2]
DEAD = "127.0.0.1:1"  # nothing listens there: connection refused at once


def gpl(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpl.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line(out: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr[-2000:])
    assert lines[0].startswith("gpl: ") and all(w in lines[0] for w in words), lines[0]
    return lines[0]


SAME_CHECK = pytest.mark.slow  # the same require_broker as the commands kept in the default run: `make test-all`


@pytest.mark.parametrize("argv", [("topics", "list"), pytest.param(("topics", "create"), marks=SAME_CHECK),
                                  pytest.param(("dlq", "show", "recall"), marks=SAME_CHECK),
                                  ("dlq", "redrive", "recall"),
                                  pytest.param(("replay", str(ROOT / "README.md")), marks=SAME_CHECK), ("up",),
                                  pytest.param(("run", "--stages", "labeler"), marks=SAME_CHECK)])
def test_unreachable_broker_is_one_line(argv: tuple[str, ...]) -> None:
    one_line(gpl(*argv, "--bootstrap", DEAD), f"cannot reach the Kafka broker at {DEAD}", "--bootstrap")


def test_unreachable_registry_is_one_line() -> None:
    one_line(gpl("--set", "schema_registry.url=http://127.0.0.1:1", "schemas", "register"),
             "cannot reach the schema registry at http://127.0.0.1:1", "schema_registry.url")


def test_compatibility_on_the_mock_registry_is_one_line() -> None:
    one_line(gpl("--set", "schema_registry.url=mock://ops", "schemas", "register", "--compatibility", "FULL"),
             "mock registry", "drop --compatibility")


def test_missing_file_and_checkpoint_are_one_line(tmp_path: Path) -> None:
    one_line(gpl("export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")), "nope.pt", "no such file")
    one_line(gpl("export", str(tmp_path), "--out", str(tmp_path / "o")), "no checkpoint", str(tmp_path))
    line = one_line(gpl("schemas", "validate", str(tmp_path / "events.jsonl")), "events.jsonl", "no such file")
    assert "checkpoint" not in line  # the hint fits the file


def test_unknown_reason_lists_the_reasons() -> None:
    line = one_line(gpl("dlq", "show", "recall", "--reason", "schemma", "--bootstrap", DEAD), "unknown reason")
    assert all(r in line for r in DLQ_REASONS)


def test_a_closed_pipe_is_quiet() -> None:
    """``gpl topics list | head -0``: the reader is gone before the first write."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = subprocess.run([sys.executable, "-m", "gpl.cli", "topics", "list"], cwd=ROOT, stdout=w,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_every_broker_command_takes_bootstrap() -> None:
    def sub(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    root = build_parser()
    for path in (("topics", "list"), ("topics", "create"), ("dlq", "show"), ("dlq", "redrive"), ("replay",),
                 ("up",), ("run",), ("groups", "lag"), ("groups", "reset")):
        p = root
        for name in path:
            p = sub(p, name)
        assert any("--bootstrap" in a.option_strings for a in p._actions), path


def test_bootstrap_on_up_and_run_is_the_setting() -> None:
    """``--bootstrap`` is ``--set kafka.bootstrap_servers=…``: it replaces the local broker, so the flags that
    configure one are refused beside it in one line, as they are beside the setting."""
    for argv in (("up", "--broker", "kafka"), ("run", "--embedded", "--stages", "labeler")):
        for given in (("--bootstrap", DEAD), ("--set", f"kafka.bootstrap_servers={DEAD}")):
            out = gpl(*argv, *given)
            assert out.returncode == 2 and "kafka.bootstrap_servers is set" in out.stderr, (argv, given, out.stderr)
    one_line(gpl("--set", f"kafka.bootstrap_servers={DEAD}", "run", "--stages", "labeler"),
             f"cannot reach the Kafka broker at {DEAD}")


def test_every_dead_letter_reason_is_declared() -> None:
    """Reasons as the code writes them: DecodeError("x", ...), reason="x", dead_letter(m, e, "x"), ("x", why)."""
    pattern = re.compile(r'DecodeError\("(\w+)"|reason="(\w+)"|dead_letter\(\w+, \w+, "(\w+)"\)'
                         r'|skipped\[[^]]+\] = \("(\w+)"|_no_vector\(|\bio\.dlq\.send_raw\([^)]*reason="(\w+)"')
    found: set[str] = set()
    for d in ("schemas", "runtime", "streams", "workers", "gpl"):
        for f in (ROOT / d).rglob("*.py"):
            for m in pattern.finditer(f.read_text()):
                found.update(g for g in m.groups() if g)
    found |= {"no_vector"}  # the trainer passes it positionally (workers/trainer/loop.py, _dead_letter)
    assert len(found) >= 10 and found <= set(DLQ_REASONS), found - set(DLQ_REASONS)


def test_redrive_count_header_reads_both_clients_forms() -> None:
    assert redrive_count([(REDRIVE_HEADER, b"2")]) == 2 and redrive_count({REDRIVE_HEADER: b"1"}) == 1
    assert redrive_count(None) == 0 and redrive_count([(REDRIVE_HEADER, b"x")]) == 0
    dl = dead_letter(topic="recall", partition=0, offset=3, key=b"u", value=b"{}", error="bad", reason="schema",
                     stage="streams", redrives=1)
    assert (dl.reason, dl.redrives) == ("redrive_exhausted", 1) and dl.error.startswith("schema after 1 redrive")


# ------------------------------------------------------------------------------------------ real broker
def _letter(offset: int, reason: str, error: str, redrives: int = 0) -> bytes:
    value = orjson.dumps({"request_id": f"r{offset}", "user_id": "u1", "ts": 5, "item_ids": [1]})
    return encode(dead_letter(topic="recall", partition=0, offset=offset, key=b"u1", value=value, error=error,
                              reason=reason, stage="streams", redrives=redrives))


def _headers(settings: object, topic: str, expect: int) -> list[int]:
    c = consumer(settings.kafka, f"h-{os.getpid()}-{topic}")  # type: ignore[attr-defined]
    c.subscribe([topic])
    out: list[int] = []
    try:
        for _ in range(100):
            for m in c.consume(10, timeout=0.3):
                if m.error() is None:
                    out.append(redrive_count(m.headers()))
            if len(out) >= expect:
                break
    finally:
        c.close()
    return out


@pytest.mark.integration
def test_dlq_show_whole_error_and_redrive_once(tmp_path: Path, broker: Broker) -> None:
    from tests.fixtures.settings import make_settings

    s = make_settings(tmp_path, broker, partitions=1)
    create_topics(s.kafka)
    long_error = "RecallEvent: ts: " + "x" * 80 + " the useful part at the end"
    p = producer(s.kafka)
    for letter in (_letter(0, "schema", long_error), _letter(1, "unknown_items", "item 9 unknown"),
                   _letter(2, "schema", "again", redrives=1)):
        p.produce("recall.dlq", letter, key=b"u1")
    assert p.flush(10) == 0

    shown = gpl("dlq", "show", "recall", "--bootstrap", s.kafka.bootstrap_servers)
    assert shown.returncode == 0, shown.stderr
    assert "the useful part at the end" in shown.stdout and "redrive_exhausted" in shown.stdout

    first = redrive(s, "recall.dlq", "schema", yes=True)
    assert (first["matched"], first["redriven"], first.get("past_limit", 0)) == (1, 1, 0), first
    assert _headers(s, "recall", 1) == [1]  # the count travels with the record
    second = redrive(s, "recall.dlq", "", yes=True)  # another filter: its own group, the whole DLQ
    assert (second["redriven"], second["already_redriven"], second["past_limit"]) == (1, 1, 1), second
    assert redrive(s, "recall.dlq", "", yes=True)["scanned"] == 0
    assert sorted(_headers(s, "recall", 2)) == [1, 1]


@pytest.mark.integration
def test_the_stream_dead_letters_a_redriven_failure_as_exhausted(tmp_path: Path, broker: Broker) -> None:
    from streams.app import StreamsProcessor
    from tests.fixtures.settings import make_settings
    from tests.helpers import drain, item_index, running, wait_for
    from tests.integration.test_streams import ITEMS

    s = make_settings(tmp_path, broker, partitions=1)
    create_topics(s.kafka)
    p = producer(s.kafka)
    bad = orjson.dumps({"request_id": "r1", "user_id": "u1", "ts": 5, "item_ids": "not a list"})
    p.produce("recall", bad, key=b"u1", headers=[(REDRIVE_HEADER, b"1")])
    p.produce("recall", bad.replace(b'"r1"', b'"r2"'), key=b"u1")  # never redriven: its own reason
    assert p.flush(10) == 0
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    with running(proc, "streams"):
        wait_for(lambda: sum(v for k, v in proc.accounting.snapshot().items() if k.startswith("dlq:")) >= 2, 60,
                 lambda: f"dead letters: {proc.accounting.snapshot()}")
        dlq = drain(s, "recall.dlq", expect=2)
    assert [(d["reason"], d.get("redrives")) for d in dlq] == [("redrive_exhausted", 1), ("schema", None)]
    assert dlq[0]["error"].startswith("schema after 1 redrive(s): ")
    assert proc.accounting["dlq:redrive_exhausted"] == 1
