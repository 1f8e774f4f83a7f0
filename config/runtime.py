"""How a loading process runs: its garbage collector.

A load allocates and frees millions of records, and nearly all of them are
freed by reference counting, never in cycles. With the default thresholds the
collector ran thousands of times during a 1M-row CSV load, each pass walking
the objects of every batch in flight and every module imported: about a quarter
of the CPU of the loader and its parse process (docs/performance.md).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
"""Net allocations of container objects between two collections of the youngest
generation (CPython's default is 700); the older generations keep their ratios."""


def collect_rarely() -> None:
    """Move every object alive now (the imported modules) out of the collector's
    sight for good, and collect the young generation after ``YOUNG_THRESHOLD``
    allocations. Cycles are still collected, only less often."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
