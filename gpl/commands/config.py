"""``gpl config show``: the effective settings (defaults, file, environment, ``--set``) as JSON."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from runtime.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    cf = sub.add_parser("config", help="settings").add_subparsers(metavar="ACTION")
    cf.add_parser("show", help="print the effective settings as JSON").set_defaults(run=run_show)


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the effective settings; secrets and URL credentials are masked (runtime/redact.py)."""
    from runtime.redact import public_settings

    print(orjson.dumps(public_settings(settings), option=orjson.OPT_INDENT_2).decode())
    return 0
