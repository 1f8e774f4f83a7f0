"""``kasparro serve`` honours SIGTERM from the first instant, and tells its
health check where it listens.

A stop that arrives while the service starts (the migrations waiting on a
database that does not answer, the embedded server's first start) must end it
promptly with exit 0: in a container the engine sends SIGTERM and, if nothing
happens, kills the service after its grace period.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, cli_env, csv_entry, csv_rows, run_cli, write_csv, write_sources
from tests.integration.test_serve import Served, serve

__all__ = ["serve"]  # the fixture, used by name

STOP_SECONDS = 5.0
"""How long a stop during start-up may take: far under any engine's grace period."""


@pytest.fixture
def silent_database() -> Iterator[socket.socket]:
    """A TCP port that accepts connections and never answers: a hung database."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    yield listener
    listener.close()


def _sources(tmp_path: Path) -> Path:
    write_csv(tmp_path / "a.csv", csv_rows(5))
    return write_sources(tmp_path, csv_entry(tmp_path / "a.csv"))


def _stopped_promptly(served: Served) -> int:
    sent = time.monotonic()
    code = served.stop(timeout=STOP_SECONDS + 5)
    took = time.monotonic() - sent
    assert took < STOP_SECONDS, f"the stop took {took:.1f} s"
    return code


def test_sigterm_while_the_migrations_wait_for_the_database_exits_0_at_once(
    tmp_path: Path, silent_database: socket.socket, serve: Callable[[dict[str, str]], Served]
) -> None:
    port = silent_database.getsockname()[1]
    url = f"postgresql://kasparro:pw@127.0.0.1:{port}/kasparro"  # pragma: allowlist secret
    served = serve(cli_env(url, _sources(tmp_path), API_KEY="startup-key-0123456789"))
    served.wait_for_event("service_starting", timeout=20)
    connection, _ = silent_database.accept()  # the migrations are connecting now
    try:
        code = _stopped_promptly(served)
    finally:
        connection.close()
    assert code == 0
    events = [line for line in served.lines if "service_stopped_during_startup" in line]
    assert len(events) == 1


def test_sigterm_while_the_embedded_server_starts_exits_0_and_leaves_it_usable(
    tmp_path: Path, serve: Callable[[dict[str, str]], Served]
) -> None:
    data_dir = tmp_path / "data"
    env = cli_env(None, _sources(tmp_path), API_KEY="startup-key-0123456789", DATA_DIR=data_dir)
    served = serve(env)
    served.wait_for_event("service_starting", timeout=20)
    # initdb writes PG_VERSION first and fills the folder for about a second: the stop
    # lands during it, and must wait for it rather than leave a data directory
    # that no later start can use.
    deadline = time.monotonic() + 20
    while not (data_dir / "pg" / "PG_VERSION").exists():
        assert time.monotonic() < deadline, "initdb never started"
        time.sleep(0.005)
    sent = time.monotonic()
    code = served.stop(timeout=60)
    took = time.monotonic() - sent
    assert code == 0
    assert took < 30, f"the stop took {took:.1f} s"
    assert not (data_dir / "pg" / "postmaster.pid").exists(), "the embedded server still runs"
    again = run_cli("db", "upgrade", env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert not (data_dir / "pg" / "postmaster.pid").exists()


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.healthcheck"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_health_check_follows_the_port_actually_served(
    tmp_path: Path, database_url: str, serve: Callable[[dict[str, str]], Served]
) -> None:
    address_file = tmp_path / "address"
    # PORT names a port nothing listens on; the server is told --port 0 (any free port).
    with socket.create_server(("127.0.0.1", 0)) as taken:
        unused = taken.getsockname()[1]
    env = cli_env(
        database_url,
        _sources(tmp_path),
        API_KEY="startup-key-0123456789",  # pragma: allowlist secret
        ETL_ON_STARTUP="false",
        PORT=unused,
        SERVE_ADDRESS_FILE=address_file,
    )
    served = serve(env)
    url = served.listening()
    assert address_file.read_text(encoding="utf-8").strip() == url
    served.poll("/health", lambda r: r.status_code == 200, timeout=10)
    healthy = _healthcheck(env)
    assert healthy.returncode == 0, healthy.stderr
    assert served.stop(timeout=10) == 0
    assert not address_file.exists()
    down = _healthcheck(env)
    assert down.returncode == 1
    assert f"127.0.0.1:{unused}/health" in down.stderr
