"""HTTP load: ``wrk`` when installed, else the aiohttp generator in separate processes.

Either way the figures are requests per second and latency percentiles over a
fixed number of connections held open for a fixed time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

CONNECTIONS = 32
THREADS = 2

# "auto" (wrk when installed), "wrk" or "python"; set from the command line.
preferred = "auto"

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one load run measured."""

    tool: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float


def _wrk() -> str | None:
    if preferred == "python":
        return None
    wrk = shutil.which("wrk")
    if wrk is None and preferred == "wrk":
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    return wrk


def tool_name() -> str:
    """``wrk`` or the fallback, as reported in the results."""
    return "wrk" if _wrk() else "python-aiohttp"


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """Read requests, duration, errors, req/s and the 50th/99th percentiles from
    ``wrk --latency`` output."""
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.MULTILINE))
    totals = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not (totals and rps and "50" in percentiles and "99" in percentiles):
        raise ValueError(f"cannot read wrk output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(v) for v in socket_errors.groups())
    return LoadResult(
        tool="wrk",
        requests=int(totals.group(1)),
        errors=errors,
        seconds=_ms(totals.group(2) + totals.group(3)) / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
    )


def _percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


def _python_load(url: str, headers: Mapping[str, str], seconds: float) -> LoadResult:
    processes = min(THREADS, os.cpu_count() or 1)
    per_process = max(1, CONNECTIONS // processes)
    header_args = [arg for k, v in headers.items() for arg in ("--header", f"{k}:{v}")]
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        url,
        "--connections",
        str(per_process),
        "--seconds",
        str(seconds),
        *header_args,
    ]
    children = [
        subprocess.Popen(argv, stdout=subprocess.PIPE)  # noqa: S603
        for _ in range(processes)
    ]
    latencies: list[int] = []
    requests = errors = 0
    elapsed = 0.0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 60)
        result = json.loads(out)
        latencies.extend(result["latencies_us"])
        requests += int(result["requests"])
        errors += int(result["errors"])
        elapsed = max(elapsed, float(result["seconds"]))
    latencies.sort()
    return LoadResult(
        tool="python-aiohttp",
        requests=requests,
        errors=errors,
        seconds=elapsed,
        rps=requests / elapsed if elapsed else 0.0,
        p50_ms=_percentile(latencies, 0.50) / 1000.0,
        p99_ms=_percentile(latencies, 0.99) / 1000.0,
    )


def run_load(url: str, headers: Mapping[str, str], seconds: float) -> LoadResult:
    """Hold ``CONNECTIONS`` connections on ``url`` for ``seconds``."""
    wrk = _wrk()
    if wrk is None:
        return _python_load(url, headers, seconds)
    header_args = [arg for k, v in headers.items() for arg in ("-H", f"{k}: {v}")]
    argv = [
        wrk,
        "-c",
        str(CONNECTIONS),
        "-t",
        str(THREADS),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        # The default 2s would cap slow endpoints' latencies and count them as errors.
        "--timeout",
        "30s",
        *header_args,
        url,
    ]
    done = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)
