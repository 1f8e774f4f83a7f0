"""A batch's keys: each once, in first-appearance order, with its latest record."""

from __future__ import annotations

from datetime import UTC, datetime

from persistence.batches import batch_keys

EARLY = datetime(2026, 3, 1, tzinfo=UTC)
LATE = datetime(2026, 3, 2, tzinfo=UTC)


def test_each_key_once_in_first_appearance_order_with_its_latest_record() -> None:
    latest = batch_keys(
        [
            ("b", "b", None, 1.0, LATE),
            ("a", "a", None, 2.0, EARLY),
            ("b", "b", None, 3.0, EARLY),
            ("a", "a", None, 4.0, None),  # no timestamp: observed when ingested, newest
        ]
    )
    assert latest == [("b", "b", None, 1.0, LATE), ("a", "a", None, 4.0, None)]
