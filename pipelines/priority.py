"""The CPU priority of ingestion: batch work that gives way to the service's reads.

A run is throughput work: it loses nothing when it waits a few milliseconds for
a core. The service's requests are latency work: on a machine whose cores the
run keeps busy, every time slice the run takes from the service is a request
that waits. Runs therefore lower their own priority (``ETL_NICE``, the Unix
nice value, inherited by the parse process). When cores are free, nothing
changes; the database server's processes keep their own priority.
"""

from __future__ import annotations

import os


def lower_priority(niceness: int) -> int | None:
    """Raise this process's nice value to at least ``niceness``; never lower it.

    Returns the nice value in force afterwards, or ``None`` when ``niceness`` is 0
    or the system has no nice values.
    """
    if niceness <= 0 or not hasattr(os, "getpriority"):
        return None
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current >= niceness:
        return current
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:  # a sandbox that forbids it: run as we are
        return current
    return niceness
