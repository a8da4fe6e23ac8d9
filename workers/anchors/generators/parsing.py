"""Tolerant parsing and validation of a model's answer, and the documented fallback.

Small models wrap JSON in code fences, truncate it at the token budget, switch to numbered lists, repeat
themselves or echo the worked example: :func:`parse_anchors` salvages what is usable and
:func:`clean_anchors` rejects the rest. When every attempt failed, :func:`fallback_anchors` makes the
user's most recent positive items' own texts the anchors: each sits exactly on an item the user liked, so
matching degrades to item-to-item similarity instead of failing.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workers.anchors.generators.prompt import EXAMPLE_ANCHORS, MAX_ANCHOR_CHARS, MAX_ANCHOR_WORDS

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- parse/validate

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.DOTALL)
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_LIST_LINE = re.compile(r"^\s*(?:\d{1,2}\s*[.):-]|[-*•+])\s*(.+?)\s*$")
_PLACEHOLDER = re.compile(r"^(?:interests?|anchors?|items?|topics?|descriptions?)\s*\d*$|^\.+$|^\W*$",
                          re.IGNORECASE)
_KEYS = {"interests", "interest", "anchors", "items", "topics"}


def parse_anchors(raw: str, k: int, history: Sequence[str] = ()) -> list[str]:
    """Interest strings from a model's raw answer, validated; ``[]`` when nothing usable is in it.

    Tried in order, first non-empty result wins: JSON (an object with an ``interests``-like list, or a
    bare array) anywhere in the text after stripping code fences; the complete quoted strings of a
    truncated JSON array; numbered or bulleted lines; short plain lines. ``history`` (the item texts
    the model saw) tells an echo of the worked example from a genuine interest (see clean_anchors).
    """
    text = raw.strip()
    fenced = _FENCE.search(text)
    if fenced:  # the fenced block if it has content, else whatever is around the fence markers
        inside = fenced.group(1).strip()
        text = inside or re.sub(r"```[a-zA-Z0-9_-]*", "", text).strip()
    for candidates in (_from_json(text), _from_quoted(text), _from_lines(text, bulleted=True),
                       _from_lines(text, bulleted=False)):
        anchors = clean_anchors(candidates, k, history)
        if anchors:
            return anchors
    return []


def _from_json(text: str) -> list[str]:
    dec = json.JSONDecoder()
    for start, ch in enumerate(text):
        if ch not in "[{":
            continue
        try:
            obj, _ = dec.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        found = _strings_of(obj)
        if found:
            return found
    return []


def _strings_of(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        lists = [v for key, v in obj.items() if str(key).lower() in _KEYS and isinstance(v, list)]
        lists = lists or [v for v in obj.values() if isinstance(v, list)]
        return _strings_of(lists[0]) if lists else []
    if isinstance(obj, list):
        out: list[str] = []
        for el in obj:
            if isinstance(el, str):
                out.append(el)
            elif isinstance(el, dict):  # [{"interest": "..."}]: take its first string value
                out.extend([v for v in el.values() if isinstance(v, str)][:1])
        return out
    return []


def _from_quoted(text: str) -> list[str]:
    """Complete quoted strings after the first ``[``: what survives of JSON cut at the token budget."""
    bracket = text.find("[")
    if bracket < 0:
        return []
    out = []
    for m in _QUOTED.finditer(text, bracket):
        try:
            out.append(json.loads(f'"{m.group(1)}"'))
        except json.JSONDecodeError:
            out.append(m.group(1))
    return [s for s in out if s.lower() not in _KEYS]


def _from_lines(text: str, *, bulleted: bool) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if bulleted:
        return [m.group(1) for ln in lines if (m := _LIST_LINE.match(ln))]
    if len(lines) < 2:  # one plain sentence is prose, not a list of interests
        return []
    return [ln.strip() for ln in lines if not ln.rstrip().endswith(":")]  # "Here are ...:" is a header


def clean_anchors(candidates: Sequence[str], k: int, history: Sequence[str] = ()) -> list[str]:
    """Normalise, drop empties, placeholders, over-long strings and echoes of the example; dedupe; ≤ k.

    An echo is one of the worked example's answers (as shown for this k) that shares no word with the
    user's history: the model copied the example ("healthy snacks" tacked onto a gamer's list) rather
    than read the user. The same string grounded in the history ("hiking" for hiking boots) stays.
    """
    example = {a.lower() for a in EXAMPLE_ANCHORS[: max(1, min(k, len(EXAMPLE_ANCHORS)))]}  # as shown
    stems = _stems(" ".join(history))
    out: list[str] = []
    seen: set[str] = set()
    for c in candidates:
        s = " ".join(str(c).split()).strip(" \"'`.,;:*-")
        if not s or _PLACEHOLDER.match(s):
            continue
        if len(s) > MAX_ANCHOR_CHARS or len(s.split()) > MAX_ANCHOR_WORDS:
            continue
        key = s.lower()
        if key in seen or (key in example and not _stems(s) & stems):
            continue
        seen.add(key)
        out.append(s)
        if len(out) >= k:
            break
    return out


def _stems(text: str) -> set[str]:
    """Crude stems for the echo check: lower-cased words of 3+ letters cut to 4 ("snacks" ~ "snack")."""
    return {w[:4] for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3}


def fallback_anchors(history: Sequence[str], k: int) -> list[str]:
    """The fallback anchors: the most recent distinct history texts, newest first, cut to anchor length.

    An anchor equal to a liked item's text embeds onto (or next to) that item's own vector, so
    pseudo-labels from a fallback set reduce to "similar to something the user just liked".
    """
    out: list[str] = []
    seen: set[str] = set()
    for text in reversed(history):
        words = text.split()[:MAX_ANCHOR_WORDS]
        s = " ".join(words)[:MAX_ANCHOR_CHARS].strip()
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
        if len(out) >= k:
            break
    return out
