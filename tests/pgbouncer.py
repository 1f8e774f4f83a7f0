"""A real PgBouncer in front of the test's PostgreSQL, with PgBouncer's defaults.

Only what a deployment must say is set: where to listen, where the server is,
who may log in (``auth_type = trust`` with a user list) and the pool mode.
PgBouncer refuses to run as root, so as root it runs as the ``postgres`` user
(or ``nobody``); a server reachable only by a unix socket (the embedded one)
gets a TCP proxy in front (:class:`tests.pg_proxy.PgProxy`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.pg_proxy import PgProxy

MODES = ("session", "transaction")


def binary() -> str | None:
    """The pgbouncer program, or ``None`` when it is not installed."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).is_file()), None
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("pgbouncer refuses root, and there is no postgres or nobody user")


class PgBouncer:
    """One PgBouncer process in ``mode`` (``session`` or ``transaction``)."""

    def __init__(self, server_url: str, mode: str) -> None:
        self.mode = mode
        self._proxy: PgProxy | None = None
        parts = urlsplit(server_url)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "127.0.0.1"
        if host.startswith("/"):
            self._proxy = PgProxy(server_url).start()
            host, port = "127.0.0.1", self._proxy.port
        else:
            port = int(query.get("port") or parts.port or 5432)
        self.user = parts.username or "postgres"
        self.folder = Path(tempfile.mkdtemp(prefix=f"kasparro-pgbouncer-{mode}-"))
        self.port = _free_port()
        (self.folder / "userlist.txt").write_text(f'"{self.user}" ""\n')
        (self.folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.folder / 'userlist.txt'}\n"
            f"pool_mode = {mode}\n"
            f"logfile = {self.folder / 'pgbouncer.log'}\n"
            f"pidfile = {self.folder / 'pgbouncer.pid'}\n"
        )
        user = _run_as()
        if user is not None:
            # Readable by the user it runs as; it holds no secret (trust, no passwords).
            os.chmod(self.folder, 0o755)  # noqa: S103
            shutil.chown(self.folder, user)
        program = binary()
        assert program is not None
        argv = [program, str(self.folder / "pgbouncer.ini")]
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer never listened: {self.log()[-2000:]}") from None
                time.sleep(0.05)

    def log(self) -> str:
        try:
            return (self.folder / "pgbouncer.log").read_text()
        except OSError:
            return ""

    def url(self, database_url: str) -> str:
        """``database_url`` (a database of the same server) through this PgBouncer."""
        parts = urlsplit(database_url)
        query = {k: v for k, v in parse_qsl(parts.query) if k not in ("host", "port")}
        password = f":{parts.password}" if parts.password else ""
        netloc = f"{self.user}{password}@127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))

    def settings(self) -> dict[str, str]:
        """The service settings this mode needs (transaction pooling: no statement cache)."""
        return {"DATABASE_STATEMENT_CACHE_SIZE": "0"} if self.mode == "transaction" else {}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self._proxy is not None:
            self._proxy.close()
        shutil.rmtree(self.folder, ignore_errors=True)
