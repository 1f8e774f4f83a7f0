"""``lower_priority``: runs raise their nice value, never lower it (in a child
process, so the test run keeps its own priority)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from persistence.database import _server_is_local
from pipelines.priority import autogroup_nice

SCRIPT = """
import os, sys
from pipelines.priority import lower_priority
os.setpriority(os.PRIO_PROCESS, 0, int(sys.argv[1]))
print(lower_priority(int(sys.argv[2])), os.getpriority(os.PRIO_PROCESS, 0))
"""


def _run(script: str, *args: int, own_session: bool = False) -> str:
    """``script`` in a fresh interpreter (in a session of its own if asked): its output."""
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        start_new_session=own_session,
    )
    return done.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no nice values")
@pytest.mark.parametrize(
    ("start", "wanted", "printed"),
    [
        (0, 10, "10 10"),  # raised
        (15, 10, "15 15"),  # already lower: left as it is
        (3, 0, "None 3"),  # 0: untouched
    ],
)
def test_lower_priority_raises_the_nice_value_and_never_lowers_it(
    start: int, wanted: int, printed: str
) -> None:
    assert _run(SCRIPT, start, wanted) == printed


GROUP_SCRIPT = """
import os, subprocess, sys
from pipelines.priority import autogroup_nice, lower_helper_priority, lower_priority
lower_priority(int(sys.argv[1]))
helper = subprocess.Popen(["sleep", "30"], start_new_session=True)
try:
    lower_helper_priority(helper.pid, int(sys.argv[2]))
    print(autogroup_nice(os.getpid()), os.getpriority(os.PRIO_PROCESS, helper.pid),
          autogroup_nice(helper.pid))
finally:
    helper.kill()
    helper.wait()
"""


def _autogroups_on() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(not _autogroups_on(), reason="no autogroups on this kernel")
@pytest.mark.parametrize(
    ("own_session", "niceness", "helper_niceness", "printed"),
    [
        # Leading its session, the process lowers its group; a helper follows it.
        (True, 10, 10, "10 10 10"),
        # A helper's group never goes further than its caller's.
        (True, 5, 12, "5 12 5"),
        # In its parent's session it leaves the group (the caller's shell) alone,
        # and so its helpers keep theirs: a run never slows its own database sessions.
        # A caller in the default autogroup (whose file is empty: ``None``) shares
        # the root group, so its helper's group stays at 0.
        (False, 10, 10, "{ours} 10 {ours_or_0}"),
    ],
)
def test_a_process_leading_its_session_lowers_its_autogroup_and_its_helpers_follow(
    own_session: bool, niceness: int, helper_niceness: int, printed: str
) -> None:
    printed_here = _run(GROUP_SCRIPT, niceness, helper_niceness, own_session=own_session)
    ours = autogroup_nice(os.getpid())
    assert printed_here == printed.format(ours=ours, ours_or_0=ours or 0)


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("postgresql://u@127.0.0.1:5432/db", True),
        ("postgresql://u@localhost/db", True),
        ("postgresql://u@[::1]:5432/db", True),
        ("postgresql:///db?host=/var/run/postgresql", True),
        ("postgresql://u@db.internal:5432/db", False),
        ("postgresql://u@10.0.0.7/db", False),
        ("postgresql://u@localhost/db?host=replica.internal", False),
    ],
)
def test_only_a_server_on_this_host_has_its_sessions_reniced(url: str, local: bool) -> None:
    assert _server_is_local(url) is local
