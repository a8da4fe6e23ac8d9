"""reStructuredText markup out of text that people read as plain text.

Why: the docstrings of this project are written for Sphinx-style readers (``field``, :class:`Model`),
and two places show them to people who see only characters: ``gpl ... --help`` (argparse prints the
module docstrings of the commands) and the exported JSON Schemas (pydantic copies class docstrings into
``description``, which producers in other languages and the registry's UI display). Both pass their text
through :func:`plain` so neither prints double backquotes or role names.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")  # :class:`x`, :py:func:`~a.b` → x, a.b
_LITERAL = re.compile(r"``([^`]+)``")  # ``x`` → x
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_")  # `text <url>`_ → text


def plain(text: str) -> str:
    """The text with inline reStructuredText roles, literals and links reduced to their words."""
    return _LITERAL.sub(r"\1", _LINK.sub(r"\1", _ROLE.sub(r"\1", text)))


def has_markup(text: str) -> bool:
    """Whether raw reStructuredText inline markup is left in the text (what tests look for)."""
    return bool(_ROLE.search(text) or _LITERAL.search(text) or _LINK.search(text))
