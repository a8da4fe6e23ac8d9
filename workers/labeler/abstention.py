"""While the labeler abstains (no usable calibrator): hold the batches, relabel them when one loads.

Why: the shipped labeler labels only with a calibrator fitted for the catalogue (``gpl calibrate``), and
out of the box there is none. A labeler that merely counted its abstentions committed past every batch it
read before the calibrator came: a first replay into a fresh stack gave no pseudo-labels, ever, even after
``gpl calibrate`` had written one.

What happens instead (workers/labeler/loop.py drives it):

* an abstained batch is *held*, raw bytes and all, and its offset is not marked done, so the labeler's
  commits stop at it and a restart re-reads it (like a batch waiting for anchors);
* at most ``labeler.keep_abstained`` batches are held; past the bound the oldest goes to
  ``unexposed.dlq`` with reason ``abstained`` (counted ``dlq:abstained``; ``gpl dlq redrive`` replays it
  once a calibrator is in place) and its offset is done. Memory stays bounded and nothing is silent;
* the labeler looks at the calibrator file's (mtime, size) on every loop (:func:`file_signature`, one
  ``stat``), so a calibrator written by ``gpl calibrate`` is loaded within a poll; then every held batch
  is labeled in arrival order and counted ``relabelled`` (its samples are counted as any labeled batch's);
* on a rebalance the held batches of revoked partitions are ``released`` (the next owner re-reads
  them); at stop they are ``abstained_at_stop`` (uncommitted, re-read on restart).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gpl.runtime.settings import Settings
from schemas.fast_codec import Unexposed


@dataclass(frozen=True, slots=True)
class Held:
    """One abstained batch, kept to be relabelled (or dead-lettered with its original bytes)."""

    batch: Unexposed
    key: bytes | None
    raw: bytes
    partition: int
    offset: int

    @property
    def candidates(self) -> int:
        return int(self.batch.item_ids.shape[0])


class AbstainedHold:
    """The held batches, oldest first, at most ``bound`` of them."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._q: deque[Held] = deque()
        self.candidates = 0  # candidates of the held batches (the accounting's "waiting" part)

    def __len__(self) -> int:
        return len(self._q)

    def hold(self, h: Held) -> list[Held]:
        """Keep ``h``; returns the oldest batches pushed past the bound (the caller dead-letters them)."""
        self._q.append(h)
        self.candidates += h.candidates
        over: list[Held] = []
        while len(self._q) > self.bound:
            over.append(self._pop())
        return over

    def take(self, partitions: Iterable[int] | None = None) -> list[Held]:
        """Remove and return the held batches (all, or those of ``partitions``), oldest first."""
        if partitions is None:
            out = list(self._q)
            self._q.clear()
            self.candidates = 0
            return out
        parts = set(partitions)
        out = [h for h in self._q if h.partition in parts]
        self._q = deque(h for h in self._q if h.partition not in parts)
        self.candidates -= sum(h.candidates for h in out)
        return out

    def _pop(self) -> Held:
        h = self._q.popleft()
        self.candidates -= h.candidates
        return h


def file_signature(path: Path) -> tuple[int, int] | None:
    """(mtime ns, size) of the calibrator file, None when there is none: a change means "load it again"."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def missing_calibrator_hint(settings: Settings) -> str:
    """The first-run hint: what the labeler does without a calibrator, and the one command that fits one."""
    keep = settings.labeler.keep_abstained
    return (f"no calibrator at {settings.calibrator_file}: the labeler abstains (no pseudo-labels) until one is "
            f"fitted; fit it on your event file: `gpl --data-dir {settings.data_dir} calibrate DIR` (DIR holds the "
            f"file as events.jsonl). It is loaded as soon as it is written, and the last {keep} batches abstained "
            f"on are relabelled (labeler.keep_abstained)")
