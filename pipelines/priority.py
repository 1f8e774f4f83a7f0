"""The CPU priority of ingestion: batch work that gives way to the service's reads.

A run is throughput work: it loses nothing when it waits a few milliseconds for
a core. The service's requests are latency work: on a machine whose cores the
run keeps busy, every time slice the run takes from the service is a request
that waits. Runs therefore lower their priority (``ETL_NICE``, a Unix nice
value): their own process, the parse process (which inherits it), and the
PostgreSQL backends of their sessions when the server runs on this host.

A nice value alone is not enough on Linux. With autogroups on
(``/proc/sys/kernel/sched_autogroup_enabled``, the default of most kernels for
processes outside a CPU cgroup), the scheduler first shares the CPU evenly
between sessions and only then, by nice value, between the processes of one
session: a nice value orders a process against its own session only. The
service starts its run in a session of its own, and PostgreSQL starts every
backend in a session of its own, so each of them is a group of its own, and
only the group's nice value (``/proc/PID/autogroup``) moves it against the
service. Where the process leads its session, that is set too. Under a CPU
cgroup (systemd units, containers) the cgroup's weight decides instead, and
the nice value orders the run against the service only within one cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

_AUTOGROUP_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")


def _autogroups_on() -> bool:
    try:
        return _AUTOGROUP_ENABLED.read_text().strip() == "1"
    except OSError:
        return False


def autogroup_nice(pid: int) -> int | None:
    """The nice value of the autogroup of ``pid`` (``None``: no autogroups here)."""
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()
    except OSError:
        return None
    # "/autogroup-85 nice 0"
    parts = text.split()
    try:
        return int(parts[parts.index("nice") + 1])
    except (ValueError, IndexError):
        return None


def _raise_autogroup_nice(pid: int, niceness: int) -> bool:
    """Raise the nice value of the autogroup ``pid`` leads to ``niceness``; never lower it.

    Only a session leader's group is touched: that group holds its session and
    nothing else of the caller's. Returns whether the group's nice value is at
    least ``niceness`` afterwards.
    """
    try:
        if os.getsid(pid) != pid:
            return False
    except OSError:
        return False
    current = autogroup_nice(pid)
    if current is None:
        return False
    if current >= niceness:
        return True
    path = Path(f"/proc/{pid}/autogroup")
    # The kernel takes one change per tenth of a second from an unprivileged user.
    for _ in range(5):
        try:
            path.write_text(str(niceness))
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                time.sleep(0.11)
                continue
            return False
        return True
    return False


def lower_process_priority(pid: int, niceness: int, group_niceness: int | None = None) -> bool:
    """Raise the nice value of process ``pid`` (0: this one) to ``niceness``, and,
    when autogroups are on, that of the autogroup it leads to ``group_niceness``
    (default ``niceness``); never lower either.

    Returns whether the process's own nice value is now at least ``niceness``.
    """
    if niceness <= 0 or not hasattr(os, "getpriority"):
        return False
    try:
        if os.getpriority(os.PRIO_PROCESS, pid) < niceness:
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
    except OSError:  # another user's process, or a sandbox that forbids it
        return False
    group = niceness if group_niceness is None else min(niceness, group_niceness)
    if group > 0 and _autogroups_on():
        with contextlib.suppress(OSError):
            _raise_autogroup_nice(pid or os.getpid(), group)
    return True


def lower_helper_priority(pid: int, niceness: int) -> bool:
    """Give process ``pid``, which works for this one (a database session's
    backend), this process's priority lowered to ``niceness``: its nice value,
    and its autogroup's only as far as this process's own group went.

    A helper niced further than the process it works for would slow the whole
    run on an otherwise idle machine, each waiting for the other.
    """
    own_group = autogroup_nice(os.getpid()) if _autogroups_on() else None
    return lower_process_priority(pid, niceness, own_group or 0)


def lower_priority(niceness: int) -> int | None:
    """Raise this process's nice value (and its session's, when it leads one) to at
    least ``niceness``; never lower it.

    Returns the nice value in force afterwards, or ``None`` when ``niceness`` is 0
    or the system has no nice values.
    """
    if niceness <= 0 or not hasattr(os, "getpriority"):
        return None
    lower_process_priority(0, niceness)
    return os.getpriority(os.PRIO_PROCESS, 0)
