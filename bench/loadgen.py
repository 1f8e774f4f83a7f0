"""The fallback load generator (when ``wrk`` is not installed): aiohttp, one process.

``python -m bench.loadgen URL --connections 16 --seconds 5 [--header K:V]`` keeps
that many requests in flight for that long and prints one JSON line: requests,
errors, seconds, and every latency in microseconds (the caller merges processes
and computes percentiles). Run several processes to use several cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    deadline: float,
    latencies: list[int],
    errors: list[int],
) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            async with session.get(url, headers=headers) as response:
                await response.read()
                ok = 200 <= response.status < 400
        except aiohttp.ClientError:
            ok = False
        latencies.append(int((time.perf_counter() - started) * 1_000_000))
        if not ok:
            errors.append(1)


async def generate(
    url: str, connections: int, seconds: float, headers: dict[str, str]
) -> dict[str, object]:
    latencies: list[int] = []
    errors: list[int] = []
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(
            *(
                _worker(session, url, headers, deadline, latencies, errors)
                for _ in range(connections)
            )
        )
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "seconds": elapsed,
        "latencies_us": latencies,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--header", action="append", default=[], help="NAME:VALUE")
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    result = asyncio.run(generate(args.url, args.connections, args.seconds, headers))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
