"""Operator commands fail in one line that says what to do, and stay quiet when their reader leaves.

Why: ``gpl topics``, ``dlq``, ``schemas`` and ``export`` are what an operator runs during an incident,
often in a pipeline (``gpl topics list | head``). A 60-line traceback for an unreachable broker or
registry hides the one fact that matters, and a BrokenPipeError from a closed pipe reads like a second
incident. :func:`run_command` runs a command and turns the failures an operator can fix into one
``gpl: ...`` line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from runtime.settings import Settings

BROKER_HINT = "start it (gpl up prints its address) or point kafka.bootstrap_servers / --bootstrap at a live one"


class OperatorError(Exception):
    """A failure the operator can fix; its text is the whole message (one line, with what to do)."""


def require_broker(settings: Settings, timeout: float = 5.0) -> None:
    """Fail in one line when no broker is configured or none answers within ``timeout`` seconds.

    A metadata request with librdkafka's own log off: its connection errors would otherwise print a line
    per retry on stderr before the command's own message."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    where = settings.kafka.bootstrap_servers
    if not where:
        raise OperatorError("no broker configured: give --bootstrap HOST:PORT or set kafka.bootstrap_servers "
                            "(GPL_KAFKA__BOOTSTRAP_SERVERS; gpl up prints the embedded one)")
    admin = AdminClient({**settings.kafka.client_config(), "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as e:
        raise OperatorError(f"cannot reach the Kafka broker at {where} ({_kafka_text(e)}): {BROKER_HINT}") from None


def _kafka_text(e: BaseException) -> str:
    err: Any = e.args[0] if e.args else None
    text = err.str() if err is not None and hasattr(err, "str") else str(e)
    return str(text).splitlines()[0] if text else type(e).__name__


def explain(e: BaseException, settings: Settings) -> str | None:
    """The one line for a failure an operator can fix, None for anything else (a bug: keep the traceback)."""
    from confluent_kafka import KafkaException

    from runtime.kafka_dist import KafkaUnavailable

    if isinstance(e, OperatorError | KafkaUnavailable):  # KafkaUnavailable: no Java or Maven, what to install
        return str(e)
    if isinstance(e, KafkaException):
        where = settings.kafka.bootstrap_servers or "(none configured)"
        return f"Kafka at {where}: {_kafka_text(e)}; {BROKER_HINT}"
    if isinstance(e, FileNotFoundError):
        what = str(e.filename or e)
        hint = " (checkpoints: gpl run --stage trainer writes them under <data_dir>/checkpoints)" \
            if "checkpoint" in what or what.endswith(".pt") else ""
        return f"{what}: no such file or directory; check the path{hint}"
    if isinstance(e, PermissionError):
        return f"{e.filename or e}: permission denied"
    if type(e).__module__.split(".")[0].startswith("httpx") and "Error" in type(e).__name__:
        url = settings.schema_registry.url or "(none configured)"
        return f"cannot reach the schema registry at {url} ({str(e).splitlines()[0] if str(e) else type(e).__name__})" \
               ": start it or fix schema_registry.url (GPL_SCHEMA_REGISTRY__URL)"
    return None


def run_command(run: Callable[[argparse.Namespace, Settings], int | None], args: argparse.Namespace,
                settings: Settings) -> int:
    """Exit status of ``run``: fixable failures as one stderr line (2), a closed stdout quietly (0)."""
    try:
        code = int(run(args, settings) or 0)
        sys.stdout.flush()  # here, not at exit: a reader gone (| head) raises now, where it is handled
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except Exception as e:
        line = explain(e, settings)
        if line is None:
            raise
        print(f"gpl: {line}", file=sys.stderr)
        return 2


def _quiet_stdout() -> None:
    """stdout to /dev/null: the interpreter's last flush would otherwise report the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
