"""Consumers of the change feed: ``python -m bench.consumers URL KEY --consumers 100``.

Each consumer asks ``/changes?after=…`` once a second (their first requests
spread over the first second) and moves its cursor to ``next_after``, as the
README's consumer does. On SIGTERM they stop polling, the few that keep a copy
of the table read the feed to its end, and the process prints one JSON line:
the requests made while polling (every latency in microseconds), the errors,
the changes received, and the size of each copy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from typing import Any

import aiohttp

KEEPING = 5
"""Consumers that keep a copy of the table (the others only count), to check the feed."""


class Consumer:
    def __init__(self, keeps_copy: bool) -> None:
        self.after = 0
        self.received = 0
        self.copy: dict[str, Any] | None = {} if keeps_copy else None

    async def page(self, session: aiohttp.ClientSession, base: str, limit: int) -> int:
        async with session.get(
            f"{base}/changes", params={"after": str(self.after), "limit": str(limit)}
        ) as response:
            body = await response.read()
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
        page = json.loads(body)
        rows = page["data"]
        self.received += len(rows)
        if self.copy is not None:
            for row in rows:
                if row["deleted"]:
                    self.copy.pop(row["name"], None)
                else:
                    self.copy[row["name"]] = row["value"]
        self.after = page["next_after"]
        return len(rows)


async def _poll(
    consumer: Consumer,
    session: aiohttp.ClientSession,
    base: str,
    limit: int,
    interval: float,
    stop: asyncio.Event,
    latencies: list[int],
    errors: list[int],
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
            await consumer.page(session, base, limit)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            errors.append(1)
        latencies.append(int((time.perf_counter() - started) * 1_000_000))


async def _catch_up(consumer: Consumer, session: aiohttp.ClientSession, base: str) -> None:
    while await consumer.page(session, base, 1000) == 1000:
        pass


async def run(base: str, key: str, consumers: int, limit: int, interval: float) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    everyone = [Consumer(keeps_copy=i < KEEPING) for i in range(consumers)]
    latencies: list[int] = []
    errors: list[int] = []
    connector = aiohttp.TCPConnector(limit=consumers)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"x-api-key": key}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        started = time.perf_counter()
        await asyncio.gather(
            *(_poll(c, session, base, limit, interval, stop, latencies, errors) for c in everyone)
        )
        polled = time.perf_counter() - started
        received_polling = sum(c.received for c in everyone)
        # The load is over: the consumers that keep a copy read the rest of the feed.
        keepers = [c for c in everyone if c.copy is not None]
        await asyncio.gather(*(_catch_up(c, session, base) for c in keepers))
    return {
        "consumers": consumers,
        "limit": limit,
        "interval_seconds": interval,
        "seconds": polled,
        "requests": len(latencies),
        "errors": len(errors),
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
