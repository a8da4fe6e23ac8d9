"""``gpl``: the command line of GPL stream.

Settings come from (lowest to highest) defaults, ``--config FILE`` (TOML; or ``GPL_CONFIG``), the
environment (``GPL_<SECTION>__<FIELD>``, e.g. ``GPL_KAFKA__BOOTSTRAP_SERVERS``) and ``--set
section.field=value``. This is the only place that reads the environment.
"""

from __future__ import annotations

import os

# numpy's small matmuls (anchors × candidates) lose badly to OpenBLAS thread spinning on a busy host;
# set before numpy is first imported. torch keeps its own intra-op pool for the LLM and the trainer.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
settings: every field of `gpl config show` can be set in a TOML file (--config), in the environment
as GPL_<SECTION>__<FIELD> (e.g. GPL_KAFKA__BOOTSTRAP_SERVERS=kafka:9092, GPL_QDRANT__URL=http://qdrant:6333,
GPL_ANCHORS__BACKEND=openai) or with --set section.field=value. Without bootstrap servers a local broker
is started (broker.kind: the embedded Tansu one, or Apache Kafka); without a Qdrant URL the embedded Qdrant
engine runs in --data-dir.
"""


def version() -> str:
    """The installed distribution's version (the source tree's pyproject when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gpl-stream")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # no parser, no settings: < 0.3 s
        print(f"gpl {version()}")
        raise SystemExit(0)  # as argparse's --version action does
    from gpl.commands import progress
    from gpl.parser import explain
    from runtime.kafka import use_topic_names
    from runtime.settings import load

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    if hasattr(args, "no_progress") and not progress():  # commands' --no-progress: implied off a terminal
        args.no_progress = True
    overrides: dict[str, Any] = {}
    for item in [*(args.set or []), *getattr(args, "set_late", [])]:  # --set before or after the command
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            parser.error(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        cur = overrides
        *path, leaf = key.strip().split(".")
        for p in path:
            cur = cur.setdefault(p, {})
        cur[leaf] = value
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if getattr(args, "bootstrap", None):  # commands that can target another cluster
        overrides.setdefault("kafka", {})["bootstrap_servers"] = args.bootstrap
    if getattr(args, "broker", None):  # commands that start a local broker: which one
        overrides.setdefault("broker", {})["kind"] = args.broker
    try:
        settings = load(args.config, **overrides)
        use_topic_names(settings.kafka)  # kafka.topic_prefix, kafka.topic_names: for every command
    except (ValueError, OSError) as e:  # pydantic's ValidationError is a ValueError
        for line in explain(e):
            print(f"gpl: {line}", file=sys.stderr)
        return 2
    from runtime.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)  # text, or one JSON object a line
    for noisy in ("aiokafka", "faust", "mode", "httpx", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    from runtime.health import serve_http
    from runtime.redact import install

    install(settings)  # URL credentials and configured secrets never reach a log line
    # only the commands that run stages serve /metrics and the probes: a one-shot command (replay, topics, dlq)
    # run in the shell of a stack that exported GPL_METRICS_PORT must not take the stack's port (or die on it)
    if settings.metrics_port and getattr(args, "serves_metrics", False):
        serve_http(settings.metrics_port, settings.metrics_host, stall_s=settings.health.stall_s)  # + probes
    from gpl.oneline import run_command

    return run_command(args.run, args, settings)  # fixable failures in one line, a closed pipe quietly


def build_parser() -> argparse.ArgumentParser:
    """The ``gpl`` parser: the global options here, every command from its module in gpl/commands/."""
    from gpl.commands import COMMANDS
    from gpl.parser import Parser

    p = Parser(prog="gpl", description="GPL stream: streaming Generative Pseudo-Labeling for pre-ranking.",
               epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("--config", type=Path, help="TOML settings file (also GPL_CONFIG)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one setting")
    p.add_argument("--data-dir", help="broker log, vector engine, checkpoints, models (GPL_DATA_DIR)")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gpl.commands.{name}")
        except ImportError as e:  # a command whose optional dependency is missing: the others still work
            logging.getLogger(__name__).debug("command module %s not available: %s", name, e)
            continue
        module.register(sub)
    _format_all(p)
    return p


def _format_all(parser: argparse.ArgumentParser) -> None:
    """Every (sub)parser shows choices and defaults the same way, whichever module built it, and every
    command takes ``--set`` after its name too (``gpl up --set broker.storage=s3``)."""
    from gpl.parser import HelpFormatter

    parser.formatter_class = HelpFormatter
    if "run" in parser._defaults and "--set" not in parser._option_string_actions:
        parser.add_argument("--set", action="append", dest="set_late", default=argparse.SUPPRESS,
                            metavar="SECTION.FIELD=VALUE", help="override one setting (also before the command)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _format_all(child)
        elif not action.help and action.default not in (None, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"  # an option without help still shows its default


if __name__ == "__main__":
    sys.exit(main())
