"""CPU cores each process of a benchmark used over a measured window, read from ``/proc``.

Why: on a small machine the stages, the broker and the driver share the cores, and "which process is
full" is the first question a throughput figure raises. ``/proc/<pid>/stat`` counts every thread of a
process (librdkafka's and aiokafka's included), in clock ticks; a process that ended or that the
platform does not expose is left out rather than guessed.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


class CpuMeter:
    """Cores used by named processes between :meth:`start` and :meth:`stop` (CPU seconds / wall seconds)."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._t0 = 0.0
        self._c0: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = {n: c for n, p in self.pids.items() if (c := cpu_seconds(p)) is not None}

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        out = {}
        for name, c0 in self._c0.items():
            c1 = cpu_seconds(self.pids[name])
            if c1 is not None:
                out[name] = round((c1 - c0) / wall, 2)
        return out
