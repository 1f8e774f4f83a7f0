"""The anomaly rules of ``/compare-runs``, one by one, at and around their thresholds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.api.compare import compare_runs
from persistence.reads import RunDetail, SourceRun

T0 = datetime(2026, 11, 27, tzinfo=UTC)


def source(**values: Any) -> SourceRun:
    base: dict[str, Any] = {
        "status": "success",
        "fetched": 100,
        "raw_inserted": 100,
        "duplicates": 0,
        "rejected": 0,
        "unified_upserted": 100,
        "error": None,
        "drift": [],
        "duration_seconds": 1.0,
    }
    base.update(values)
    return SourceRun(**base)


def run(seconds: float | None = 10.0, **sources: SourceRun) -> RunDetail:
    return RunDetail(
        id=uuid.uuid4(),
        trigger="schedule",
        status="success",
        started_at=T0,
        finished_at=None if seconds is None else T0 + timedelta(seconds=seconds),
        duration_seconds=seconds,
        sources=sources,
    )


def rules(a: RunDetail, b: RunDetail, median: float | None = 10.0) -> list[tuple[str, str | None]]:
    return [(x.rule, x.source) for x in compare_runs(a, b, median).anomalies]


@pytest.mark.parametrize(
    ("before", "after", "flagged"),
    [
        (1000, 400, True),
        (1000, 499, True),
        (1000, 500, False),  # exactly 50% is not "more than"
        (1000, 1500, False),
        (1000, 1501, True),
        (1000, 1000, False),
        (0, 0, False),
        (0, 10, True),
    ],
)
def test_volume_change_fires_above_half(before: int, after: int, flagged: bool) -> None:
    a = run(api=source(fetched=before))
    b = run(api=source(fetched=after))
    assert (("volume_change", "api") in rules(a, b)) is flagged


@pytest.mark.parametrize(("rejected", "flagged"), [(0, False), (5, False), (6, True), (100, True)])
def test_rejection_rate_fires_above_five_percent_of_fetched(rejected: int, flagged: bool) -> None:
    a = run(csv=source())
    b = run(csv=source(rejected=rejected))
    assert (("rejection_rate", "csv") in rules(a, b)) is flagged
    assert compare_runs(a, b, None).sources["csv"].rejection_rate_b == rejected / 100


@pytest.mark.parametrize(
    ("seconds", "median", "flagged"),
    [
        (31.0, 10.0, True),
        (30.0, 10.0, False),  # exactly 3x is not "more than"
        (12.0, 10.0, False),
        (0.9, 0.1, False),  # sub-second runs are never called slow
        (1.5, 0.4, True),
        (31.0, None, False),  # no history, no median
        (None, 10.0, False),  # still running
    ],
)
def test_slow_run_compares_b_with_the_median(
    seconds: float | None, median: float | None, flagged: bool
) -> None:
    found = rules(run(api=source()), run(seconds, api=source()), median)
    assert (("slow_run", None) in found) is flagged


def test_new_drift_is_drift_b_has_and_a_had_not() -> None:
    renamed = {
        "kind": "renamed",
        "field": "current_price",
        "new_field": "currentPrice",
        "confidence": 0.9,
        "detail": "x",
    }
    added = {
        "kind": "added",
        "field": "extra",
        "new_field": None,
        "confidence": None,
        "detail": "y",
    }
    assert ("new_drift", "json") in rules(run(json=source()), run(json=source(drift=[renamed])))
    same = rules(run(json=source(drift=[renamed])), run(json=source(drift=[renamed])))
    assert ("new_drift", "json") not in same
    more = compare_runs(
        run(json=source(drift=[renamed])), run(json=source(drift=[renamed, added])), None
    )
    flag = next(x for x in more.anomalies if x.rule == "new_drift")
    assert flag.value == 1.0
    assert "added extra" in flag.detail


@pytest.mark.parametrize(
    ("a_status", "b_status", "flagged"),
    [
        ("success", "failed", True),
        ("failed", "failed", False),
        ("failed", "success", False),
        ("success", "success", False),
    ],
)
def test_source_failed_needs_success_then_failure(
    a_status: str, b_status: str, flagged: bool
) -> None:
    a = run(api=source(status=a_status))
    b = run(api=source(status=b_status, error="HTTP 500"))
    assert (("source_failed", "api") in rules(a, b)) is flagged


def test_deltas_cover_every_count_and_the_duration() -> None:
    a = run(
        10.0,
        api=source(
            fetched=10,
            raw_inserted=8,
            duplicates=2,
            rejected=1,
            unified_upserted=7,
            duration_seconds=2.0,
        ),
    )
    b = run(
        12.5,
        api=source(
            fetched=15,
            raw_inserted=9,
            duplicates=6,
            rejected=0,
            unified_upserted=9,
            duration_seconds=3.25,
        ),
        csv=source(fetched=4, duration_seconds=0.5),
    )
    result = compare_runs(a, b, None)
    api = result.sources["api"].delta
    assert (
        api.fetched,
        api.raw_inserted,
        api.duplicates,
        api.rejected,
        api.unified_upserted,
        api.duration_seconds,
    ) == (5, 1, 4, -1, 2, 1.25)
    # A source only in b counts from zero, and is not a volume change of a known source.
    csv = result.sources["csv"]
    assert csv.a is None
    assert csv.a_status is None
    assert csv.delta.fetched == 4
    assert csv.delta.duration_seconds == 0.5
    assert result.duration_delta_seconds == 2.5
    assert ("volume_change", "csv") not in [(x.rule, x.source) for x in result.anomalies]
