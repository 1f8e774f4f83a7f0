"""Consumers of the change feed: ``python -m bench.consumers URL KEY --consumers 100``.

Each consumer asks ``/changes?after=…`` once a second (their first requests
spread over the first second) and moves its cursor to ``next_after``, as the
README's consumer does. On SIGTERM they stop polling, the few that keep a copy
of the table read the feed to its end, and the process prints one JSON line:
the requests made while polling (every latency in microseconds), the errors,
the changes received, and the size of each copy.

The consumers share the machine with the service and the load they are measured
against, so the client is kept lean: one kept-alive connection each, plain
HTTP/1.1 on asyncio streams, and only the consumers that keep a copy decode
the rows (the others find ``next_after`` at the end of the body).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import sys
import time
from typing import Any
from urllib.parse import urlsplit

KEEPING = 5
"""Consumers that keep a copy of the table (the others only count), to check the feed."""
_NEXT_AFTER = re.compile(rb'"next_after":(\d+)\}\s*$')


class FeedError(Exception):
    """A request that did not give a page of changes."""


class Consumer:
    def __init__(self, host: str, port: int, key: str, keeps_copy: bool) -> None:
        self.host, self.port, self.key = host, port, key
        self.after = 0
        self.received = 0
        self.copy: dict[str, Any] | None = {} if keeps_copy else None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _get(self, target: str) -> bytes:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        try:
            request = f"GET {target} HTTP/1.1\r\nhost: {self.host}\r\nx-api-key: {self.key}\r\n"
            writer.write(request.encode() + b"\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            writer.close()
            self._streams = None
            raise FeedError(f"{type(exc).__name__}: {exc}") from None
        if status != 200:
            raise FeedError(f"status {status}")
        return body

    async def page(self, limit: int) -> int:
        """One page after the cursor; the number of changes in it."""
        body = await self._get(f"/changes?after={self.after}&limit={limit}")
        if self.copy is not None:
            page = json.loads(body)
            rows = page["data"]
            for row in rows:
                if row["deleted"]:
                    self.copy.pop(row["name"], None)
                else:
                    self.copy[row["name"]] = row["value"]
            count, self.after = len(rows), int(page["next_after"])
        else:
            found = _NEXT_AFTER.search(body)
            if found is None:
                raise FeedError("no next_after in the page")
            count, self.after = body.count(b'"seq":'), int(found[1])
        self.received += count
        return count

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def _poll(
    consumer: Consumer,
    limit: int,
    interval: float,
    stop: asyncio.Event,
    latencies: list[int],
    errors: list[str],
) -> None:
    next_at = time.perf_counter() + random.uniform(0, interval)
    while not stop.is_set():
        delay = next_at - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
        next_at += interval
        started = time.perf_counter()
        try:
            await consumer.page(limit)
        except FeedError as exc:
            errors.append(str(exc))
        latencies.append(int((time.perf_counter() - started) * 1_000_000))


async def _catch_up(consumer: Consumer) -> None:
    while await consumer.page(1000) == 1000:
        pass


async def run(base: str, key: str, consumers: int, limit: int, interval: float) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    everyone = [Consumer(host, port, key, keeps_copy=i < KEEPING) for i in range(consumers)]
    latencies: list[int] = []
    errors: list[str] = []
    started = time.perf_counter()
    await asyncio.gather(*(_poll(c, limit, interval, stop, latencies, errors) for c in everyone))
    polled = time.perf_counter() - started
    received_polling = sum(c.received for c in everyone)
    # The load is over: the consumers that keep a copy read the rest of the feed.
    keepers = [c for c in everyone if c.copy is not None]
    await asyncio.gather(*(_catch_up(c) for c in keepers))
    for consumer in everyone:
        consumer.close()
    return {
        "consumers": consumers,
        "limit": limit,
        "interval_seconds": interval,
        "seconds": polled,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "latencies_us": latencies,
        "received_while_polling": received_polling,
        "received": [c.received for c in everyone],
        "copies": [len(c.copy) for c in keepers if c.copy is not None],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.consumers")
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("--consumers", type=int, default=100)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.url, args.key, args.consumers, args.limit, args.interval))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
