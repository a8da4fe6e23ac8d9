"""How a trained SID model is kept on disk: one torch file written atomically, plus a JSON summary beside it.

The tokenizer (``tokenizer.pt``) and the generator (``generator.pt``) are separate artifacts with their own
format tags, but they are written and read the same way: a reader must never see half a file (the anchors
worker may load while ``gpl anchors train-*`` writes), and an artifact of another kind or format version
must be refused by name rather than half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_artifact(out_dir: Path | str, filename: str, blob: dict[str, Any], summary: dict[str, Any]) -> Path:
    """``out_dir/filename`` (torch, via a temporary file and a rename) and ``<stem>.json`` (the summary)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # a reader never sees half a file
    (out / f"{path.stem}.json").write_text(json.dumps(summary, indent=2))
    return path


def read_artifact(path: Path | str, filename: str, fmt: str) -> tuple[Path, dict[str, Any]]:
    """The blob of ``path`` (the file, or a directory holding ``filename``); refuses another ``format`` tag."""
    p = Path(path)
    if p.is_dir():
        p = p / filename
    blob = torch.load(p, weights_only=True)
    if blob.get("format") != fmt:
        raise ValueError(f"{p}: not a {fmt} artifact (format {blob.get('format')!r})")
    return p, blob
