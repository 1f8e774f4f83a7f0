"""``lower_priority``: runs raise their nice value, never lower it (in a child
process, so the test run keeps its own priority)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
