"""Hostile clients against a real ``kasparro serve``: huge headers, silent and
slow connections. Each must be cut off by the server on its own, in bounded
memory and time, while the service keeps answering everyone else."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import csv_entry, csv_rows, write_csv, write_sources
from tests.integration.test_serve import Served, served_on_new_database

HEADER_TIMEOUT = 1.0
KEEP_ALIVE = 1
SLACK = 2.0
"""How much later than its limit a connection may be closed (a loaded machine)."""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, server_url: str) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("limits")
    write_csv(folder / "a.csv", csv_rows(5))
    sources = write_sources(folder, csv_entry(folder / "a.csv"))
    with served_on_new_database(
        server_url,
        sources,
        key="limits-key-0123456789",
        prefix="kasparro_limits",
        HTTP_HEADER_TIMEOUT_SECONDS=HEADER_TIMEOUT,
        HTTP_KEEP_ALIVE_SECONDS=KEEP_ALIVE,
    ) as served:
        yield served


def _address(served: Served) -> tuple[str, int]:
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _peak_rss_kib(served: Served) -> int:
    for line in Path(f"/proc/{served.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) before ``deadline``;
    anything it sends first (a 431) is read and dropped."""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def test_four_32_mib_headers_are_cut_off_while_they_arrive(live: Served) -> None:
    before = _peak_rss_kib(live)
    head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: "
    chunk = b"a" * (1 << 20)
    outcomes: list[str] = []

    def send_one() -> None:
        with socket.create_connection(_address(live), timeout=10) as sock:
            try:
                sock.sendall(head)
                for _ in range(32):
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                outcomes.append("refused while sending")
                return
            closed = _closed_by_server(sock, time.monotonic() + HEADER_TIMEOUT + SLACK)
            outcomes.append("closed" if closed else "held open")

    senders = [threading.Thread(target=send_one) for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=60)
    assert len(outcomes) == 4
    assert "held open" not in outcomes, outcomes
    grown_mib = (_peak_rss_kib(live) - before) / 1024
    assert grown_mib < 32, f"peak memory grew by {grown_mib:.0f} MiB"
    assert live.get("/health").status_code == 200


def test_a_head_over_the_limit_gets_431_before_the_server_reads_on(live: Served) -> None:
    with socket.create_connection(_address(live), timeout=10) as sock:
        # Sent whole, then nothing more: the answer can be read before the close.
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40_000)
        sock.settimeout(5)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b'"status_code":431' in answer
    assert b"x-request-id: " in answer


def test_silent_connections_are_closed_after_the_header_timeout(live: Served) -> None:
    opened = time.monotonic()
    sockets = [socket.create_connection(_address(live), timeout=10) for _ in range(20)]
    try:
        deadline = opened + HEADER_TIMEOUT + SLACK
        closed = [_closed_by_server(sock, deadline) for sock in sockets]
        took = time.monotonic() - opened
    finally:
        for sock in sockets:
            sock.close()
    assert all(closed), f"{closed.count(False)} of 20 silent connections still open"
    assert took >= HEADER_TIMEOUT * 0.9, f"closed after {took:.2f} s, before the timeout"
    assert live.get("/health").status_code == 200


def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_timeout(live: Served) -> None:
    with socket.create_connection(_address(live), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        started = time.monotonic()
        cut = False
        # A slow client: a byte every 50 ms keeps the connection busy, never idle.
        while time.monotonic() - started < HEADER_TIMEOUT + SLACK:
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            if _closed_by_server(sock, time.monotonic() + 0.05):
                cut = True
                break
    assert cut, "a head trickling in byte by byte was never cut off"


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_time(
    live: Served,
) -> None:
    with socket.create_connection(_address(live), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        closed = _closed_by_server(sock, answered + KEEP_ALIVE + SLACK)
    assert closed, "the kept-alive connection stayed open"
