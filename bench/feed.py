"""The change feed under load: the 1M-row CSV load alone, and while 100 consumers
poll ``/changes`` once a second (``bench/consumers.py``), in turns.

Both loads run with a ``kasparro serve`` on their database (idle for the load
alone), so the only difference between them is the consumers. After each polled
load the consumers that keep a copy of the table read the feed to its end; their
copies must hold exactly the table's rows, or the scenario fails.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from typing import Any

from bench.db import scalar
from bench.proc import Background, service_env, tree_cpu_seconds
from bench.report import Goal, Row
from bench.scenarios import API_KEY, BenchError, Context, Ingestion, Service, etl_run

CONSUMERS = 100
PAGE = 100
"""Changes per request (the default ``limit``): a page a second per consumer."""
INTERVAL_SECONDS = 1.0
CATCH_UP_SECONDS = 300.0


def _percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))] / 1000


def _result(consumers: Background) -> dict[str, Any]:
    text = consumers.log_path.read_text(encoding="utf-8", errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            parsed = json.loads(line)
            if isinstance(parsed, dict) and "latencies_us" in parsed:
                return parsed
    raise BenchError(f"the consumers printed no result; see {consumers.log_path}")


def _cpu(pid: int) -> float:
    return tree_cpu_seconds(pid) or 0.0


def _polled_load(ctx: Context, index: int) -> tuple[Ingestion, dict[str, Any], int]:
    url = ctx.server.create(f"feed_polled_{index}")
    with Service(ctx, url, "serve-feed-polled", {}) as service:
        env = service_env(ctx.workdir, {})
        argv = [sys.executable, "-m", "bench.consumers", service.base, API_KEY]
        argv += ["--consumers", str(CONSUMERS), "--limit", str(PAGE)]
        argv += ["--interval", str(INTERVAL_SECONDS)]
        consumers = Background(argv, env, ctx.workdir, ctx.logs / f"{ctx.label('consumers')}.log")
        try:
            # Every consumer has asked at least once before the load starts.
            time.sleep(INTERVAL_SECONDS * 1.5)
            if not consumers.running:
                raise BenchError(f"the consumers exited early; see {consumers.log_path}")
            serve_before = _cpu(service.process.proc.pid)
            consumers_before = _cpu(consumers.proc.pid)
            run = etl_run(ctx, url, "csv", "feed-load-polled")
            # CPU per second of load: what serving the feed cost the machine.
            seconds = run.measured.wall_seconds
            serve_cores = (_cpu(service.process.proc.pid) - serve_before) / seconds
            consumers_cores = (_cpu(consumers.proc.pid) - consumers_before) / seconds
        finally:
            code = consumers.stop(grace=CATCH_UP_SECONDS)
        if code != 0:
            raise BenchError(f"the consumers exited {code}; see {consumers.log_path}")
        result = _result(consumers)
    result["serve_cores"] = round(serve_cores, 3)
    result["consumers_cores"] = round(consumers_cores, 3)
    rows = int(asyncio.run(scalar(url, "SELECT count(*) FROM unified_data")))
    return run, result, rows


def changes(ctx: Context) -> None:
    """The load's duration with 100 consumers polling /changes against the load alone,
    and the latency of /changes meanwhile."""
    alone: list[Ingestion] = []
    polled: list[tuple[Ingestion, dict[str, Any], int]] = []
    for index in range(ctx.sizes.rounds):
        url = ctx.server.create(f"feed_alone_{index}")
        with Service(ctx, url, "serve-feed-alone", {}):
            alone.append(etl_run(ctx, url, "csv", "feed-load-alone"))
        ctx.log(f"    alone: {alone[-1].measured.wall_seconds:.1f}s")
        polled.append(_polled_load(ctx, index))
        run, result, rows = polled[-1]
        p99 = _percentile(result["latencies_us"], 0.99)
        ctx.log(
            f"    with {CONSUMERS} consumers: {run.measured.wall_seconds:.1f}s, "
            f"{result['requests']:,} requests, p99 {p99:.1f} ms; serve "
            f"{result['serve_cores']:.0%} of a core, consumers {result['consumers_cores']:.0%}"
        )
        copies = result["copies"]
        if result["errors"] or any(size != rows for size in copies):
            raise BenchError(
                f"the feed's consumers went wrong: {result['errors']} errors, copies of "
                f"{sorted(set(copies))} rows for a table of {rows}"
            )

    def wall(run: Ingestion) -> float:
        return run.measured.wall_seconds

    alone_median = sorted(alone, key=wall)[(len(alone) - 1) // 2]
    polled_median = sorted(polled, key=lambda p: wall(p[0]))[(len(polled) - 1) // 2]
    run, result, rows = polled_median
    latencies = [us for _, r, _ in polled for us in r["latencies_us"]]
    spread = ""
    if len(alone) > 1:
        spread = (
            f"median of {len(alone)} turns each; alone "
            + ", ".join(f"{wall(r):.1f}" for r in alone)
            + " s, polled "
            + ", ".join(f"{wall(p[0]):.1f}" for p in polled)
            + " s"
        )
    add = ctx.results.add
    add(
        Row(
            "changes",
            f"{run.fetched / 1e6:g}M-row load while {CONSUMERS} consumers poll /changes",
            wall(run),
            "s",
            "the load alone",
            wall(alone_median),
            Goal("<=", 1.10),
            spread,
        )
    )
    requests = sum(r["requests"] for _, r, _ in polled)
    seconds = sum(r["seconds"] for _, r, _ in polled)
    serve = sorted(r["serve_cores"] for _, r, _ in polled)[(len(polled) - 1) // 2]
    clients = sorted(r["consumers_cores"] for _, r, _ in polled)[(len(polled) - 1) // 2]
    note = (
        f"{requests:,} requests of limit={PAGE}, {requests / seconds:,.0f} req/s; "
        f"serve {serve:.0%} of a core, the consumers {clients:.0%}"
    )
    add(Row("changes", "/changes p50 during the load", _percentile(latencies, 0.5), "ms"))
    add(
        Row(
            "changes",
            "/changes p99 during the load",
            _percentile(latencies, 0.99),
            "ms",
            note=note,
        )
    )
    ctx.results.details["changes"] = {
        "consumers": CONSUMERS,
        "page": PAGE,
        "interval_seconds": INTERVAL_SECONDS,
        "alone_seconds": [round(wall(r), 3) for r in alone],
        "polled_seconds": [round(wall(p[0]), 3) for p in polled],
        "requests": requests,
        "errors": sum(r["errors"] for _, r, _ in polled),
        "unified_rows": rows,
        "received_while_polling": [r["received_while_polling"] for _, r, _ in polled],
        "serve_cores": [r["serve_cores"] for _, r, _ in polled],
        "consumers_cores": [r["consumers_cores"] for _, r, _ in polled],
        "p50_ms": _percentile(latencies, 0.5),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": max(latencies) / 1000 if latencies else None,
        "alone": alone_median.summary(),
        "polled": run.summary(),
    }
