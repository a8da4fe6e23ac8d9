"""The published area (``<checkpoints dir>/published/``): the files a server reads, changed under a lock.

Why a module of its own: the trainer writes it (a checkpoint that passes the gate) and operators change
it (``gpl publish --rollback``), while ``gpl export`` and ``gpl demo`` only read it; none of them scores
a model to do so (the gate's :class:`~workers.trainer.gate.Decision` is only what a publication records).

Its files:

* ``model-<version>.pt``: the serving copy of a checkpoint, in the checkpoint format but without the
  optimizer state, the seen-set and the holdout (``load_checkpoint`` and ``gpl export`` read it);
* ``current``: the pointer, the file name being served; the only file a server needs to watch;
* ``history.jsonl``: append-only ``publish`` and ``rollback`` events; replayed, they give the stack of
  published models that ``gpl publish --rollback`` pops.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import torch

from workers.trainer.checkpoints import atomic_write, serving_copy
from workers.trainer.gate import Decision
from workers.trainer.metrics import PUBLISH_TIME, PUBLISHED_VERSION

POINTER = "current"
HISTORY = "history.jsonl"
GATE_LOG = "gate.jsonl"


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "ab") as f:
        f.write(orjson.dumps(record) + b"\n")
        f.flush()


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


class PublishedArea:
    """The files a server reads: model copies, the ``current`` pointer, the history; changes under a lock,
    because the trainer publishes while an operator may roll back from ``gpl publish``."""

    def __init__(self, directory: Path, keep: int = 10) -> None:
        self.directory = directory
        self.keep = keep

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def current(self) -> Path | None:
        """The published model file the pointer names, or None."""
        pointer = self.directory / POINTER
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if path.is_file() else None

    def history(self) -> list[dict[str, Any]]:
        return _read_lines(self.directory / HISTORY)

    def decisions(self) -> list[dict[str, Any]]:
        return _read_lines(self.directory / GATE_LOG)

    def stack(self) -> list[dict[str, Any]]:
        """Published entries, oldest first, as the history leaves them: publish pushes, rollback pops."""
        out: list[dict[str, Any]] = []
        for event in self.history():
            if event["event"] == "publish":
                out.append(event)
            elif event["event"] == "rollback" and out:
                out.pop()
        return out

    def _point(self, name: str) -> None:
        atomic_write(self.directory / POINTER, lambda f: f.write(name.encode() + b"\n"))

    def publish(self, payload: dict[str, Any], decision: Decision) -> Path:
        """Copy the checkpoint's serving part, record it, then move the pointer (a reader never sees a
        pointer to a missing or torn file); prune model files deeper than ``keep`` in the stack."""
        with self._locked():
            path = self.directory / f"model-{int(payload['version']):06d}.pt"
            atomic_write(path, lambda f: torch.save(serving_copy(payload), f))
            _append_line(self.directory / HISTORY, {
                "event": "publish", "file": path.name, "version": int(payload["version"]), "at": decision.at,
                "auc": decision.to_json()["candidate_scores"]["auc"],
                "gauc": decision.to_json()["candidate_scores"]["gauc"],
            })
            self._point(path.name)
            live = {e["file"] for e in self.stack()[-self.keep:]} | {path.name}
            for old in self.directory.glob("model-*.pt"):
                if old.name not in live:
                    old.unlink(missing_ok=True)
        PUBLISHED_VERSION.set(int(payload["version"]))
        PUBLISH_TIME.set(decision.at)
        return path

    def rollback(self) -> dict[str, Any]:
        """Point back at the previously published model; returns its history entry."""
        with self._locked():
            stack = self.stack()
            if len(stack) < 2:
                raise ValueError(f"{self.directory}: {len(stack)} published model(s), nothing to roll back to")
            back, to = stack[-1], stack[-2]
            if not (self.directory / to["file"]).is_file():
                raise FileNotFoundError(f"{to['file']} was pruned (trainer.keep_published); cannot roll back to it")
            _append_line(self.directory / HISTORY, {"event": "rollback", "file": back["file"],
                                                    "version": back["version"], "to": to["file"], "at": time.time()})
            self._point(to["file"])
        PUBLISHED_VERSION.set(int(to["version"]))
        PUBLISH_TIME.set(time.time())
        return to

    def record(self, decision: Decision) -> None:
        with self._locked():
            _append_line(self.directory / GATE_LOG, decision.to_json())
