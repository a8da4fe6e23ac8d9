"""While the labeler abstains (no usable calibrator): hold the batches, relabel them when one loads.

Why: the shipped labeler labels only with a calibrator fitted for the catalogue (``gpl calibrate``), and
out of the box there is none. A labeler that merely counted its abstentions committed past every batch it
read before the calibrator came: a first replay into a fresh stack gave no pseudo-labels, ever, even after
``gpl calibrate`` had written one.

What happens instead (the hold is :class:`~workers.labeler.engine.AbstainedHold`, the loop drives it):

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
from pathlib import Path

from runtime.settings import Settings


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
