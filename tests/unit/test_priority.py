"""``lower_priority``: runs raise their nice value, never lower it (in a child
process, so the test run keeps its own priority)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from persistence.database import _server_is_local

SCRIPT = """
import os, sys
from pipelines.priority import lower_priority
os.setpriority(os.PRIO_PROCESS, 0, int(sys.argv[1]))
print(lower_priority(int(sys.argv[2])), os.getpriority(os.PRIO_PROCESS, 0))
"""


def _run(start: int, wanted: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(start), str(wanted)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


@pytest.mark.skipif(not hasattr(__import__("os"), "getpriority"), reason="no nice values")
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
    assert _run(start, wanted) == printed


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
