"""The exact end-of-scenario audit of the database.

Given what every source delivered, the audit computes on its own (without the
product's code) what the database must hold, reads what it holds, prints both
side by side, and fails on any difference:

- raw: every distinct record of each source exactly once (and nothing else);
- unified: every canonical name exactly once, holding the contract's winner
  (greatest ``observed_at``; ties to the source listed first);
- checkpoints at the end of the input;
- no run, and no run source, left ``running``;
- per source, over all runs: ``fetched = raw_inserted + duplicates``, and the
  ``raw_inserted`` sum equals the raw rows stored.

The printed lines are also collected in :data:`REPORTS`, which the package's
``conftest.py`` shows in the terminal summary, so they appear in CI output even
when pytest captures stdout.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

#: (scenario, lines) of every audit run in this session, in order.
REPORTS: list[tuple[str, list[str]]] = []

_NUMBER = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


@dataclass(frozen=True, slots=True)
class SourceInput:
    """Everything one source delivered during a scenario.

    Attributes:
        name: the source's name in the sources file.
        table: its raw table.
        records: every record delivered, as stored in raw (a CSV row is a
            header-to-string object); repeats are allowed and collapse.
        mapping: paths of ``name``, ``value``, ``observed_at`` in a record.
        checkpoint: what the committed cursor must contain at the end (``None``:
            the key must be absent).
    """

    name: str
    table: str
    records: Sequence[Mapping[str, Any]]
    mapping: Mapping[str, str]
    checkpoint: Mapping[str, Any] = field(default_factory=dict)


# -- the expectation, computed from the input alone -----------------------------------


def canonical(raw: str) -> str:
    """Contract section 4: NFKC, case-folded, trimmed, inner whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", raw).casefold().split())


def _get(record: Mapping[str, Any], path: str) -> Any:
    if path in record:
        return record[path]
    current: Any = record
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _value(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float) or (isinstance(raw, str) and _NUMBER.match(raw)):
        number = float(raw)
    else:
        return None
    return number if math.isfinite(number) else None


def _timestamp(raw: Any) -> datetime | None:
    if not isinstance(raw, str) or not raw.strip():
        return None
    moment = datetime.fromisoformat(raw.strip())
    if moment.tzinfo is None:
        raise AssertionError(f"audit inputs carry zoned timestamps, got {raw!r}")
    return moment


