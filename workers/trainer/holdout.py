"""The held-out slice of real labels that the publishing gate scores checkpoints on.

Why a module of its own: which samples are held out is decided by the trainer's engine for every sample
(never trained, by any checkpoint, after any restart or replay), the rows are saved in every checkpoint,
and the gate (``workers/trainer/gate.py``) scores them; the slice is one thing the three share.

* A deterministic ``trainer.holdout_fraction`` of real-label samples, chosen by the hash of the sample id
  (:func:`is_holdout`), is never trained, and the most recent ``trainer.holdout_max`` of them are kept in
  the checkpoint (:class:`Holdout`).
* :class:`HoldoutRows`: those rows with their content vectors (and history profiles, anchor cross
  feature), ready for both models of a gate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workers.history import profile_of
from workers.model import item_buckets, user_buckets

HOLDOUT_SLOTS = 10_000  # holdout_fraction resolution: 0.01 %


def is_holdout(key: int, fraction: float) -> bool:
    """Whether the sample with hash ``key`` (``sample_key``) is held out: the same answer in every run."""
    return key % HOLDOUT_SLOTS < round(fraction * HOLDOUT_SLOTS)


@dataclass(frozen=True)
class HoldoutRows:
    """Held-out samples with their content vectors, ready to score."""

    users: list[str]
    items: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, dim)
    labels: np.ndarray  # float32 (n,), 0 or 1
    history: np.ndarray | None = None  # float32 (n, dim): the rows' history profiles (a model with history)
    anchor: np.ndarray | None = None  # float32 (n, 2): the rows' anchor cross feature (a model with anchor_cross)

    _buckets: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.users)

    def buckets(self, kind: str, n: int) -> np.ndarray:
        """Hash buckets of the users or items, computed once for both models of a gate."""
        if (kind, n) not in self._buckets:
            self._buckets[kind, n] = user_buckets(self.users, n) if kind == "user" else item_buckets(self.items, n)
        return self._buckets[kind, n]


class Holdout:
    """The most recent held-out real labels (user, item, label, history items or None), bounded, saved in
    every checkpoint. The history items are the user's clicks before the row's request (a model that reads
    history is scored with the history it would have had), and the anchor cross feature it was trained with."""

    def __init__(self, capacity: int) -> None:
        self.rows: deque[tuple[str, int, float, tuple[int, ...] | None, tuple[float, ...] | None]] = deque(
            maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, user_id: str, item_id: int, label: float, history: list[int] | None = None,
            anchor: np.ndarray | list[float] | None = None) -> None:
        self.rows.append((user_id, int(item_id), float(label), None if history is None else tuple(history),
                          None if anchor is None else tuple(float(a) for a in anchor)))

    def state(self) -> dict[str, Any]:
        """Plain lists and tensors only: checkpoints are loaded with ``weights_only``."""
        out: dict[str, Any] = {
            "users": [r[0] for r in self.rows],
            "items": torch.tensor([r[1] for r in self.rows], dtype=torch.int64),
            "labels": torch.tensor([r[2] for r in self.rows], dtype=torch.float32),
        }
        if any(r[3] is not None for r in self.rows):
            out["history"] = [list(r[3] or ()) for r in self.rows]
        if any(r[4] is not None for r in self.rows):
            out["anchor"] = [list(r[4] or ()) or None for r in self.rows]
        return out

    def restore(self, state: dict[str, Any] | None) -> None:
        self.rows.clear()
        if state:
            hist = state.get("history") or [None] * len(state["users"])
            anchor = state.get("anchor") or [None] * len(state["users"])
            for u, i, y, h, a in zip(state["users"], state["items"].tolist(), state["labels"].tolist(), hist, anchor,
                                     strict=True):
                self.add(u, i, y, h, a)

    def item_ids(self) -> set[int]:
        return {r[1] for r in self.rows} | {i for r in self.rows for i in (r[3] or ())}

    def with_vectors(self, vectors: dict[int, np.ndarray], dim: int, history: bool = False) -> HoldoutRows:
        """The rows whose item has a vector (an item deleted from the index since is left out); with
        ``history``, each row's history profile from its history items' vectors."""
        kept = [r for r in self.rows if r[1] in vectors]
        hist = None
        if history:
            profiles = [profile_of(r[3] or (), vectors, dim) for r in kept]
            hist = np.stack(profiles) if profiles else np.zeros((0, dim), np.float32)
        return HoldoutRows(
            users=[r[0] for r in kept],
            items=np.asarray([r[1] for r in kept], np.int64),
            vectors=np.stack([vectors[r[1]] for r in kept]) if kept else np.zeros((0, dim), np.float32),
            labels=np.asarray([r[2] >= 0.5 for r in kept], np.float32),
            history=hist,
            anchor=np.asarray([r[4] if r[4] is not None else (0.0, 0.0) for r in kept], np.float32).reshape(-1, 2),
        )
