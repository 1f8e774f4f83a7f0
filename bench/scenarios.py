"""The scenarios. Each one adds rows (a figure beside its baseline) to the results.

Ingestion runs ``kasparro etl run --json`` as a child process and times it end to
end (start-up and migrations included); the reference script runs on the same
input against another fresh database on the same server. Reads start
``kasparro serve`` on a loaded database and put it under HTTP load.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.db import DatabaseServer, active_seconds, footprint, scalar, wal_bytes
from bench.inputs import Inputs, Sizes, make_tickers
from bench.load import LoadResult, run_load
from bench.proc import (
    REPO_ROOT,
    Background,
    Measured,
    kasparro,
    machine_cpu_times,
    run_measured,
    service_env,
    tree_cpu_seconds,
)
from bench.profile import API, INGESTION, summarize
from bench.report import Goal, Results, Row
from bench.upstream import PagedUpstream

API_KEY = "bench-key"
AUTH = {"x-api-key": API_KEY}
REFERENCE = REPO_ROOT / "bench" / "reference.py"
# Reads are meant to run over 100k unified rows; at quick sizes each name has one
# row, and the names whose only row is rejected (one in a thousand) are missing.
MIN_READ_ROWS = 99_000


class BenchError(RuntimeError):
    """A scenario cannot produce its figures; the message says why."""


@dataclass(frozen=True, slots=True)
class Variant:
    """Another build of Kasparro measured in turns with this one, in the same run:
    another checkout's code (``code``), other settings (``env``), or both.

    Written ``LABEL:ITEM,ITEM...`` on the command line, each item a
    ``VARIABLE=VALUE`` setting or the folder of a checkout, e.g.
    ``no-parse-process:ETL_PARSE_PROCESS_MIN_BYTES=1000000000000`` or
    ``before:/tmp/kasparro-before``.
    """

    label: str
    code: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        label, sep, spec = text.partition(":")
        if not sep or not label or not spec:
            raise ValueError(f"a variant is LABEL:ITEM[,ITEM...], not {text!r}")
        code: Path | None = None
        env: dict[str, str] = {}
        for item in spec.split(","):
            name, eq, value = item.partition("=")
            if eq and name.isidentifier():
                env[name] = value
                continue
            folder = Path(item).expanduser().resolve()
            if not (folder / "app" / "cli.py").is_file():
                raise ValueError(f"variant {label}: {item!r} is neither VAR=VALUE nor a checkout")
            code = folder
        return cls(label, code, env)

    @property
    def root(self) -> Path:
        return self.code or REPO_ROOT

    @property
    def python(self) -> str:
        """The checkout's own interpreter when it has a ``.venv``, else this one."""
        own = self.root / ".venv" / "bin" / "python"
        return str(own) if self.code is not None and own.is_file() else sys.executable

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "code": str(self.code or ""), "env": dict(self.env)}


THIS = Variant("kasparro")
"""The code of this checkout with its defaults."""


@dataclass(slots=True)
class Context:
    """What the scenarios share."""

    sizes: Sizes
    workdir: Path
    logs: Path
    out: Path
    inputs: Inputs
    server: DatabaseServer
    results: Results
    upstream: PagedUpstream | None = None
    log: Callable[[str], None] = print
    variants: list[Variant] = field(default_factory=list)
    loaded_db: str | None = None
    csv_full: Ingestion | None = None
    _labels: dict[str, int] = field(default_factory=dict)

    def label(self, base: str) -> str:
        """A unique name for a child's log file."""
        self._labels[base] = self._labels.get(base, 0) + 1
        count = self._labels[base]
        return base if count == 1 else f"{base}-{count}"


# -- ingestion -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DbUse:
    """What one loader cost the database server."""

    cpu_seconds: float | None
    """CPU of every server process (a local server only)."""
    active_seconds: float | None
    """Time spent executing statements in the loader's database."""
    wal_mb: float | None
    """WAL written (server-wide; the bench is its only writer)."""
    footprint: dict[str, Any]
    """Database size, and per table rows written, bytes and indexes."""
    checkpoints: int | None
    """Checkpoints during the run: each makes the next write of every page a
    full-page image in the WAL, so the WAL figure is only comparable without one."""

    @property
    def size_mb(self) -> float:
        return float(self.footprint.get("database_bytes", 0)) / 2**20


class _DbMeter:
    """Readings of the server before a loader runs; :meth:`done` gives the use."""

    def __init__(self, ctx: Context, url: str) -> None:
        self.ctx, self.url = ctx, url
        ctx.server.settle()
        ctx.server.checkpoint()
        self.checkpoints = ctx.server.checkpoints()
        self.active = active_seconds(url)
        self.wal = wal_bytes(url)
        self.cpu = ctx.server.cpu_seconds()

    def done(self) -> DbUse:
        cpu = _server_cpu(self.ctx)
        wal = _delta(self.wal, wal_bytes(self.url))
        return DbUse(
            cpu_seconds=_delta(self.cpu, cpu),
            active_seconds=_delta(self.active, active_seconds(self.url)),
            wal_mb=wal / 2**20 if wal is not None else None,
            footprint=footprint(self.url),
            checkpoints=_delta(self.checkpoints, self.ctx.server.checkpoints()),
        )


@dataclass(frozen=True, slots=True)
class Ingestion:
    """One measured ``etl run`` (or reference run)."""

    measured: Measured
    fetched: int
    db: DbUse
    run: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.fetched / self.measured.wall_seconds

    def summary(self) -> dict[str, Any]:
        m = self.measured
        return {
            "fetched": self.fetched,
            "records_per_second": round(self.rate, 1),
            "wall_seconds": round(m.wall_seconds, 3),
            "cpu_seconds": round(m.cpu_seconds, 3),
            "user_seconds": round(m.user_seconds, 3),
            "system_seconds": round(m.system_seconds, 3),
            "peak_rss_mb": round(m.peak_rss_mb, 1),
            "db_server_cpu_seconds": _round(self.db.cpu_seconds),
            "db_active_seconds": _round(self.db.active_seconds),
            "wal_mb": _round(self.db.wal_mb),
            "database": self.db.footprint,
            "checkpoints_during": self.db.checkpoints,
            "run": self.run,
        }


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None
    return None


def _server_cpu(ctx: Context) -> float | None:
    # Backends of a finished child exit a moment later; let the postmaster reap them.
    time.sleep(0.3)
    return ctx.server.cpu_seconds()


