"""Comparison of two runs: per-source deltas and the anomaly rules that fire on ``b``.

Pure functions of the run details read from the database, so every rule can be
checked without one.
"""

from __future__ import annotations

from typing import Any

from app.api.schemas import Anomaly, Comparison, Counts, RunSummary, SourceComparison
from persistence.reads import RunDetail, SourceRun

VOLUME_CHANGE_THRESHOLD = 0.5
"""Relative change of a source's fetched count, from ``a`` to ``b``, that is flagged."""
REJECTION_RATE_THRESHOLD = 0.05
"""Share of ``b``'s fetched records rejected above which a source is flagged."""
SLOW_RUN_FACTOR = 3.0
"""``b`` is slow when it took more than this times the median of the previous runs."""
SLOW_RUN_MIN_SECONDS = 1.0
"""Below this a run is never called slow: sub-second runs vary threefold from
scheduling noise alone."""
MEDIAN_WINDOW = 10
"""How many previous finished runs the median duration covers."""

_COUNTS = ("fetched", "raw_inserted", "duplicates", "rejected", "unified_upserted")


def _counts(run: SourceRun) -> Counts:
    return Counts(
        fetched=run.fetched,
        raw_inserted=run.raw_inserted,
        duplicates=run.duplicates,
        rejected=run.rejected,
        unified_upserted=run.unified_upserted,
        duration_seconds=_round(run.duration_seconds),
    )


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _delta(a: SourceRun | None, b: SourceRun | None) -> Counts:
    def value(run: SourceRun | None, key: str) -> int:
        return 0 if run is None else int(getattr(run, key))

    durations = [r.duration_seconds if r is not None else 0.0 for r in (a, b)]
    duration = None if durations[0] is None or durations[1] is None else durations[1] - durations[0]
    fetched, raw, dup, rej, uni = (value(b, k) - value(a, k) for k in _COUNTS)
    return Counts(fetched, raw, dup, rej, uni, _round(duration))


def _summary(run: RunDetail) -> RunSummary:
    return RunSummary(
        id=str(run.id),
        trigger=run.trigger,
        status=run.status,
        started_at=run.started_at,
        finished_at=run.finished_at,
        duration_seconds=_round(run.duration_seconds),
    )


def _drift_key(event: dict[str, Any]) -> tuple[str, str, str]:
    return (str(event.get("kind")), str(event.get("field")), str(event.get("new_field")))


def _source_anomalies(name: str, a: SourceRun | None, b: SourceRun) -> list[Anomaly]:
    found: list[Anomaly] = []
    if a is not None:
        if a.fetched:
            change = (b.fetched - a.fetched) / a.fetched
            if abs(change) > VOLUME_CHANGE_THRESHOLD:
                found.append(
                    Anomaly(
                        rule="volume_change",
                        source=name,
                        detail=(
                            f"fetched changed from {a.fetched} to {b.fetched} "
                            f"({change:+.0%}, more than {VOLUME_CHANGE_THRESHOLD:.0%})"
                        ),
                        value=round(change, 4),
                        threshold=VOLUME_CHANGE_THRESHOLD,
                    )
                )
        elif b.fetched:
            found.append(
                Anomaly(
                    rule="volume_change",
                    source=name,
                    detail=f"fetched changed from 0 to {b.fetched}",
                    value=None,
                    threshold=VOLUME_CHANGE_THRESHOLD,
                )
            )
        if a.status == "success" and b.status == "failed":
            found.append(
                Anomaly(
                    rule="source_failed",
                    source=name,
                    detail=f"succeeded in a, failed in b: {b.error or 'no error recorded'}",
                    value=None,
                    threshold=None,
                )
            )
    if b.fetched:
        rate = b.rejected / b.fetched
        if rate > REJECTION_RATE_THRESHOLD:
            found.append(
                Anomaly(
                    rule="rejection_rate",
                    source=name,
                    detail=(
                        f"{b.rejected} of {b.fetched} fetched records rejected "
                        f"({rate:.1%}, above {REJECTION_RATE_THRESHOLD:.0%})"
                    ),
                    value=round(rate, 4),
                    threshold=REJECTION_RATE_THRESHOLD,
                )
            )
    known = {_drift_key(e) for e in (a.drift if a is not None else [])}
    new = [e for e in b.drift if _drift_key(e) not in known]
    if new:
        kinds = ", ".join(f"{e.get('kind')} {e.get('field')}" for e in new[:5])
        found.append(
            Anomaly(
                rule="new_drift",
                source=name,
                detail=f"{len(new)} drift event(s) in b not seen in a: {kinds}",
                value=float(len(new)),
                threshold=None,
            )
        )
    return found


def compare_runs(a: RunDetail, b: RunDetail, median_seconds: float | None) -> Comparison:
    """Deltas ``b - a`` per source, and the anomalies of ``b``.

    Args:
        a: the reference run.
        b: the run under inspection.
        median_seconds: median duration of the runs before ``b`` (``None``: no history).
    """
    names = list(a.sources) + [n for n in b.sources if n not in a.sources]
    sources: dict[str, SourceComparison] = {}
    anomalies: list[Anomaly] = []
    for name in names:
        sa, sb = a.sources.get(name), b.sources.get(name)
        sources[name] = SourceComparison(
            a_status=None if sa is None else sa.status,
            b_status=None if sb is None else sb.status,
            a=None if sa is None else _counts(sa),
            b=None if sb is None else _counts(sb),
            delta=_delta(sa, sb),
            rejection_rate_b=(
                round(sb.rejected / sb.fetched, 4) if sb is not None and sb.fetched else None
            ),
        )
        if sb is not None:
            anomalies.extend(_source_anomalies(name, sa, sb))
    duration = b.duration_seconds
    if (
        duration is not None
        and median_seconds is not None
        and median_seconds > 0
        and duration >= SLOW_RUN_MIN_SECONDS
        and duration > SLOW_RUN_FACTOR * median_seconds
    ):
        anomalies.append(
            Anomaly(
                rule="slow_run",
                source=None,
                detail=(
                    f"took {duration:.3f} s, more than {SLOW_RUN_FACTOR:g}x the median "
                    f"{median_seconds:.3f} s of the previous runs"
                ),
                value=round(duration / median_seconds, 3),
                threshold=SLOW_RUN_FACTOR,
            )
        )
    both = (a.duration_seconds, b.duration_seconds)
    return Comparison(
        a=_summary(a),
        b=_summary(b),
        duration_delta_seconds=(
            None if both[0] is None or both[1] is None else _round(both[1] - both[0])
        ),
        median_duration_seconds=_round(median_seconds),
        sources=sources,
        anomalies=anomalies,
    )
