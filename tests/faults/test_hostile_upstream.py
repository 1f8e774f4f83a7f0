"""Hostile upstream: ~300 scripted faults from the fake HTTP upstream.

The fake plays a paginated CoinPaprika (600 tickers, 20 per page) and answers
requests with a seeded random mix of 429 (with a 1 s ``Retry-After`` and
without), 500/502/503, stalls past the 1 s timeout, bodies cut mid-stream,
truncated JSON with intact framing, and HTML error pages served with 200.
Transient faults are retried; a malformed body fails the ``api`` source for
that run (the contract does not retry it), so runs repeat until the faults are
used up and the source completes.

Every run must end ``success`` or ``partial`` per the contract's rules (a CSV
source runs beside the API so a failed API source makes the run partial), the
configured rate must hold at the fake (at most rate + 1 requests in any 1 s
window), and no traceback may appear in any output. Then the audit.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fakes.upstream import FakeUpstream, Fault, make_tickers
from tests.faults.audit import SourceInput, audit, note
from tests.helpers import API_MAPPING, cli_env, csv_entry, run_cli, write_csv, write_sources

SEED = 1337
TICKERS = 600
PAGE_SIZE = 20
FAULTS = 300
RATE = 20.0
MAX_RUNS = 15
API_FIELDS = {"name": "name", "value": "quotes.USD.price", "observed_at": "last_updated"}
CSV_FIELDS = {"name": "name", "value": "value", "observed_at": "updated_at"}


def _schedule(rng: random.Random) -> list[Fault]:
    """``FAULTS`` answers, about a third of them faults, never more than 2 faults in a
    row (so the exponential backoff stays under a second or two). Two truncated
    bodies and two HTML pages are placed at random; each fails one run's pass."""
    transient = [
        (Fault.http(429, retry_after=1), 2),
        (Fault.http(429), 5),
        (Fault.http(500), 5),
        (Fault.http(502), 5),
        (Fault.http(503), 5),
        (Fault.stall(3.0), 1),
        (Fault.cut_mid_stream(), 3),
    ]
    kinds = [f for f, _ in transient]
    weights = [w for _, w in transient]
    plan: list[Fault] = []
    streak = 0
    for _ in range(FAULTS):
        if streak >= 2 or rng.random() < 0.67:
            plan.append(Fault.ok())
            streak = 0
        else:
            plan.append(rng.choices(kinds, weights)[0])
            streak += 1
    # A malformed body replaces an "ok" answer, so the streak bound still holds.
    oks = [i for i, f in enumerate(plan) if f.kind == "ok" and i < FAULTS - 40]
    for slot, fault in zip(
        rng.sample(oks, 4),
        (Fault.truncated_json(), Fault.html_200(), Fault.truncated_json(), Fault.html_200()),
        strict=True,
    ):
        plan[slot] = fault
    return plan


def _label(fault: Fault | None) -> str:
    if fault is None or fault.kind == "ok":
        return "ok"
    if fault.kind == "status":
        suffix = " Retry-After" if "Retry-After" in fault.headers else ""
        return f"{fault.status}{suffix}"
    return fault.kind


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _csv_rows(tickers: list[dict[str, object]]) -> list[tuple[str, str, str]]:
    """Names shared with the API in other spellings: ties (the API, listed first,
    wins), newer rows (the CSV wins) and older ones (the API wins)."""
    rows = []
    for i in range(40):
        stamp = str(tickers[i]["last_updated"])
        if i % 4 == 1:
            stamp = stamp.replace("2025-06-25", "2025-06-26")
        elif i % 4 == 3:
            stamp = stamp.replace("2025-06-25", "2025-06-24")
        rows.append((f"  COIN {i}", f"{i}.25", stamp))
    return rows


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("attempt_set", range(3))
async def test_hostile_upstream_is_survived_within_the_rate_limit(
    tmp_path: Path, database_url: str, attempt_set: int
) -> None:
    began = time.monotonic()
    rng = random.Random(SEED + attempt_set)
    tickers = make_tickers(TICKERS)
    csv_path = tmp_path / "side.csv"
    rows = _csv_rows(tickers)
    write_csv(csv_path, rows)
    fake = FakeUpstream(tickers).start()
    try:
        fake.enqueue(*_schedule(rng))
        api = (
            f'[[sources]]\nname = "api"\nkind = "http"\nlocation = "{fake.url}"\n'
            f"rate_limit_per_second = {RATE}\nmax_retries = 8\ntimeout_seconds = 1\n"
            f"page_size = {PAGE_SIZE}\n{API_MAPPING}\n"
        )
        env = cli_env(database_url, write_sources(tmp_path, api, csv_entry(csv_path)))
        outcomes: list[str] = []
        outputs: list[str] = []
        api_done = False
        for attempt in range(MAX_RUNS):
            if api_done and fake.pending_faults == 0:
                break
            started = time.monotonic()
            result = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env, timeout=120)
            outputs.append(result.stdout + result.stderr)
            run = json.loads(result.stdout)
            sources = run["sources"]
            expected = (
                "partial"
                if sources["api"]["status"] == "failed" or sources["csv"]["rejected"]
                else "success"
            )
            assert run["status"] == expected, run
            assert result.returncode == {"success": 0, "partial": 3}[expected]
            if sources["api"]["status"] == "failed":
                assert sources["api"]["error"]
                assert "\n" not in sources["api"]["error"]
            api_done = api_done or sources["api"]["status"] == "success"
            outcomes.append(
                f"run {attempt + 1}: {run['status']} (exit {result.returncode}) in "
                f"{time.monotonic() - started:.1f} s; api {sources['api']['status']} "
                f"fetched {sources['api']['fetched']} new {sources['api']['raw_inserted']}"
                + (f", error: {sources['api']['error']}" if sources["api"]["error"] else "")
            )
        assert api_done, "the api source never completed"
        assert fake.pending_faults == 0, f"{fake.pending_faults} faults never served"

        requests = fake.requests
        seen = Counter(_label(r.fault) for r in requests)
        peak = _max_in_window([r.at for r in requests])
        outcomes.append(
            f"{len(requests)} requests at the fake; answers: {dict(sorted(seen.items()))}"
        )
        outcomes.append(
            f"busiest 1 s window: {peak} requests (limit {RATE:g}/s, allowed {RATE + 1:g})"
        )
        assert peak <= RATE + 1
        for text in outputs:
            assert "Traceback" not in text, text[-3000:]
            assert '"source_crashed"' not in text
        outcomes.append("no traceback and no source_crashed event in any run's output")
    finally:
        fake.stop()

    note(
        f"hostile upstream, pass {attempt_set + 1}",
        *outcomes,
        f"scenario took {time.monotonic() - began:.1f} s",
    )
    await audit(
        database_url,
        f"hostile upstream, pass {attempt_set + 1} (300 scripted faults, rate 20/s)",
        [
            # Read whole every run: no timestamp mark is kept.
            SourceInput("api", "raw_api_data", tickers, API_FIELDS, {"high_water": None}),
            SourceInput(
                "csv",
                "raw_csv_data",
                [dict(zip(("name", "value", "updated_at"), r, strict=True)) for r in rows],
                CSV_FIELDS,
                {"offset": csv_path.stat().st_size},
            ),
        ],
    )