def _canon_json(value: Any) -> str:
    """One spelling per JSON value (numbers as floats: jsonb may respell them)."""

    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, Mapping):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        raise TypeError(type(v))

    return json.dumps(norm(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class _Winner:
    key: tuple[datetime, int]
    allowed: set[tuple[str, float]]


def expected_unified(sources: Sequence[SourceInput]) -> tuple[dict[str, _Winner], int]:
    """Winner per canonical name, and how many distinct records are rejected.

    ``allowed`` holds more than one (source, value) only when the input itself
    has a tie the contract breaks by ingestion time.
    """
    winners: dict[str, _Winner] = {}
    rejected = 0
    for position, source in enumerate(sources):
        seen: set[str] = set()
        for record in source.records:
            spelled = _canon_json(record)
            if spelled in seen:
                continue
            seen.add(spelled)
            raw_name = _get(record, source.mapping["name"])
            name = canonical(raw_name) if isinstance(raw_name, str) else ""
            value = _value(_get(record, source.mapping["value"]))
            observed = _timestamp(_get(record, source.mapping["observed_at"]))
            if not name or value is None:
                rejected += 1
                continue
            if observed is None:
                raise AssertionError("audit inputs must carry observed_at")
            key = (observed, -position)
            current = winners.get(name)
            if current is None or key > current.key:
                winners[name] = _Winner(key, {(source.name, value)})
            elif key == current.key:
                current.allowed.add((source.name, value))
    return winners, rejected


# -- the audit ------------------------------------------------------------------------


async def audit(database_url: str, scenario: str, sources: Sequence[SourceInput]) -> list[str]:
    """Compare the database with the expectation; print it; fail on any difference."""
    lines: list[str] = [f"AUDIT {scenario}"]
    problems: list[str] = []

    def check(ok: bool, line: str) -> None:
        lines.append(("  ok   " if ok else "  FAIL ") + line)
        if not ok:
            problems.append(line)

    conn = await asyncpg.connect(database_url)
    try:
        # raw: each distinct record exactly once, nothing else
        raw_rows: dict[str, int] = {}
        for source in sources:
            expected = Counter(_canon_json(r) for r in source.records)
            found = Counter(
                _canon_json(json.loads(text))
                for text in await conn.fetchval(
                    f"SELECT coalesce(array_agg(payload::text), '{{}}') FROM {source.table} "
                    "WHERE source = $1",
                    source.name,
                )
            )
            raw_rows[source.name] = sum(found.values())
            missing = len(expected.keys() - found.keys())
            unexpected = len(found.keys() - expected.keys())
            doubled = sum(1 for n in found.values() if n > 1)
            check(
                missing == unexpected == doubled == 0 and len(found) == len(expected),
                f"raw {source.name}: expected {len(expected)} distinct records "
                f"({sum(expected.values())} delivered), found {sum(found.values())} rows, "
                f"{len(found)} distinct; missing {missing}, unexpected {unexpected}, "
                f"stored twice {doubled}",
            )

        # unified: every canonical name once, with the winner
        winners, rejected = expected_unified(sources)
        found_unified = {
            row["name"]: row
            for row in await conn.fetch("SELECT name, value, source, observed_at FROM unified_data")
        }
        missing_names = winners.keys() - found_unified.keys()
        extra_names = found_unified.keys() - winners.keys()
        wrong: list[str] = []
        for name, winner in winners.items():
            row = found_unified.get(name)
            if row is None:
                continue
            if (row["source"], row["value"]) not in winner.allowed or row[
                "observed_at"
            ] != winner.key[0]:
                wrong.append(
                    f"{name!r}: expected {sorted(winner.allowed)} at {winner.key[0].isoformat()}, "
                    f"found ({row['source']!r}, {row['value']}) at {row['observed_at'].isoformat()}"
                )
        check(
            not missing_names and not extra_names and not wrong,
            f"unified: expected {len(winners)} names ({rejected} distinct records rejected), "
            f"found {len(found_unified)}; missing {len(missing_names)}, extra {len(extra_names)}, "
            f"wrong winner {len(wrong)}",
        )
        for example in wrong[:5]:
            lines.append(f"         e.g. {example}")
        for name in sorted(missing_names)[:3]:
            lines.append(f"         e.g. missing {name!r}")
        for name in sorted(extra_names)[:3]:
            lines.append(f"         e.g. extra {name!r}")
        by_source = Counter(row["source"] for row in found_unified.values())
        expected_by_source = Counter(
            next(iter(w.allowed))[0] for w in winners.values() if len(w.allowed) == 1
        )
        lines.append(
            f"         winners by source: expected {dict(sorted(expected_by_source.items()))}, "
            f"found {dict(sorted(by_source.items()))}"
        )

        # checkpoints at the end of the input
        for source in sources:
            text = await conn.fetchval(
                "SELECT cursor::text FROM etl_checkpoint WHERE source = $1", source.name
            )
            cursor = json.loads(text) if text else {}
            ok = True
            for key, want in source.checkpoint.items():
                ok = ok and cursor.get(key) == want
            shown = {k: cursor.get(k) for k in source.checkpoint}
            check(
                ok, f"checkpoint {source.name}: expected {dict(source.checkpoint)}, found {shown}"
            )

        # runs: none left running; counters add up
        statuses = Counter(row["status"] for row in await conn.fetch("SELECT status FROM etl_runs"))
        errors = Counter(
            row["error"]
            for row in await conn.fetch(
                "SELECT error FROM etl_runs WHERE status = 'failed' AND error IS NOT NULL"
            )
        )
        running_sources = await conn.fetchval(
            "SELECT count(*) FROM etl_run_sources WHERE status = 'running'"
        )
        check(
            statuses.get("running", 0) == 0 and running_sources == 0,
            f"runs: {sum(statuses.values())} in all {dict(sorted(statuses.items()))}; "
            f"running: expected 0, found {statuses.get('running', 0)} runs and "
            f"{running_sources} run sources",
        )
        if errors:
            lines.append(f"         failed-run errors: {dict(errors)}")
        for source in sources:
            row = await conn.fetchrow(
                "SELECT count(*)::int AS runs, coalesce(sum(fetched), 0)::bigint AS fetched, "
                "coalesce(sum(raw_inserted), 0)::bigint AS raw_inserted, "
                "coalesce(sum(duplicates), 0)::bigint AS duplicates, "
                "coalesce(sum(rejected), 0)::bigint AS rejected "
                "FROM etl_run_sources WHERE source = $1",
                source.name,
            )
            check(
                row["fetched"] == row["raw_inserted"] + row["duplicates"]
                and row["raw_inserted"] == raw_rows[source.name],
                f"counters {source.name} over {row['runs']} runs: fetched {row['fetched']} = "
                f"raw_inserted {row['raw_inserted']} + duplicates {row['duplicates']}; "
                f"raw_inserted sum {row['raw_inserted']} vs raw rows {raw_rows[source.name]}; "
                f"rejected {row['rejected']}",
            )
    finally:
        await conn.close()

    print("\n".join(lines), flush=True)
    REPORTS.append((scenario, lines))
    assert not problems, "audit failed:\n" + "\n".join(problems)
    return lines


def note(scenario: str, *text: str) -> None:
    """Print scenario lines (faults tried, timings) and keep them for the summary."""
    lines = [f"NOTE {scenario}", *(f"  {t}" for t in text)]
    print("\n".join(lines), flush=True)
    REPORTS.append((scenario, lines))
