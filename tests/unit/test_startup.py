"""What a short command loads: a no-op ``etl run`` is mostly interpreter start-up
and imports, so the modules it does not need must stay out (in a fresh
interpreter each, as the command starts)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
import {module}
print(" ".join(sorted(m for m in ("rich", "prometheus_client", "multiprocessing",
      "litestar", "sqlalchemy", "alembic") if m in sys.modules)))
"""


@pytest.mark.parametrize("module", ["app.cli", "pipelines.runner"])
def test_a_commands_modules_leave_out_what_it_does_not_use(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(module=module)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.split() == []


def test_structlog_keeps_logging_and_rich_stays_importable() -> None:
    script = (
        "import app.cli, structlog, rich.console; "
        "structlog.get_logger('t').info('hello', n=1); print(rich.console.Console.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip().endswith("Console")
    assert "hello" in done.stdout
