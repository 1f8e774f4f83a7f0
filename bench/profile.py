"""Summaries of py-spy's collapsed stacks (``--format raw --threads --idle --full-filenames``).

Each sample is put in one category: waiting (the event loop or a worker with
nothing to do), start-up (imports and migrations), else the category of the
deepest frame that matches a table of path fragments: for ingestion, the
project module the thread was in (reading and parsing, encoding and hashing,
transform, drift, database client, runner); for the API, the component (HTTP
server, framework, the project's handlers and queries, asyncpg, logging).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

_LINE = re.compile(r"^thread \(((?:0x)?[0-9a-fA-F]+)\)(?::\s*([^;]*))?;?(.*)\s(\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")

Categories = Sequence[tuple[str, str]]
"""(path fragment, category) pairs; the deepest frame matching one decides."""

INGESTION: Categories = (
    ("/pipelines/records.py", "encode + hash (records.py)"),
    ("/pipelines/sources/files.py", "read + parse (sources/files.py, csv/json)"),
    ("/pipelines/sources/http.py", "http fetch + decode (sources/http.py)"),
    ("/pipelines/transform.py", "transform (transform.py)"),
    ("/pipelines/drift.py", "drift detection (drift.py)"),
    ("/persistence/", "database client (persistence/, asyncpg)"),
    ("/pipelines/runner.py", "runner (batching, dedupe, planning)"),
    ("/observability/", "logging + metrics"),
    ("/asyncpg/", "database client (persistence/, asyncpg)"),
    ("/asyncio/", "event loop + thread hand-off"),
)

API: Categories = (
    ("/structlog/", "logging (structlog, observability/)"),
    ("/observability/logging", "logging (structlog, observability/)"),
    ("/prometheus_client/", "metrics (prometheus_client, observability/)"),
    ("/observability/", "metrics (prometheus_client, observability/)"),
    ("/asyncpg/", "database client (asyncpg)"),
    ("/persistence/", "queries + row mapping (persistence/)"),
    ("/app/", "the service's own code (app/)"),
    ("/msgspec/", "framework (litestar, msgspec)"),
    ("/litestar/", "framework (litestar, msgspec)"),
    ("/uvicorn/", "HTTP server (uvicorn, h11/httptools)"),
    ("/h11/", "HTTP server (uvicorn, h11/httptools)"),
    ("/httptools/", "HTTP server (uvicorn, h11/httptools)"),
    ("/asyncio/", "event loop"),
)

_IDLE_FILES = ("/selectors.py", "/threading.py", "/queue.py", "/concurrent/futures/thread.py")
_STARTUP = ("_find_and_load", "/alembic/", "run_migrations", "/sqlalchemy/")

IDLE = "waiting (I/O, database, queue)"
STARTUP = "start-up (imports, migrations)"


def _frames(stack: str) -> list[tuple[str, str]]:
    frames: list[tuple[str, str]] = []
    for part in stack.split(";"):
        match = _FRAME.match(part.strip())
        if match:
            frames.append((match.group(1), match.group(2)))
        elif part.strip():
            frames.append((part.strip(), ""))
    return frames


def categorize(frames: list[tuple[str, str]], table: Categories = INGESTION) -> str:
    """The category of one sample, from root-first frames."""
    if not frames:
        return "no Python frame (interpreter start or exit)"
    leaf_func, leaf_path = frames[-1]
    if leaf_path.endswith(_IDLE_FILES) or leaf_func in ("select", "poll", "epoll"):
        return IDLE
    if any(mark in func or mark in path for func, path in frames for mark in _STARTUP):
        return STARTUP
    for _, path in reversed(frames):
        for fragment, category in table:
            if fragment in path:
                return category
    return "other"


def summarize(collapsed: str, table: Categories = INGESTION, top: int = 15) -> dict[str, Any]:
    """Shares of samples per thread group and category, and the hottest leaf frames.

    Shares are fractions of the main thread's samples (one sample per tick), so a
    worker category reads as "the fraction of the run some worker spent on it";
    worker idle time is left out (a pool has several idle threads).
    """
    samples: list[tuple[str, str, int]] = []
    names: dict[str, str] = {}
    for line in collapsed.splitlines():
        match = _LINE.match(line.strip())
        if match:
            tid, name, stack, count = match.groups()
            samples.append((tid, stack, int(count)))
            if name:
                names[tid] = name.strip()
    # py-spy names a thread only once it knows the name; the main thread is the one
    # named MainThread, else the oldest (lowest id: its id is the process id).
    main = next((tid for tid, name in names.items() if name == "MainThread"), None)
    if main is None and samples:
        main = min((tid for tid, _, _ in samples), key=lambda t: int(t, 0))

    per_group: dict[str, Counter[str]] = {}
    leaves: Counter[str] = Counter()
    ticks = 0
    for tid, stack, count in samples:
        group = "main thread" if tid == main else "worker threads"
        frames = _frames(stack)
        category = categorize(frames, table)
        if group == "main thread":
            ticks += count
        elif category == IDLE:
            continue
        per_group.setdefault(group, Counter())[category] += count
        if category not in (IDLE, STARTUP) and frames:
            func, path = frames[-1]
            leaves[f"{func} ({'/'.join(path.split('/')[-2:])})"] += count
    base = ticks or 1
    threads = {
        group: {cat: n / base for cat, n in counts.most_common()}
        for group, counts in per_group.items()
    }
    busy = sum(leaves.values()) or 1
    return {
        "ticks": ticks,
        "threads": threads,
        "hot_leaves": [
            {"frame": frame, "share_of_busy_samples": round(n / busy, 4)}
            for frame, n in leaves.most_common(top)
        ],
    }
