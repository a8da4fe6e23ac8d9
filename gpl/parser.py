"""How ``gpl`` talks back: help that shows choices and defaults, and settings errors in one line.

Why a module of its own: every subcommand — each built by its own module in ``gpl/commands/`` —
must format its help the same way, which argparse only does when each sub-parser is built with the
same class; and a mistyped setting should read like a compiler error ("did you mean"), not like the
17-line pydantic traceback the settings model raises.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from typing import Any

from pydantic import ValidationError

from runtime.anchor_settings import FOREIGN_OPTION
from runtime.settings import Settings, SettingsError, section_fields
from schemas.plain import plain


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps hand-wrapped descriptions and appends ``(default: X)`` to every option with a default.

    Nothing is appended when the help already names its default, or when there is none to show
    (None, False of a flag, an empty list).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS  # identity: 0 and 0.0 are defaults worth showing
        if "default" in text.lower() or nothing:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-parsers (every command module's) inherit :class:`HelpFormatter`.

    ``add_subparsers`` builds sub-parsers with ``type(self)``, so the formatter reaches every level.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        """The help in plain text: commands' docstrings lose their reStructuredText markup."""
        return plain(super().format_help())

    def format_usage(self) -> str:
        return plain(super().format_usage())


def _names_at(path: tuple[str, ...]) -> frozenset[str] | None:
    """The names a settings field at ``path`` may have (None when its parent is not a section).

    Through :func:`~runtime.settings.section_fields`, so ``anchors`` offers every backend's fields.
    """
    if len(path) == 1:
        return frozenset(Settings.model_fields)
    return section_fields(path[0]) if len(path) == 2 else None


def did_you_mean(path: tuple[str, ...]) -> str:
    """`` (did you mean kafka.partitions?)`` for a mistyped dotted name, else an empty string."""
    names = _names_at(path)
    if names is None or not path:
        return ""
    close = difflib.get_close_matches(path[-1], sorted(names), n=1, cutoff=0.6)
    return f"; did you mean {'.'.join((*path[:-1], close[0]))}?" if close else ""


def _env_name(path: tuple[str, ...]) -> str:
    return "GPL_" + "__".join(p.upper() for p in path)


def explain(err: BaseException) -> list[str]:
    """One line per problem of a settings error (a pydantic ValidationError, a bad TOML file, ...)."""
    if isinstance(err, ValidationError | SettingsError):
        lines = []
        errors = SettingsError(err.errors(include_input=False)).errors if isinstance(err, ValidationError) \
            else err.errors  # SettingsError names settings as they are set (anchors.k, not anchors.content.k)
        for e in errors:
            path = tuple(str(p) for p in e["loc"])
            name = ".".join(path)
            if e["type"] == FOREIGN_OPTION:  # its message names the key and the backend that owns it
                lines.append(e["msg"])
            elif e["type"] == "extra_forbidden":
                lines.append(f"unknown setting {name} (--set {name}=… or {_env_name(path)}){did_you_mean(path)}")
            else:  # never the value: it may be a secret in the wrong place
                lines.append(f"bad setting {name}: {e['msg']}")
        return lines
    if isinstance(err, tomllib.TOMLDecodeError):
        return [f"config file is not valid TOML: {err}"]
    if isinstance(err, OSError):
        return [f"config file: {err.strerror or err}: {err.filename}"]
    return [str(err).splitlines()[0] if str(err) else type(err).__name__]
