"""The benchmark's per-process CPU meter (gpl/bench/cpu.py), on this very process."""
from __future__ import annotations

import os
import sys
import time

import pytest

from gpl.bench.cpu import CpuMeter, cpu_seconds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_meter_sees_a_busy_process_and_leaves_out_the_gone() -> None:
    meter = CpuMeter({"me": os.getpid(), "gone": 2**22 + 12345, "none": None})
    t0 = time.monotonic()
    meter.start()
    end = time.thread_time() + 0.3
    while time.thread_time() < end:  # 0.3 s of CPU in this process
        pass
    cores = meter.stop()
    wall = time.monotonic() - t0  # longer than the meter's own: on a loaded machine 0.3 s of CPU takes more
    # cores = CPU s / wall s: at least the 0.3 s burnt (less /proc's 10 ms ticks) over the wall it took
    assert set(cores) == {"me"} and 0.25 / wall <= cores["me"] <= 1.5 * (os.cpu_count() or 1)
    assert cpu_seconds(2**22 + 12345) is None
