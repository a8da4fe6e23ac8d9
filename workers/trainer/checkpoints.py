"""Checkpoint files of the trainer: numbered, atomic, with a ``latest`` pointer.

Split out of the trainer's loop (``workers/trainer/loop.py``) so the publishing gate and the published
area (``workers/trainer/publish.py``, ``published_area.py``) can read and write checkpoints without
importing the worker that calls them (no import cycles).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson
import torch

from workers.model import ModelConfig, PreRanker

log = logging.getLogger(__name__)
FORMAT = "gpl-preranker/1"
LATEST = "latest"
CKPT_RE = re.compile(r"^ckpt-(\d{6,})\.pt$")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk, not only the file's bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a hidden temp file in the same directory, fsync, then rename over ``path``.

    A reader (or a restart after a crash) sees the old file or the new one, never a torn one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def checkpoint_path(directory: Path, version: int) -> Path:
    return directory / f"ckpt-{version:06d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Numbered checkpoints in ``directory``, oldest first (temp files are never listed)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    """The file the ``latest`` pointer names, else the highest-numbered one, else None."""
    pointer = directory / LATEST
    if pointer.is_file():
        p = directory / pointer.read_text().strip()
        if p.is_file():
            return p
        log.warning("latest pointer names missing %s; using the highest-numbered checkpoint", p)
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: Path, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` as ``ckpt-<version>.pt``, then the ``latest`` pointer, then prune old ones.

    Order matters: the pointer only ever names a complete file, and pruning never removes it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, int(payload["version"]))
    atomic_write(path, lambda f: torch.save(payload, f))
    atomic_write(directory / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


# below this a checkpoint's wall_time is epoch seconds (as written before it was ms): 1e11 s is the year 5138,
# 1e11 ms is 1973, so no checkpoint time is read either way
LEGACY_SECONDS = 1e11


def read_checkpoint(path_or_dir: Path | str) -> dict[str, Any]:
    """The raw checkpoint dict (tensors and plain values only, so ``weights_only`` loading is safe)."""
    p = Path(path_or_dir)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {p}")
        p = found
    ckpt: dict[str, Any] = torch.load(p, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{p}: not a {FORMAT} checkpoint (format {ckpt.get('format')!r})")
    ckpt["path"] = str(p)
    wall = ckpt.get("wall_time")
    if isinstance(wall, float) and wall < LEGACY_SECONDS:  # written in epoch seconds before: read in ms
        ckpt["wall_time"] = round(wall * 1000)
    return ckpt


def load_checkpoint(path_or_dir: Path | str) -> tuple[PreRanker, dict[str, Any]]:
    """The model of a checkpoint (file, or directory → its latest) in eval mode, and its metadata.

    The metadata is the checkpoint without the model/optimizer states and the seen-set.
    """
    ckpt = read_checkpoint(path_or_dir)
    if ckpt["model_config"] is None:
        raise ValueError(f"{ckpt['path']}: written before the first sample was trained; no model yet")
    model = PreRanker(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model_state", "optimizer_state", "seen", "holdout")}
    meta.setdefault("seen_count", int(ckpt["seen"].numel()))  # a serving copy carries the count, not the set
    meta["config_hash"] = config_hash(ckpt)
    return model, meta


def config_hash(ckpt: dict[str, Any]) -> str:
    """A short hash of everything that shaped the model: network shape, trainer settings, encoder space.

    Two exports with the same hash were trained under the same configuration (not on the same data).
    """
    keys = ("model_config", "trainer_settings", "encoder", "collection")
    blob = orjson.dumps({k: ckpt.get(k) for k in keys}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:16]


def serving_copy(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without what only training needs (optimizer state, seen-set, holdout): about a third
    of the size, still readable by :func:`load_checkpoint`, never a point to resume training from."""
    out = {k: v for k, v in payload.items() if k not in ("optimizer_state", "seen", "holdout", "path")}
    out["optimizer_state"] = {}
    out["seen"] = torch.zeros(0, dtype=torch.int64)
    out["seen_count"] = int(payload["seen"].numel())
    return out