def _service_settings(
    ctx: Context, url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    settings = {"DATABASE_URL": url, "SOURCES_FILE": str(ctx.inputs.sources_file)}
    if ctx.upstream is not None:
        settings["API_SOURCE_URL"] = ctx.upstream.url
    settings.update(extra or {})
    return settings


def etl_run(
    ctx: Context,
    url: str,
    source: str,
    label: str,
    extra: Mapping[str, str] | None = None,
    wrap: list[str] | None = None,
    variant: Variant = THIS,
) -> Ingestion:
    """``kasparro etl run --source SOURCE --json`` on ``url``, measured."""
    settings = _service_settings(ctx, url, {**(extra or {}), **variant.env})
    env = service_env(ctx.workdir, settings, variant.root)
    # Deployed once, before any run (the reference creates its few tables as it starts).
    migrate = subprocess.run(  # noqa: S603
        kasparro("db", "upgrade", python=variant.python),
        env=env,
        cwd=ctx.workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if migrate.returncode != 0:
        raise BenchError(
            f"db upgrade ({label}) exited {migrate.returncode}: {migrate.stderr[-800:]}"
        )
    meter = _DbMeter(ctx, url)
    command = kasparro("etl", "run", "--source", source, "--json", python=variant.python)
    argv = [*(wrap or []), *command]
    log_path = ctx.logs / f"{ctx.label(label)}.log"
    measured = run_measured(argv, env, ctx.workdir, log_path)
    db_use = meter.done()
    run = _last_json_line(measured.stdout)
    if run is None or measured.returncode not in (0, 3):
        raise BenchError(
            f"etl run ({label}) exited {measured.returncode} without a run object; "
            f"see {log_path}\n{measured.stderr_tail[-800:]}"
        )
    sources = run.get("sources") or {}
    failed = {name: s.get("error") for name, s in sources.items() if s.get("status") != "success"}
    if failed:
        raise BenchError(f"etl run ({label}): source failed: {failed}; see {log_path}")
    fetched = sum(int(s.get("fetched") or 0) for s in sources.values())
    return Ingestion(measured, fetched, db_use, run)


def reference_run(
    ctx: Context,
    kind: str,
    location: str,
    mapping: Mapping[str, str],
    label: str,
    *,
    url: str | None = None,
    page_size: int | None = None,
) -> Ingestion:
    """``bench/reference.py`` on ``url`` (default: a fresh database of the same
    server), measured."""
    url = url or ctx.server.create(f"ref_{kind}")
    argv = [
        sys.executable,
        str(REFERENCE),
        "--database-url",
        url,
        "--kind",
        kind,
        "--location",
        location,
        "--page-size",
        str(page_size or ctx.sizes.http_page_size),
        *(arg for key, value in mapping.items() for arg in (f"--{key}", value)),
    ]
    env = service_env(ctx.workdir, {})
    meter = _DbMeter(ctx, url)
    log_path = ctx.logs / f"{ctx.label(label)}.log"
    measured = run_measured(argv, env, ctx.workdir, log_path)
    db_use = meter.done()
    result = _last_json_line(measured.stdout)
    if result is None or measured.returncode != 0:
        raise BenchError(
            f"reference ({label}) exited {measured.returncode}; see {log_path}\n"
            f"{measured.stderr_tail[-800:]}"
        )
    return Ingestion(measured, int(result["fetched"]), db_use, result)


def _unified_rows(url: str) -> int:
    return int(asyncio.run(scalar(url, "SELECT count(*) FROM unified_data")))


def _ingestion_rows(
    ctx: Context, scenario: str, turns: Turns, rate_goal: Goal | None, unified: int
) -> None:
    add = ctx.results.add
    mine, _ = turns.median_mine()
    ref = _median(turns.reference)
    m, r = mine.measured, ref.measured
    ref_unified = int(ref.run.get("unified_rows") or 0)
    notes = [turns.note()] if turns.note() else []
    if unified != ref_unified:
        notes.append(f"unified rows {unified} vs reference {ref_unified}")
    note = "; ".join(notes)
    add(
        Row(
            scenario,
            f"records/s ({mine.fetched:,} records)",
            mine.rate,
            "rec/s",
            "reference",
            ref.rate,
            rate_goal,
            note,
        )
    )
    _variant_rows(ctx, scenario, turns, ref)
    add(Row(scenario, "wall, end to end", m.wall_seconds, "s", "reference", r.wall_seconds))
    add(Row(scenario, "CPU of the loader process", m.cpu_seconds, "s", "reference", r.cpu_seconds))
    for figure, unit, value, baseline in (
        ("CPU of the database server", "s", mine.db.cpu_seconds, ref.db.cpu_seconds),
        (
            "time the database spent executing statements",
            "s",
            mine.db.active_seconds,
            ref.db.active_seconds,
        ),
        ("WAL written", "MB", mine.db.wal_mb, ref.db.wal_mb),
        ("database size after the load", "MB", mine.db.size_mb, ref.db.size_mb),
    ):
        if value is not None and baseline is not None:
            add(
                Row(
                    scenario,
                    figure,
                    value,
                    unit,
                    "reference",
                    baseline,
                    note=_wal_note(figure, mine, ref),
                )
            )
    add(Row(scenario, "peak RSS of the loader", m.peak_rss_mb, "MB", "reference", r.peak_rss_mb))
    ctx.results.details[scenario] = {
        "kasparro": mine.summary(),
        "reference": ref.summary(),
        "unified_rows": unified,
        "turns": turns.rates(),
        "variants": {label: _median(runs).summary() for label, runs in turns.variants.items()},
    }


def _cpu(run: Ingestion) -> float:
    return run.measured.cpu_seconds + (run.db.cpu_seconds or 0.0)


def _variant_rows(ctx: Context, scenario: str, turns: Turns, ref: Ingestion) -> None:
    """Per variant: this code's median rate against the variant's, with the ratio of
    each turn (the spread), and the variant's median against the reference."""
    mine = [run for run, _ in turns.mine]
    for label, runs in turns.variants.items():
        paired = ", ".join(
            f"{a.rate / b.rate:.2f}x" for a, b in zip(mine, runs, strict=True) if b.rate
        )
        add = ctx.results.add
        add(
            Row(
                scenario,
                f"records/s against {label}",
                _median(mine).rate,
                "rec/s",
                label,
                _median(runs).rate,
                note=f"each turn: {paired}; {label} {_spread(runs)} rec/s",
            )
        )
        if all(r.db.cpu_seconds is not None for r in [*mine, *runs]):
            # CPU seconds hardly depend on what else the machine runs; wall time does.
            cpu = ", ".join(
                f"{_cpu(a) / _cpu(b):.2f}x" for a, b in zip(mine, runs, strict=True) if _cpu(b)
            )
            add(
                Row(
                    scenario,
                    f"CPU of the loader and the database server against {label}",
                    statistics.median(_cpu(r) for r in mine),
                    "s",
                    label,
                    statistics.median(_cpu(r) for r in runs),
                    note=f"each turn: {cpu}",
                )
            )
        add(
            Row(
                scenario,
                f"{label}: records/s",
                _median(runs).rate,
                "rec/s",
                "reference",
                ref.rate,
            )
        )


def _wal_note(figure: str, mine: Ingestion, ref: Ingestion) -> str:
    if figure != "WAL written":
        return ""
    during = [
        who
        for who, use in (("kasparro", mine.db), ("reference", ref.db))
        if use.checkpoints  # None (unknown) or 0 need no note
    ]
    return f"a checkpoint ran during: {', '.join(during)}" if during else ""


CSV_MAPPING = {"name": "name", "value": "value", "observed-at": "updated_at"}
JSON_MAPPING = {"name": "name", "value": "current_price", "observed-at": "last_updated"}
HTTP_MAPPING = {"name": "name", "value": "quotes.USD.price", "observed-at": "last_updated"}


def _median(runs: list[Ingestion]) -> Ingestion:
    return sorted(runs, key=lambda r: r.rate)[(len(runs) - 1) // 2]


def _spread(runs: list[Ingestion]) -> str:
    return ", ".join(f"{r.rate:,.0f}" for r in runs)


@dataclass(slots=True)
class Turns:
    """Every load of a scenario, each contestant's in the order of the turns."""

    mine: list[tuple[Ingestion, str]] = field(default_factory=list)
    """This code's loads, each with the database it loaded."""
    reference: list[Ingestion] = field(default_factory=list)
    variants: dict[str, list[Ingestion]] = field(default_factory=dict)

    def median_mine(self) -> tuple[Ingestion, str]:
        chosen = _median([run for run, _ in self.mine])
        return chosen, next(url for run, url in self.mine if run is chosen)

    def note(self) -> str:
        if len(self.reference) < 2:
            return ""
        return (
            f"median of {len(self.reference)} turns each; kasparro "
            f"{_spread([r for r, _ in self.mine])}, reference {_spread(self.reference)} rec/s"
        )

    def rates(self) -> dict[str, list[float]]:
        return {
            "kasparro": [round(r.rate, 1) for r, _ in self.mine],
            "reference": [round(r.rate, 1) for r in self.reference],
            **{label: [round(r.rate, 1) for r in runs] for label, runs in self.variants.items()},
        }


def _rounds(
    ctx: Context,
    mine: Callable[[int, Variant], tuple[Ingestion, str]],
    ref: Callable[[int], Ingestion],
) -> Turns:
    """Kasparro, each variant and the reference in turns, ``sizes.rounds`` times each.

    The machine is shared and noisy: one load each can be several tens of
    percent apart from the next one. Taking turns exposes all to the same
    conditions, and the median of each is compared. Each turn starts with the
    next contestant, so none always runs first or right after another.
    """
    turns = Turns(variants={v.label: [] for v in ctx.variants})
    contestants: list[Variant | None] = [THIS, *ctx.variants, None]
    for index in range(ctx.sizes.rounds):
        shift = index % len(contestants)
        for who in contestants[shift:] + contestants[:shift]:
            if who is None:
                turns.reference.append(ref(index))
            elif who is THIS:
                turns.mine.append(mine(index, who))
            else:
                turns.variants[who.label].append(mine(index, who)[0])
    return turns


def _log_load(ctx: Context, who: str, run: Ingestion) -> None:
    ctx.log(
        f"    {who}: {run.fetched:,} records in {run.measured.wall_seconds:.1f}s "
        f"({run.rate:,.0f}/s)"
    )


def ingest_csv(ctx: Context) -> None:
    """The 1M-row CSV end to end, then the no-op rerun, against the reference."""

    def mine(index: int, variant: Variant) -> tuple[Ingestion, str]:
        url = ctx.server.create("csv")
        ctx.log(f"  etl run ({variant.label}): {ctx.inputs.csv.name} (turn {index + 1})")
        run = etl_run(ctx, url, "csv", f"csv-full-{variant.label}-{index + 1}", variant=variant)
        _log_load(ctx, variant.label, run)
        return run, url

    def ref(index: int) -> Ingestion:
        run = reference_run(
            ctx, "csv", str(ctx.inputs.csv), CSV_MAPPING, f"reference-csv-{index + 1}"
        )
        _log_load(ctx, "reference", run)
        return run

    turns = _rounds(ctx, mine, ref)
    full, url = turns.median_mine()
    ctx.csv_full = full
    unified = _unified_rows(url)
    # Three reruns, the median kept: one start-up of a 0.3 s process is at the
    # mercy of whatever else the machine does in that instant.
    ctx.log("  etl run again (nothing new), three times")
    noops = [etl_run(ctx, url, "csv", f"csv-noop-{index + 1}") for index in range(3)]
    ctx.log("    " + ", ".join(f"{n.measured.wall_seconds:.2f}s" for n in noops))
    noop = sorted(noops, key=lambda n: n.measured.wall_seconds)[1]
    _ingestion_rows(ctx, "ingest_csv", turns, Goal(">=", 1.3), unified)
    add = ctx.results.add
    add(
        Row(
            "noop_rerun",
            "wall of a rerun with nothing new [median of 3]",
            noop.measured.wall_seconds,
            "s",
            "full load wall",
            full.measured.wall_seconds,
            Goal("<=", 0.02),
        )
    )
    noop_run = float(noop.run.get("duration_seconds") or 0.0)
    full_run = float(full.run.get("duration_seconds") or 0.0)
    add(
        Row(
            "noop_rerun",
            "run duration_seconds (in-process, no start-up)",
            noop_run,
            "s",
            "full load run",
            full_run or None,
        )
    )
    ctx.results.details["noop_rerun"] = noop.summary()
    ctx.loaded_db = url


def refresh_csv(ctx: Context) -> None:
    """Every name again: the 1M-row CSV loaded, then a second file of the same
    names (each ten times) with new values and newer timestamps, measured.

    This is what a ticker export refreshed every few minutes brings: no new
    name, every record new, every unified row replaced by a newer one. Each
    contestant loads the first file once; each turn copies that database and
    loads the second file onto the copy.
    """
    second = str(ctx.inputs.csv_second)
    templates: dict[str, str] = {}

    def loaded(variant: Variant) -> str:
        if variant.label not in templates:
            url = ctx.server.create("refresh_first")
            ctx.log(f"  etl run ({variant.label}): {ctx.inputs.csv.name} (the first load)")
            etl_run(ctx, url, "csv", f"refresh-first-{variant.label}", variant=variant)
            templates[variant.label] = url
        return ctx.server.create("refresh", template=templates[variant.label])

    def mine(index: int, variant: Variant) -> tuple[Ingestion, str]:
        url = loaded(variant)
        ctx.log(f"  etl run ({variant.label}): {ctx.inputs.csv_second.name} (turn {index + 1})")
        run = etl_run(
            ctx,
            url,
            "csv",
            f"refresh-csv-{variant.label}-{index + 1}",
            {"CSV_SOURCE_PATH": second},
            variant=variant,
        )
        _log_load(ctx, variant.label, run)
        return run, url

    def ref(index: int) -> Ingestion:
        if "reference" not in templates:
            ctx.log("  reference: the first load")
            url = ctx.server.create("ref_refresh_first")
            reference_run(ctx, "csv", str(ctx.inputs.csv), CSV_MAPPING, "ref-first", url=url)
            templates["reference"] = url
        url = ctx.server.create("ref_refresh", template=templates["reference"])
        run = reference_run(
            ctx, "csv", second, CSV_MAPPING, f"reference-refresh-csv-{index + 1}", url=url
        )
        _log_load(ctx, "reference", run)
        return run

    turns = _rounds(ctx, mine, ref)
    _, url = turns.median_mine()
    _ingestion_rows(ctx, "refresh_csv", turns, Goal(">=", 1.0), _unified_rows(url))


def ingest_jsonl(ctx: Context) -> None:
    """The JSON Lines file end to end against the reference."""

    def mine(index: int, variant: Variant) -> tuple[Ingestion, str]:
        url = ctx.server.create("jsonl")
        ctx.log(f"  etl run ({variant.label}): {ctx.inputs.jsonl.name} (turn {index + 1})")
        run = etl_run(ctx, url, "json", f"jsonl-{variant.label}-{index + 1}", variant=variant)
        _log_load(ctx, variant.label, run)
        return run, url

    def ref(index: int) -> Ingestion:
        location = str(ctx.inputs.jsonl)
        run = reference_run(ctx, "jsonl", location, JSON_MAPPING, f"reference-jsonl-{index + 1}")
        _log_load(ctx, "reference", run)
        return run

    turns = _rounds(ctx, mine, ref)
    _, url = turns.median_mine()
    _ingestion_rows(ctx, "ingest_jsonl", turns, Goal(">=", 1.0), _unified_rows(url))


def ingest_http(ctx: Context) -> None:
    """The paged local upstream (rate limit off) end to end against the reference."""
    upstream = ctx.upstream
    assert upstream is not None

    def mine(index: int, variant: Variant) -> tuple[Ingestion, str]:
        url = ctx.server.create("http")
        ctx.log(
            f"  etl run ({variant.label}): {ctx.sizes.http_records:,} records over "
            f"{ctx.sizes.http_pages} pages (turn {index + 1})"
        )
        run = etl_run(ctx, url, "api", f"http-{variant.label}-{index + 1}", variant=variant)
        _log_load(ctx, variant.label, run)
        return run, url

    def ref(index: int) -> Ingestion:
        run = reference_run(ctx, "http", upstream.url, HTTP_MAPPING, f"reference-http-{index + 1}")
        _log_load(ctx, "reference", run)
        return run

    turns = _rounds(ctx, mine, ref)
    _, url = turns.median_mine()
    _ingestion_rows(ctx, "ingest_http", turns, Goal(">=", 0.7), _unified_rows(url))


def refresh_http(ctx: Context) -> None:
    """An API response of 10k tickers in one request, as the shipped ``api`` source
    asks for it: the first load, then the same coins with new prices and newer
    timestamps (a ticker refresh), each measured, on a fresh database per turn."""
    records = ctx.sizes.noop_http_records
    first = PagedUpstream(make_tickers(records, seed=8), records).start()
    newer = PagedUpstream(make_tickers(records, seed=9, shift_days=1), records).start()
    sources = str(ctx.inputs.api_only_sources_file)
    first_loads = Turns(variants={v.label: [] for v in ctx.variants})

    def mine(index: int, variant: Variant) -> tuple[Ingestion, str]:
        url = ctx.server.create("refresh_http")
        label = f"{variant.label}-{index + 1}"
        ctx.log(
            f"  etl run ({variant.label}): {records:,} tickers, then refreshed (turn {index + 1})"
        )
        extra = {"SOURCES_FILE": sources, "API_SOURCE_URL": first.url}
        load = etl_run(ctx, url, "api", f"refresh-http-first-{label}", extra, variant=variant)
        extra["API_SOURCE_URL"] = newer.url
        run = etl_run(ctx, url, "api", f"refresh-http-{label}", extra, variant=variant)
        if variant is THIS:
            first_loads.mine.append((load, url))
        else:
            first_loads.variants[variant.label].append(load)
        ctx.log(
            f"    {variant.label}: first load {load.measured.wall_seconds:.2f}s, "
            f"refresh {run.measured.wall_seconds:.2f}s"
        )
        return run, url

    def ref(index: int) -> Ingestion:
        url = ctx.server.create("ref_refresh_http")
        load = reference_run(
            ctx,
            "http",
            first.url,
            HTTP_MAPPING,
            f"ref-http-first-{index + 1}",
            url=url,
            page_size=records,
        )
        first_loads.reference.append(load)
        run = reference_run(
            ctx,
            "http",
            newer.url,
            HTTP_MAPPING,
            f"ref-http-refresh-{index + 1}",
            url=url,
            page_size=records,
        )
        ctx.log(
            f"    reference: first load {load.measured.wall_seconds:.2f}s, "
            f"refresh {run.measured.wall_seconds:.2f}s"
        )
        return run

    try:
        turns = _rounds(ctx, mine, ref)
    finally:
        first.stop()
        newer.stop()
    _, url = turns.median_mine()
    unified = _unified_rows(url)
    _ingestion_rows(ctx, "first_http", first_loads, Goal(">=", 1.0), unified)
    _ingestion_rows(ctx, "refresh_http", turns, Goal(">=", 1.0), unified)


def noop_http(ctx: Context) -> None:
    """A rerun on an unchanged API response (one request, every record already stored).

    The response is read whole every run and each record is checked against raw
    by its content hash, so this is the cost of re-reading a whole response. The
    baseline is the same command on an upstream that answers ``[]``: start-up,
    migrations, the run's records and one request, with nothing to read.
    """
    records = ctx.sizes.noop_http_records
    tickers = PagedUpstream(make_tickers(records, seed=7), records).start()
    empty = PagedUpstream([], 1).start()
    try:
        sources = str(ctx.inputs.api_only_sources_file)
        url = ctx.server.create("noop_http")
        extra = {"SOURCES_FILE": sources, "API_SOURCE_URL": tickers.url}
        ctx.log(f"  etl run: {records:,} tickers in one response")
        first = etl_run(ctx, url, "api", "noop-http-first", extra)
        ctx.log(f"    {first.fetched:,} records in {first.measured.wall_seconds:.2f}s")
        ctx.log("  etl run again (the same response), three times")
        reruns = [etl_run(ctx, url, "api", f"noop-http-{i + 1}", extra) for i in range(3)]
        ctx.log("    " + ", ".join(f"{r.measured.wall_seconds:.2f}s" for r in reruns))
        ctx.log("  etl run on an empty response, three times (the baseline)")
        empty_url = ctx.server.create("noop_http_empty")
        empty_extra = {"SOURCES_FILE": sources, "API_SOURCE_URL": empty.url}
        bases = [
            etl_run(ctx, empty_url, "api", f"noop-http-empty-{i + 1}", empty_extra)
            for i in range(3)
        ]
        ctx.log("    " + ", ".join(f"{b.measured.wall_seconds:.2f}s" for b in bases))
    finally:
        tickers.stop()
        empty.stop()
    rerun = sorted(reruns, key=lambda r: r.measured.wall_seconds)[1]
    base = sorted(bases, key=lambda r: r.measured.wall_seconds)[1]
    source = (rerun.run.get("sources") or {}).get("api") or {}
    note = (
        f"fetched {source.get('fetched')}, new {source.get('raw_inserted')}, "
        f"duplicates {source.get('duplicates')}"
    )
    add = ctx.results.add
    add(
        Row(
            "noop_http",
            f"wall of a rerun on an unchanged {records:,}-record response [median of 3]",
            rerun.measured.wall_seconds,
            "s",
            "the same on an empty response",
            base.measured.wall_seconds,
            Goal("<=", 1.0, on="value"),
            note,
        )
    )
    add(
        Row(
            "noop_http",
            "run duration_seconds (in-process, no start-up)",
            float(rerun.run.get("duration_seconds") or 0.0),
            "s",
            "the same on an empty response",
            float(base.run.get("duration_seconds") or 0.0) or None,
        )
    )
    add(
        Row(
            "noop_http",
            "wall of the rerun against the first load",
            rerun.measured.wall_seconds,
            "s",
            "first load wall",
            first.measured.wall_seconds,
        )
    )
    ctx.results.details["noop_http"] = {
        "first": first.summary(),
        "rerun": rerun.summary(),
        "empty": base.summary(),
    }


_FILL_RUNS = """
INSERT INTO etl_runs (id, trigger, status, started_at, finished_at)
SELECT gen_random_uuid(), 'schedule',
    CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 10 = 0 THEN 'partial' ELSE 'success' END,
    timestamptz '2026-01-01' + make_interval(secs => i * 300),
    timestamptz '2026-01-01' + make_interval(secs => i * 300 + 0.2 + (i % 300) / 10.0)
FROM generate_series(1, $1::int) AS i
"""
_FILL_SOURCES = """
INSERT INTO etl_run_sources (run_id, source, position, status, fetched, raw_inserted,
    duplicates, rejected, unified_upserted, started_at, finished_at)
SELECT r.id, s.name, s.position,
    CASE WHEN r.status = 'failed' OR (r.status = 'partial' AND s.name = 'api') THEN 'failed'
        ELSE 'success' END,
    100, 10, 90, 1, 10, r.started_at, r.finished_at
FROM etl_runs AS r CROSS JOIN (VALUES ('api', 0), ('csv', 1), ('json', 2)) AS s(name, position)
"""


def _timed_gets(base: str, paths: Sequence[str], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of ``rounds`` sequential GETs of each path, in turns, on one connection."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    times: dict[str, list[float]] = {path: [] for path in paths}
    try:
        for _ in range(rounds):
            for path in paths:
                began = time.perf_counter()
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                times[path].append((time.perf_counter() - began) * 1000)
                if response.status != 200:
                    raise BenchError(f"GET {path} answered {response.status}")
    finally:
        conn.close()
    return times


def metrics_scrape(ctx: Context) -> None:
    """``GET /metrics`` on a database holding a million runs, against ``GET /health``.

    The runs are written at the migration before the metric totals, then the
    database is upgraded: the totals are backfilled from them, and what the
    upgrade costs on such a database is a figure too.
    """
    from persistence.database import alembic_upgrade, run_migrations

    runs = ctx.sizes.scrape_runs
    url = ctx.server.create("metrics_scrape")
    alembic_upgrade(url, "0004")
    ctx.log(f"  writing {runs:,} runs of three sources each")
    began = time.perf_counter()
    asyncio.run(_execute(url, (_FILL_RUNS, runs), (_FILL_SOURCES,), ("VACUUM ANALYZE",)))
    ctx.log(f"    {time.perf_counter() - began:.1f}s")
    began = time.perf_counter()
    run_migrations(url)
    upgrade = time.perf_counter() - began
    ctx.log(f"  upgrade to the newest migration (totals backfilled): {upgrade:.1f}s")
    with Service(ctx, url, "metrics-scrape", {"SOURCES_FILE": str(ctx.inputs.sources_file)}) as svc:
        _timed_gets(svc.base, ["/metrics", "/health"], 20)  # warm up
        times = _timed_gets(svc.base, ["/metrics", "/health"], 300)
        _, text = _get_text(svc.base + "/metrics")
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("etl_runs_total{")
    )
    if counted != runs:
        raise BenchError(f"/metrics counts {counted:g} runs, the database holds {runs:,}")
    scrape, health = sorted(times["/metrics"]), sorted(times["/health"])
    add = ctx.results.add
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        add(
            Row(
                "metrics_scrape",
                f"GET /metrics {label} with {runs:,} runs [300 sequential]",
                _quantile(scrape, q),
                "ms",
                "GET /health (one query)",
                _quantile(health, q),
            )
        )
    add(
        Row(
            "metrics_scrape",
            f"migration to the newest with {runs:,} runs (totals backfilled)",
            upgrade,
            "s",
        )
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _get_text(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - local URL
        return response.status, response.read().decode()


async def _execute(url: str, *statements: tuple[Any, ...]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for sql, *args in statements:
            await conn.execute(sql, *args)
    finally:
        await conn.close()


def memory(ctx: Context) -> None:
    """Peak RSS of the CSV load at the base size and at three times as many rows."""
    base = ctx.csv_full
    if base is None:
        ctx.log(f"  etl run: {ctx.inputs.csv.name}")
        base = etl_run(ctx, ctx.server.create("mem_base"), "csv", "memory-base")
    ctx.log(f"  etl run: {ctx.inputs.memory_csv.name}")
    big = etl_run(
        ctx,
        ctx.server.create("mem_big"),
        "csv",
        "memory-big",
        {"CSV_SOURCE_PATH": str(ctx.inputs.memory_csv)},
    )
    ctx.log(
        f"    {big.fetched:,} records in {big.measured.wall_seconds:.1f}s, "
        f"peak {big.measured.peak_rss_mb:.0f} MB"
    )
    ctx.log("  reference")
    ref = reference_run(ctx, "csv", str(ctx.inputs.memory_csv), CSV_MAPPING, "reference-memory")
    ctx.log(f"    {ref.fetched:,} records in {ref.measured.wall_seconds:.1f}s ({ref.rate:,.0f}/s)")
    add = ctx.results.add
    small_label = f"{base.fetched / 1e6:g}M rows"
    add(
        Row(
            "memory",
            f"peak RSS at {small_label}",
            base.measured.peak_rss_mb,
            "MB",
            goal=Goal("<=", 300, on="value"),
        )
    )
    add(
        Row(
            "memory",
            f"peak RSS at {big.fetched / 1e6:g}M rows",
            big.measured.peak_rss_mb,
            "MB",
            f"at {small_label}",
            base.measured.peak_rss_mb,
            Goal("<=", 1.15),
        )
    )
    add(
        Row(
            "memory",
            f"records/s at {big.fetched / 1e6:g}M rows",
            big.rate,
            "rec/s",
            "reference",
            ref.rate,
        )
    )
    add(
        Row(
            "memory",
            f"records/s at {big.fetched / 1e6:g}M rows vs at {small_label}",
            big.rate,
            "rec/s",
            f"at {small_label}",
            base.rate,
        )
    )
    ctx.results.details["memory"] = {
        "base": base.summary(),
        "big": big.summary(),
        "reference_big": ref.summary(),
    }


# -- reads -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - local URL
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, body.decode(errors="replace")


class Service:
    """``kasparro serve`` on a free port, stopped on exit."""

    def __init__(
        self,
        ctx: Context,
        url: str,
        label: str,
        extra: Mapping[str, str],
        variant: Variant = THIS,
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        settings = {
            "SOURCES_FILE": str(ctx.inputs.csv_only_sources_file),
            "API_KEY": API_KEY,
            "ETL_ON_STARTUP": "false",
            "ETL_INTERVAL_SECONDS": "0",
            **extra,
            **variant.env,
        }
        env = service_env(ctx.workdir, _service_settings(ctx, url, settings), variant.root)
        argv = kasparro(
            "serve", "--host", "127.0.0.1", "--port", str(self.port), python=variant.python
        )
        self.process = Background(argv, env, ctx.workdir, ctx.logs / f"{ctx.label(label)}.log")
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.running:
                raise BenchError(
                    f"serve exited {self.process.proc.returncode} before answering; "
                    f"see {self.process.log_path}\n{self.process.log_tail(800)}"
                )
            try:
                status, _ = get_json(self.base + "/", timeout=2.0)
            except OSError:
                time.sleep(0.2)
                continue
            if status == 200:
                return
            time.sleep(0.2)
        self.process.stop()
        raise BenchError(
            f"serve did not answer GET / within {timeout:.0f}s; see {self.process.log_path}"
        )

    def last_etl(self) -> str | None:
        try:
            _, body = get_json(self.base + "/health", timeout=10.0)
        except OSError:
            return None
        return body.get("last_etl") if isinstance(body, dict) else None

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()


@dataclass(frozen=True, slots=True)
class Measurement:
    """A load run, and how busy the service and the database server were during it."""

    load: LoadResult
    serve_cores: float | None
    """CPU seconds of the service's processes per second of load (1.0 = one core)."""
    db_cores: float | None
    """The same for the database server."""
    idle_cores: float | None
    """Idle CPU of the whole machine per second of load (load generator included)."""

    @property
    def rps(self) -> float:
        return self.load.rps

    @property
    def p50_ms(self) -> float:
        return self.load.p50_ms

    @property
    def p99_ms(self) -> float:
        return self.load.p99_ms

    @property
    def errors(self) -> int:
        return self.load.errors

    @property
    def requests(self) -> int:
        return self.load.requests

    def cpu_per_request_ms(self) -> float | None:
        """CPU of the service and the database server per request answered."""
        if self.serve_cores is None or self.db_cores is None or not self.rps:
            return None
        return (self.serve_cores + self.db_cores) / self.rps * 1000.0

    def busy(self) -> str:
        parts = []
        if self.serve_cores is not None:
            parts.append(f"serve {self.serve_cores:.0%} CPU")
        if self.db_cores is not None:
            parts.append(f"db {self.db_cores:.0%} CPU")
        if self.idle_cores is not None:
            parts.append(f"machine idle {self.idle_cores:.0%}")
        return ", ".join(parts)


def measure(
    ctx: Context,
    service: Service,
    path: str,
    headers: Mapping[str, str] | None = None,
    *,
    warm: bool = True,
) -> Measurement:
    """Warm up, then hold the load on ``path``; refuses a path that does not answer 200."""
    url = service.base + path
    status, body = get_json(url, headers)
    if status != 200:
        raise BenchError(f"GET {url} answered {status}: {str(body)[:300]}")
    if warm and ctx.sizes.warmup_seconds > 0:
        run_load(url, headers or {}, ctx.sizes.warmup_seconds)
    serve_before = tree_cpu_seconds(service.process.proc.pid)
    db_before = ctx.server.cpu_seconds()
    machine_before = machine_cpu_times()
    started = time.perf_counter()
    result = run_load(url, headers or {}, ctx.sizes.read_seconds)
    elapsed = time.perf_counter() - started
    machine_after = machine_cpu_times()
    serve = _delta(serve_before, tree_cpu_seconds(service.process.proc.pid))
    db = _delta(db_before, ctx.server.cpu_seconds())
    idle = (
        (machine_after[1] - machine_before[1]) / elapsed
        if machine_before is not None and machine_after is not None
        else None
    )
    if result.errors:
        ctx.log(f"    {result.errors} failed requests on {url}")
    return Measurement(
        result,
        serve / elapsed if serve is not None else None,
        db / elapsed if db is not None else None,
        idle,
    )


def _load_summary(result: Measurement) -> dict[str, Any]:
    return {
        "tool": result.load.tool,
        "requests": result.requests,
        "errors": result.errors,
        "seconds": round(result.load.seconds, 3),
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "serve_cpu_cores": _round(result.serve_cores),
        "db_cpu_cores": _round(result.db_cores),
        "machine_idle_cores": _round(result.idle_cores),
    }


def _ensure_loaded(ctx: Context) -> str:
    """A database holding the CSV load (the one ``ingest_csv`` left, or a new one)."""
    if ctx.loaded_db is None:
        url = ctx.server.create("reads")
        ctx.log(f"  loading {ctx.inputs.csv.name} for reads")
        etl_run(ctx, url, "csv", "reads-load")
        ctx.loaded_db = url
    return ctx.loaded_db


def _deep_cursor(base: str, total: int) -> str:
    """A cursor to the last page of 100: take the ``next_cursor`` of an offset page
    that ends 100 rows before the end; follow cursors from the start if that fails."""
    start = max(0, total - 1100)
    status, body = get_json(f"{base}/data?limit=1000&offset={start}", AUTH)
    if status == 200 and isinstance(body, dict):
        cursor = (body.get("pagination") or {}).get("next_cursor")
        if cursor:
            return str(cursor)
    cursor = None
    seen = 0
    while seen < total - 100:
        query = f"limit={min(1000, total - 100 - seen)}" + (
            f"&cursor={quote(cursor)}" if cursor else ""
        )
        status, body = get_json(f"{base}/data?{query}", AUTH)
        if status != 200 or not isinstance(body, dict):
            raise BenchError(f"cannot follow cursors: {status} {str(body)[:200]}")
        seen += len(body.get("data") or [])
        cursor = (body.get("pagination") or {}).get("next_cursor")
        if not cursor:
            raise BenchError("the cursor chain ended before the last page")
    assert cursor is not None
    return cursor


NOT_KEPT = "/data, pages not kept:"
"""Figures of a server started with ``DATA_CACHE_BYTES=0``."""


Target = tuple[str, "Service", str, Mapping[str, str]]
"""A figure's name, the server, the path and the headers of its requests."""


def _in_turns(ctx: Context, targets: list[Target]) -> dict[str, list[Measurement]]:
    """Every target in turn, ``rounds`` times, so a noisy moment of the shared
    machine hits all alike; each turn starts one server further on."""
    turns: dict[str, list[Measurement]] = {name: [] for name, _, _, _ in targets}
    servers = list(dict.fromkeys(id(service) for _, service, _, _ in targets))
    for turn in range(ctx.sizes.rounds):
        first = servers[turn % len(servers)]
        ordered = sorted(
            targets, key=lambda t: (servers.index(id(t[1])) - servers.index(first)) % len(servers)
        )
        for name, service, path, headers in ordered:
            ctx.log(f"  {name} (turn {turn + 1})")
            result = measure(ctx, service, path, headers)
            turns[name].append(result)
            ctx.log(
                f"    {result.rps:,.0f} req/s, "
                f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms ({result.busy()})"
            )
    return turns


def _median_rps(results: list[Measurement]) -> Measurement:
    return sorted(results, key=lambda r: r.rps)[(len(results) - 1) // 2]


def _paired(mine: list[Measurement], other: list[Measurement]) -> str:
    return ", ".join(f"{a.rps / b.rps:.2f}x" for a, b in zip(mine, other, strict=True) if b.rps)


def reads(ctx: Context) -> None:
    """``/data`` first, deep-by-cursor and deep-by-offset pages, ``/health``, ``/stats``,
    each against ``GET /`` of the same server; the same pages from a server that
    keeps none (``DATA_CACHE_BYTES=0``), and from each variant's server, all in turns."""
    url = _ensure_loaded(ctx)
    rows = _unified_rows(url)
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(Service(ctx, url, "serve-reads", {}))
        # The same pages from a server that keeps none: what reading a page costs
        # (the first request after every change pays it).
        plain = stack.enter_context(
            Service(ctx, url, "serve-reads-not-kept", {"DATA_CACHE_BYTES": "0"})
        )
        others = [
            (v, stack.enter_context(Service(ctx, url, f"serve-reads-{v.label}", {}, v)))
            for v in ctx.variants
        ]
        base = service.base
        status, first = get_json(f"{base}/data?limit=1", AUTH)
        if status != 200 or not isinstance(first, dict):
            raise BenchError(f"/data answered {status}: {str(first)[:300]}")
        total = int((first.get("pagination") or {}).get("total") or rows)
        cursor = _deep_cursor(base, total)
        status, last = get_json(f"{base}/data?limit=100&cursor={quote(cursor)}", AUTH)
        if status != 200 or not (last.get("data") if isinstance(last, dict) else None):
            raise BenchError(f"the deep cursor page answered {status}: {str(last)[:300]}")
        deep = f"/data?limit=100&cursor={quote(cursor)}"
        targets: list[Target] = [
            ("GET /", service, "/", {}),
            ("/data?limit=100 first page", service, "/data?limit=100", AUTH),
            ("/data deepest page by cursor", service, deep, AUTH),
            (
                "/data deepest page by offset",
                service,
                f"/data?limit=100&offset={max(0, total - 100)}",
                AUTH,
            ),
            ("/health", service, "/health", {}),
            ("/stats", service, "/stats", {}),
            (f"{NOT_KEPT} GET /", plain, "/", {}),
            (f"{NOT_KEPT} first page", plain, "/data?limit=100", AUTH),
            (f"{NOT_KEPT} deepest page by cursor", plain, deep, AUTH),
        ]
        for variant, server in others:
            targets += [
                (f"{variant.label}: GET /", server, "/", {}),
                (f"{variant.label}: first page", server, "/data?limit=100", AUTH),
                (f"{variant.label}: deepest page by cursor", server, deep, AUTH),
            ]
        every = _in_turns(ctx, targets)
    measured = {name: _median_rps(results) for name, results in every.items()}
    root = measured["GET /"]
    first_page = measured["/data?limit=100 first page"]
    failed = {name: r.errors for name, r in measured.items() if r.errors}
    if failed:
        ctx.log(f"  failed or timed-out requests: {failed}")
    note = "" if rows >= MIN_READ_ROWS else f"only {rows} unified rows"
    add = ctx.results.add
    add(Row("reads", "GET / req/s (the baseline)", root.rps, "req/s", note=root.busy()))
    add(Row("reads", "GET / p99", root.p99_ms, "ms"))
    for name in (
        "/data?limit=100 first page",
        "/data deepest page by cursor",
        "/data deepest page by offset",
        "/health",
        "/stats",
    ):
        result = measured[name]
        is_first = result is first_page
        notes = [note] if is_first and note else []
        if result.busy():
            notes.append(result.busy())
        if result.errors:
            notes.append(f"{result.errors} of {result.requests} requests failed")
        add(
            Row(
                "reads",
                f"{name} req/s",
                result.rps,
                "req/s",
                "GET /",
                root.rps,
                Goal(">=", 0.25) if is_first else None,
                "; ".join(notes),
            )
        )
        add(Row("reads", f"{name} p50", result.p50_ms, "ms", "GET / p50", root.p50_ms))
        add(
            Row(
                "reads",
                f"{name} p99",
                result.p99_ms,
                "ms",
                "GET / p99",
                root.p99_ms,
                Goal("<=", 50, on="value") if is_first else None,
            )
        )
    for name in ("/data deepest page by cursor", "/data deepest page by offset"):
        add(
            Row(
                "reads",
                f"{name} req/s vs first page",
                measured[name].rps,
                "req/s",
                "first page",
                first_page.rps,
                Goal(">=", 0.9) if "cursor" in name else None,
            )
        )
    plain_root = measured[f"{NOT_KEPT} GET /"]
    plain_first = measured[f"{NOT_KEPT} first page"]
    plain_deep = measured[f"{NOT_KEPT} deepest page by cursor"]
    add(Row("reads", f"{NOT_KEPT} GET / req/s", plain_root.rps, "req/s", note=plain_root.busy()))
    for name, result in (
        (f"{NOT_KEPT} first page", plain_first),
        (f"{NOT_KEPT} deepest page by cursor", plain_deep),
    ):
        add(
            Row(
                "reads",
                f"{name} req/s",
                result.rps,
                "req/s",
                "GET /",
                plain_root.rps,
                note=result.busy(),
            )
        )
        add(Row("reads", f"{name} p99", result.p99_ms, "ms", "GET / p99", plain_root.p99_ms))
    add(
        Row(
            "reads",
            f"{NOT_KEPT} deepest page by cursor req/s vs first page",
            plain_deep.rps,
            "req/s",
            "first page",
            plain_first.rps,
            Goal(">=", 0.9),
        )
    )
    # What keeping pages buys, turn by turn (the servers took turns).
    for name, kept, fresh in (
        ("first page", "/data?limit=100 first page", f"{NOT_KEPT} first page"),
        (
            "deepest page by cursor",
            "/data deepest page by cursor",
            f"{NOT_KEPT} deepest page by cursor",
        ),
    ):
        add(
            Row(
                "reads",
                f"/data {name} req/s, pages kept against not kept",
                measured[kept].rps,
                "req/s",
                "not kept",
                measured[fresh].rps,
                note=f"each turn: {_paired(every[kept], every[fresh])}",
            )
        )
        add(
            Row(
                "reads",
                f"/data {name} p99, pages kept against not kept",
                measured[kept].p99_ms,
                "ms",
                "not kept",
                measured[fresh].p99_ms,
            )
        )
        kept_cpu = [m.cpu_per_request_ms() for m in every[kept]]
        fresh_cpu = [m.cpu_per_request_ms() for m in every[fresh]]
        if None not in kept_cpu and None not in fresh_cpu:
            add(
                Row(
                    "reads",
                    f"/data {name} CPU per request (serve and database), kept against not kept",
                    statistics.median(c for c in kept_cpu if c is not None),
                    "ms",
                    "not kept",
                    statistics.median(c for c in fresh_cpu if c is not None),
                    note="each turn: "
                    + ", ".join(
                        f"{a / b:.2f}x" for a, b in zip(kept_cpu, fresh_cpu, strict=True) if a and b
                    ),
                )
            )
    for variant, _ in others:
        for name, mine in (
            ("first page", "/data?limit=100 first page"),
            ("deepest page by cursor", "/data deepest page by cursor"),
        ):
            theirs = f"{variant.label}: {name}"
            add(
                Row(
                    "reads",
                    f"/data {name} req/s against {variant.label}",
                    measured[mine].rps,
                    "req/s",
                    variant.label,
                    measured[theirs].rps,
                    note=f"each turn: {_paired(every[mine], every[theirs])}",
                )
            )
            add(
                Row(
                    "reads",
                    f"/data {name} p99 against {variant.label}",
                    measured[mine].p99_ms,
                    "ms",
                    variant.label,
                    measured[theirs].p99_ms,
                )
            )
    ctx.results.details["reads"] = {
        "unified_rows": rows,
        "total_reported": total,
        "connections": 32,
        **{name: _load_summary(r) for name, r in measured.items()},
        "turns": {name: [round(r.rps, 1) for r in results] for name, results in every.items()},
    }


def _newest_run(base: str) -> dict[str, Any] | None:
    status, body = get_json(f"{base}/runs?limit=1", AUTH, timeout=10.0)
    if status != 200 or not isinstance(body, dict) or not body.get("data"):
        return None
    newest = body["data"][0]
    return newest if isinstance(newest, dict) else None


def _run_errors(run: Mapping[str, Any]) -> str:
    sources = run.get("sources") or {}
    errors = {name: s.get("error") for name, s in sources.items() if s.get("error")}
    return f"status {run.get('status')}" + (f", errors {errors}" if errors else "")


def _wait_running(service: Service, previous_run: str | None, timeout: float) -> None:
    """Return once a run newer than ``previous_run`` is under way.

    Raises:
        BenchError: it ended before it was seen running (a failure names its errors),
            or none started within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = _newest_run(service.base)
        if newest is not None and newest.get("id") != previous_run:
            if newest.get("status") == "running":
                return
            raise BenchError(
                f"the ingestion ended before reads were measured: {_run_errors(newest)}"
            )
        time.sleep(0.1)
    raise BenchError(f"no ingestion was seen running within {timeout:.0f}s")


def _wait_finished(service: Service, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = _newest_run(service.base)
        if newest is None or newest.get("status") != "running":
            return newest
        time.sleep(0.5)
    return None


def _windows(
    ctx: Context, take: Callable[[], Measurement], busy: Callable[[], bool]
) -> tuple[Measurement, bool]:
    """Up to ``rounds`` load windows, one after the other, each kept when
    ``busy()`` still holds after it; returns the window of median p99 (one
    window's p99 on this machine varies by half from one to the next) and
    whether it overlapped the work whole (a lone first window is kept either way)."""
    taken: list[Measurement] = []
    overlapped = True
    for _ in range(ctx.sizes.rounds):
        window = take()
        if busy():
            taken.append(window)
            continue
        if not taken:
            taken.append(window)
            overlapped = False
        break
    p99s = ", ".join(f"{m.p99_ms:.1f}" for m in taken)
    ctx.log(f"    p99 of each window: {p99s} ms")
    ordered = sorted(taken, key=lambda m: m.p99_ms)
    return ordered[(len(ordered) - 1) // 2], overlapped


def under_load(ctx: Context) -> None:
    """``/data`` p99 while the service ingests 1M new rows itself, while a separate
    ``etl run`` ingests 1M more, and idle, on one server and database."""
    url = _ensure_loaded(ctx)
    data_path = "/data?limit=100"
    extra = {"ETL_ON_STARTUP": "true", "CSV_SOURCE_PATH": str(ctx.inputs.csv_second)}
    details: dict[str, Any] = {}
    previous = asyncio.run(
        scalar(url, "SELECT id::text FROM etl_runs ORDER BY started_at DESC LIMIT 1")
    )
    with Service(ctx, url, "serve-under-load", extra) as service:
        _wait_running(service, previous, 60.0)
        ctx.log(f"  {data_path} while the service ingests {ctx.inputs.csv_second.name}")
        during, in_service_overlap = _windows(
            ctx,
            lambda: measure(ctx, service, data_path, AUTH, warm=False),
            lambda: service.last_etl() == "running",
        )
        ctx.log(
            f"    p99 {during.p99_ms:.2f} ms, {during.rps:,.0f} req/s ({during.busy()})"
            + ("" if in_service_overlap else " (ingestion ended early)")
        )
        finished = _wait_finished(service, 3600.0)
        if finished is None or finished.get("status") not in ("success", "partial"):
            raise BenchError(
                "the service's ingestion did not succeed: "
                + (_run_errors(finished) if finished else "still running after an hour")
            )
        details["in_service_run"] = finished
        ctx.log(f"  {data_path} idle")
        idle, _ = _windows(ctx, lambda: measure(ctx, service, data_path, AUTH), lambda: True)
        ctx.log(f"    p99 {idle.p99_ms:.2f} ms, {idle.rps:,.0f} req/s ({idle.busy()})")

        ctx.log(
            f"  {data_path} while `etl run` ingests {ctx.inputs.csv_third.name} in another process"
        )
        env = service_env(
            ctx.workdir,
            _service_settings(
                ctx,
                url,
                {
                    "SOURCES_FILE": str(ctx.inputs.csv_only_sources_file),
                    "CSV_SOURCE_PATH": str(ctx.inputs.csv_third),
                },
            ),
        )
        loader = Background(
            kasparro("etl", "run", "--source", "csv", "--json"),
            env,
            ctx.workdir,
            ctx.logs / f"{ctx.label('under-load-etl-run')}.log",
        )
        try:
            _wait_running(service, str(finished.get("id")), 60.0)
            external, external_overlap = _windows(
                ctx,
                lambda: measure(ctx, service, data_path, AUTH, warm=False),
                lambda: loader.running,
            )
            code = loader.wait(3600)
        finally:
            loader.stop()
        if code not in (0, 3):
            raise BenchError(f"the separate etl run exited {code}; see {loader.log_path}")
        ctx.log(
            f"    p99 {external.p99_ms:.2f} ms, {external.rps:,.0f} req/s ({external.busy()})"
            + ("" if external_overlap else " (ingestion ended early)")
        )
    add = ctx.results.add
    add(
        Row(
            "under_load",
            f"{data_path} p99 during the service's own ingestion",
            during.p99_ms,
            "ms",
            "idle p99",
            idle.p99_ms,
            Goal("<=", 3.0),
            "" if in_service_overlap else "ingestion ended during the measurement",
        )
    )
    add(
        Row(
            "under_load",
            f"{data_path} req/s during the service's own ingestion",
            during.rps,
            "req/s",
            "idle",
            idle.rps,
        )
    )
    add(
        Row(
            "under_load",
            f"{data_path} p99 during `etl run` in another process",
            external.p99_ms,
            "ms",
            "idle p99",
            idle.p99_ms,
            Goal("<=", 3.0),
            "" if external_overlap else "ingestion ended during the measurement",
        )
    )
    add(
        Row(
            "under_load",
            f"{data_path} req/s during `etl run` in another process",
            external.rps,
            "req/s",
            "idle",
            idle.rps,
        )
    )
    details.update(
        {
            "during_in_service": _load_summary(during),
            "in_service_overlap": in_service_overlap,
            "during_external": _load_summary(external),
            "external_overlap": external_overlap,
            "idle": _load_summary(idle),
        }
    )
    ctx.results.details["under_load"] = details


# -- profile -----------------------------------------------------------------------------


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def _spy_args(py_spy: str, out: Path) -> list[str]:
    return [
        py_spy,
        "record",
        "--format",
        "raw",
        "--idle",
        "--threads",
        "--full-filenames",
        "--rate",
        "100",
        "-o",
        str(out),
    ]


def _profile_rows(ctx: Context, scenario: str, summary: Mapping[str, Any]) -> None:
    for thread, shares in summary["threads"].items():
        for category, share in shares.items():
            if share >= 0.01:
                ctx.results.add(Row(scenario, f"{thread}: {category}", share * 100, "%"))


def profile(ctx: Context) -> None:
    """py-spy samples (all threads, idle included) of the CSV ``etl run`` and of the
    service answering ``/data?limit=100`` under load, summarized by where the time goes.

    Shares are of the main thread's samples: ``main thread: waiting`` is the time
    its event loop had nothing to run."""
    py_spy = _py_spy()
    if py_spy is None:
        raise BenchError("py-spy is not installed (pip install py-spy)")
    raw = ctx.out / "profile-csv.txt"
    ctx.log(f"  py-spy record: etl run {ctx.inputs.csv.name}")
    wrap = [*_spy_args(py_spy, raw), "--"]
    run = etl_run(ctx, ctx.server.create("profile"), "csv", "profile-csv", wrap=wrap)
    summary = summarize(raw.read_text(encoding="utf-8"), INGESTION)
    ctx.results.details["profile_csv"] = {
        "collapsed_stacks": str(raw),
        "run": run.summary(),
        **summary,
    }
    _profile_rows(ctx, "profile_csv", summary)

    url = _ensure_loaded(ctx)
    raw = ctx.out / "profile-reads.txt"
    path = "/data?limit=100"
    with Service(ctx, url, "serve-profile", {}) as service:
        seconds = ctx.sizes.read_seconds
        ctx.log(f"  py-spy record: serve under load on {path}")
        spy = Background(
            [
                *_spy_args(py_spy, raw),
                "--pid",
                str(service.process.proc.pid),
                "--duration",
                str(round(seconds + 1)),
            ],
            service_env(ctx.workdir, {}),
            ctx.workdir,
            ctx.logs / f"{ctx.label('py-spy-serve')}.log",
        )
        try:
            time.sleep(0.5)  # attached before the load starts
            load = measure(ctx, service, path, AUTH, warm=False)
            if spy.wait(seconds + 30) is None or not raw.is_file():
                raise BenchError(f"py-spy did not write {raw}; see {spy.log_path}")
        finally:
            spy.stop()
    summary = summarize(raw.read_text(encoding="utf-8"), API)
    ctx.results.details["profile_reads"] = {
        "collapsed_stacks": str(raw),
        "load_while_profiled": _load_summary(load),
        **summary,
    }
    _profile_rows(ctx, "profile_reads", summary)


def changes(ctx: Context) -> None:
    """The load with 100 consumers polling ``/changes`` against the load alone (bench/feed.py)."""
    from bench.feed import changes as measure_changes

    measure_changes(ctx)


# -- identity --------------------------------------------------------------------------


def identity(ctx: Context) -> None:
    """Identity on the real captures (bench/identity.py), and what it costs.

    With ``BENCH_BASELINE`` (a checkout of the code before identity), the CSV
    load and a 2,500-ticker API source (the CoinPaprika capture, one request)
    are timed with this code and that one, in turns: their wall times compared.
    """
    from bench import identity as figures

    for found in figures.measure(ctx.server, ctx.workdir):
        label = f"CoinGecko {found.capture}, {found.order}"
        ctx.log(
            f"  {label}: {found.one_row}/{found.present_in_both} in one row, "
            f"{len(found.split)} split, {len(found.merged_across)} merged"
        )
        ctx.results.add(
            Row(
                "identity",
                f"assets in both upstreams in one row ({label})",
                100.0 * found.one_row_share,
                "%",
                goal=Goal(">=", 90.0, on="value"),
                note=f"split: {', '.join(f'{g} / {p}' for g, p in found.split)}",
            )
        )
        ctx.results.add(
            Row(
                "identity",
                f"distinct assets in one row ({label})",
                float(len(found.merged_across) + found.merged_within),
                "pairs",
                goal=Goal("<=", 0.0, on="value"),
            )
        )
    baseline = os.environ.get("BENCH_BASELINE", "").strip()
    if not baseline:
        ctx.log("  BENCH_BASELINE unset: no timing against the code before identity")
        return
    records = json.loads(figures.PAPRIKA.read_text(encoding="utf-8"))
    upstream = PagedUpstream(records, len(records)).start()
    try:
        for symbol in (True, False):
            mapping = (
                'mapping = { name = "name", value = "quotes.USD.price", '
                'observed_at = "last_updated", id = "id"'
                + (', symbol = "symbol" }' if symbol else " }")
            )
            (ctx.workdir / f"identity-sources-{symbol}.toml").write_text(
                f'[[sources]]\nname = "api"\nkind = "http"\nlocation = "{upstream.url}"\n'
                f"rate_limit_per_second = 0\nmax_retries = 2\ntimeout_seconds = 60\n{mapping}\n\n"
                f'[[sources]]\nname = "csv"\nkind = "csv"\n'
                f"location = {json.dumps(str(ctx.inputs.csv))}\n"
                'mapping = { name = "name", value = "value", observed_at = "updated_at" }\n',
                encoding="utf-8",
            )
        for source, what in (("api", f"{len(records):,}-ticker API source"), ("csv", "CSV")):
            mine: list[Ingestion] = []
            before: list[Ingestion] = []
            for turn in range(ctx.sizes.rounds):
                for who, code, runs in (("identity", None, mine), ("before", baseline, before)):
                    extra = {
                        "SOURCES_FILE": str(ctx.workdir / f"identity-sources-{code is None}.toml"),
                        # The captures' upstream, not the paged one of ingest_http.
                        "API_SOURCE_URL": upstream.url,
                    }
                    if code is not None:
                        extra["PYTHONPATH"] = code
                    url = ctx.server.create(f"identity_{source}_{who}")
                    run = etl_run(ctx, url, source, f"identity-{source}-{who}-{turn + 1}", extra)
                    _log_load(ctx, who, run)
                    runs.append(run)
            chosen, base = _median(mine), _median(before)
            ctx.results.add(
                Row(
                    "identity",
                    f"wall, {what} ({chosen.fetched:,} records)",
                    chosen.measured.wall_seconds,
                    "s",
                    "before identity",
                    base.measured.wall_seconds,
                    Goal("<=", 1.15),
                    note=(
                        f"median of {len(mine)} turns each; identity "
                        f"{', '.join(f'{r.measured.wall_seconds:.2f}' for r in mine)}, before "
                        f"{', '.join(f'{r.measured.wall_seconds:.2f}' for r in before)} s"
                    ),
                )
            )
    finally:
        upstream.stop()


SCENARIOS: dict[str, Callable[[Context], None]] = {
    "ingest_csv": ingest_csv,
    "refresh_csv": refresh_csv,
    "ingest_jsonl": ingest_jsonl,
    "ingest_http": ingest_http,
    "refresh_http": refresh_http,
    "noop_http": noop_http,
    "metrics_scrape": metrics_scrape,
    "memory": memory,
    "reads": reads,
    "under_load": under_load,
    "changes": changes,
    "profile": profile,
    "identity": identity,
}
DEFAULT = (
    "ingest_csv",
    "refresh_csv",
    "ingest_jsonl",
    "ingest_http",
    "refresh_http",
    "noop_http",
    "metrics_scrape",
    "memory",
    "reads",
    "under_load",
    "changes",
    "identity",
)

# Which generated files each scenario reads.
NEEDS: dict[str, set[str]] = {
    "ingest_csv": {"csv"},
    "refresh_csv": {"csv", "csv_second"},
    "ingest_jsonl": {"jsonl"},
    "ingest_http": set(),
    "refresh_http": set(),
    "noop_http": set(),
    "metrics_scrape": set(),
    "memory": {"csv", "memory_csv"},
    "reads": {"csv"},
    "under_load": {"csv", "csv_second", "csv_third"},
    "changes": {"csv"},
    "profile": {"csv"},
    "identity": {"csv"},
}
