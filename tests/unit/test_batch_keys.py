"""A batch's keys: each once, with its latest record, and whether they are plain names."""

from __future__ import annotations

from datetime import UTC, datetime

from persistence.batches import BatchKeys, batch_keys

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


def test_keys_travel_as_strings_and_their_records_decode_unchanged() -> None:
    latest = [("btc-bitcoin", "bitcoin", "BTC", 97000.5, LATE), ("eth", "eth", None, 1.5, None)]
    keys = BatchKeys.of(latest)
    assert keys.keys == ["btc-bitcoin", "eth"]
    assert keys.latest() == latest


def test_named_only_when_every_key_is_its_name_without_a_ticker() -> None:
    assert BatchKeys.of([("bitcoin", "bitcoin", None, 1.0, LATE)]).named
    assert BatchKeys.of([]).named
    assert not BatchKeys.of([("bitcoin", "bitcoin", "BTC", 1.0, LATE)]).named
    assert not BatchKeys.of([("btc-bitcoin", "bitcoin", None, 1.0, LATE)]).named
