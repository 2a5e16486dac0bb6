"""CPU time used by processes, from /proc: what a request costs, whatever else the machine runs.

Rates on a shared 2-core machine move with everything else running on it; the CPU seconds a
server spends per request move much less, and on a CPU-bound server they decide the rate.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (those that have exited count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields 14 and 15 of stat (utime, stime); the split starts at field 3.
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS_PER_SECOND
