"""Schema drift detection: pipelines/drift.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from config.sources import DriftPolicy, FieldMapping, Kind, SourceConfig
from pipelines.drift import DriftEvent, detect_drift, name_similarity, observe_schema
from pipelines.transform import Unified, transform

JSON_MAPPING = FieldMapping(name="name", value="current_price", observed_at="last_updated", id="id")


def _source(
    policy: DriftPolicy = "evolve", kind: Kind = "json", mapping: FieldMapping = JSON_MAPPING
) -> SourceConfig:
    return SourceConfig(
        name="json", kind=kind, location="x.json", mapping=mapping, drift_policy=policy
    )


def _coin(i: int, *, price_key: str = "current_price", **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": f"coin-{i}",
        "symbol": f"c{i}",
        "name": f"Coin {i}",
        price_key: 100.0 + i,
        "market_cap": 1_000_000 + i,
        "total_volume": 5000.5,
        "last_updated": "2024-05-01T12:00:00.000Z",
        "roi": None,
    }
    record.update(extra)
    return record


def _coins(n: int = 5, **kwargs: Any) -> list[dict[str, Any]]:
    return [_coin(i, **kwargs) for i in range(n)]


def _kinds(events: list[DriftEvent]) -> set[tuple[str, str]]:
    return {(e.kind, e.field) for e in events}


# --- observe_schema ---------------------------------------------------------


def test_observe_schema_flattens_dicts_types_lists_and_nulls() -> None:
    records: list[Any] = [
        {"quotes": {"USD": {"price": 1}}, "tags": [{"a": 1}], "n": 1, "gone": None},
        {"quotes": {"USD": {"price": 2.5}}, "tags": [], "n": 2.0, "gone": None, "flag": True},
        "not a dict",
        None,
    ]
    assert observe_schema(records) == {
        "flag": "boolean",
        "gone": "null",
        "n": "number",
        "quotes": "object",
        "quotes.USD": "object",
        "quotes.USD.price": "number",
        "tags": "array",
    }


def test_observe_schema_null_does_not_hide_the_type_and_depth_is_bounded() -> None:
    records = [{"p": None, "a": {"b": {"c": 1}}}, {"p": "x", "a": {"b": {"c": 2}}}]
    assert observe_schema(records, max_depth=2) == {"a": "object", "a.b": "object", "p": "string"}


def test_observe_schema_is_fast_on_a_large_flat_batch() -> None:
    records = _coins(20_000)
    best = min(_timed(observe_schema, records) for _ in range(3))
    assert best < 0.05


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# --- the acceptance case: current_price renamed currentPrice ------------------


@pytest.mark.parametrize("with_previous", [True, False])
def test_rename_is_followed_under_evolve_and_values_still_load(with_previous: bool) -> None:
    previous = observe_schema(_coins()) if with_previous else None
    batch = _coins(price_key="currentPrice")

    outcome = detect_drift(_source("evolve"), batch, previous)

    assert outcome.error is None
    renamed = [e for e in outcome.events if e.kind == "renamed"]
    assert len(renamed) == 1
    assert renamed[0].field == "current_price"
    assert renamed[0].new_field == "currentPrice"
    assert renamed[0].confidence is not None
    assert renamed[0].confidence >= 0.8
    # The rename replaces the missing event and the new field is not "added".
    assert ("missing", "current_price") not in _kinds(outcome.events)
    assert ("added", "currentPrice") not in _kinds(outcome.events)
    assert outcome.mapping.value == "currentPrice"
    assert outcome.mapping.name == "name"
    assert outcome.mapping.observed_at == "last_updated"
    rows = [transform(r, outcome.mapping) for r in batch]
    assert all(isinstance(r, Unified) for r in rows)
    assert [r.value for r in rows if isinstance(r, Unified)] == [100.0 + i for i in range(5)]


def test_followed_rename_stays_followed_on_later_runs() -> None:
    first = detect_drift(_source("evolve"), _coins(), None)
    second = detect_drift(_source("evolve"), _coins(price_key="currentPrice"), first.schema)
    third = detect_drift(_source("evolve"), _coins(price_key="currentPrice"), second.schema)

    assert second.mapping.value == "currentPrice"
    assert third.error is None
    assert third.mapping.value == "currentPrice"
    assert _kinds(third.events) == {("renamed", "current_price")}


def test_rename_fails_the_source_under_freeze() -> None:
    previous = observe_schema(_coins())
    outcome = detect_drift(_source("freeze"), _coins(price_key="currentPrice"), previous)

    assert outcome.error is not None
    assert outcome.error.startswith("schema drift under freeze policy: ")
    assert "missing current_price" in outcome.error
    assert "added currentPrice" in outcome.error
    assert "\n" not in outcome.error
    assert outcome.mapping == JSON_MAPPING  # nothing followed
    assert {("missing", "current_price"), ("added", "currentPrice")} <= _kinds(outcome.events)
    renamed = [e for e in outcome.events if e.kind == "renamed"]
    assert [(e.new_field, (e.confidence or 0) >= 0.8) for e in renamed] == [("currentPrice", True)]
    # A failed frozen source keeps the old schema, so it fails again next run.
    assert outcome.schema == previous


def test_freeze_fails_on_a_first_batch_missing_a_mapped_field() -> None:
    outcome = detect_drift(_source("freeze"), _coins(price_key="currentPrice"), None)
    assert outcome.error is not None
    assert "missing current_price" in outcome.error


def test_freeze_passes_a_batch_without_drift() -> None:
    previous = observe_schema(_coins())
    outcome = detect_drift(_source("freeze"), _coins(), previous)
    assert outcome.events == []
    assert outcome.error is None


# --- added / missing / type_changed ------------------------------------------


def test_first_batch_reports_nothing_for_unmapped_fields() -> None:
    outcome = detect_drift(_source("freeze"), _coins(image="x.png"), None)
    assert outcome.events == []
    assert outcome.error is None
    assert outcome.schema["image"] == "string"


def test_added_and_missing_against_the_previous_schema() -> None:
    previous = observe_schema(_coins(ath={"usd": 1.0, "eur": 2.0}))
    outcome = detect_drift(_source("evolve"), _coins(image="x.png"), previous)

    # ath.usd and ath.eur are hidden under their missing parent.
    assert _kinds(outcome.events) == {("missing", "ath"), ("added", "image")}
    assert outcome.error is None
    assert "ath" not in outcome.schema
    assert "image" in outcome.schema


def test_type_change_number_to_string_on_json() -> None:
    previous = observe_schema(_coins())
    batch = [{**r, "market_cap": str(r["market_cap"])} for r in _coins()]

    evolve = detect_drift(_source("evolve"), batch, previous)
    freeze = detect_drift(_source("freeze"), batch, previous)

    assert evolve.events == [DriftEvent("type_changed", "market_cap", "number -> string")]
    assert evolve.error is None
    assert evolve.schema["market_cap"] == "string"
    assert freeze.error is not None
    assert "market_cap" in freeze.error


def test_null_everywhere_is_not_a_type_change_and_keeps_the_known_type() -> None:
    previous = observe_schema(_coins())
    batch = [{**r, "market_cap": None} for r in _coins()]
    outcome = detect_drift(_source("freeze"), batch, previous)
    assert outcome.events == []
    assert outcome.schema["market_cap"] == "number"


def test_csv_never_reports_type_changed() -> None:
    mapping = FieldMapping(name="name", value="value", observed_at="updated_at")
    previous = {"name": "string", "value": "number", "updated_at": "number"}
    batch = [{"name": "btc", "value": "1.5", "updated_at": "2024-01-01"}]

    outcome = detect_drift(_source("freeze", kind="csv", mapping=mapping), batch, previous)

    assert outcome.events == []
    assert outcome.error is None


def test_missing_name_with_no_similar_field_fails_under_evolve() -> None:
    batch = [{k: v for k, v in r.items() if k != "name"} for r in _coins()]
    outcome = detect_drift(_source("evolve"), batch, observe_schema(_coins()))

    assert outcome.error == "identity field 'name' missing and no confident rename"
    assert ("missing", "name") in _kinds(outcome.events)
    assert not [e for e in outcome.events if e.kind == "renamed"]
    assert outcome.mapping == JSON_MAPPING


def test_missing_optional_field_is_an_event_not_an_error_under_evolve() -> None:
    batch = [{k: v for k, v in r.items() if k != "last_updated"} for r in _coins()]
    outcome = detect_drift(_source("evolve"), batch, None)
    assert outcome.error is None
    assert ("missing", "last_updated") in _kinds(outcome.events)


def test_value_moved_to_an_unrelated_field_is_not_a_rename() -> None:
    # current_price gone; the only new field is unrelated by name.
    previous = observe_schema(_coins())
    batch = [{k: v for k, v in r.items() if k != "current_price"} for r in _coins(fdv=1.0)]
    outcome = detect_drift(_source("evolve"), batch, previous)

    assert outcome.error is not None
    assert "value field 'current_price' missing" in outcome.error
    assert "every record would be rejected" in outcome.error
    assert outcome.mapping.value == "current_price"


def test_weak_rename_is_reported_but_not_followed() -> None:
    mapping = FieldMapping(name="name", value="price")
    previous = {"name": "string", "price": "number"}
    batch = [{"name": "btc", "price_usd": 1.0}]

    outcome = detect_drift(_source("evolve", mapping=mapping), batch, previous)

    renamed = [e for e in outcome.events if e.kind == "renamed"]
    assert len(renamed) == 1
    assert renamed[0].new_field == "price_usd"
    assert renamed[0].confidence is not None
    assert 0.6 <= renamed[0].confidence < 0.8
    assert ("missing", "price") in _kinds(outcome.events)
    assert outcome.mapping.value == "price"
    assert outcome.error is not None  # the value is still missing


def test_candidate_of_an_incompatible_type_loses_confidence() -> None:
    batch = _coins(price_key="currentPrice")
    for record in batch:
        record["currentPrice"] = {"usd": record["currentPrice"]}

    outcome = detect_drift(_source("evolve"), batch, observe_schema(_coins()))

    renamed = [e for e in outcome.events if e.kind == "renamed"]
    assert [e.new_field for e in renamed] == ["currentPrice"]
    assert renamed[0].confidence is not None
    assert renamed[0].confidence < 0.8
    assert outcome.mapping.value == "current_price"
    assert outcome.error is not None


def test_a_field_that_coexisted_with_the_old_one_is_not_its_rename() -> None:
    previous = observe_schema(_coins(current_price_usd=1.0))
    batch = [{k: v for k, v in r.items() if k != "current_price"} for r in _coins()]
    for record in batch:
        record["current_price_usd"] = 1.0

    outcome = detect_drift(_source("evolve"), batch, previous)

    assert not [e for e in outcome.events if e.kind == "renamed"]
    assert outcome.mapping.value == "current_price"


def test_nested_rename_keeps_the_parent_prefix() -> None:
    mapping = FieldMapping(name="name", value="quotes.USD.price")
    previous = {"name": "string", "quotes": "object", "quotes.USD": "object"}
    previous["quotes.USD.price"] = "number"
    batch = [{"name": "btc", "quotes": {"USD": {"Price": 1.0}}, "price": 2.0}]

    outcome = detect_drift(_source("evolve", mapping=mapping), batch, previous)

    assert outcome.mapping.value == "quotes.USD.Price"
    assert outcome.error is None


# --- confidence --------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"), [("current_price", "currentPrice"), ("last_updated", "lastUpdated")]
)
def test_similar_names_are_confident(old: str, new: str) -> None:
    assert 0.8 <= name_similarity(old, new) <= 1.0


@pytest.mark.parametrize(("old", "new"), [("current_price", "market_cap"), ("name", "symbol")])
def test_different_names_are_not_confident(old: str, new: str) -> None:
    assert 0.0 <= name_similarity(old, new) < 0.8


def test_names_under_different_parents_are_never_similar() -> None:
    assert name_similarity("quotes.USD.price", "price") == 0.0


def test_renamed_confidence_is_rounded_to_two_places() -> None:
    outcome = detect_drift(_source("evolve"), _coins(price_key="currentPrice"), None)
    (event,) = [e for e in outcome.events if e.kind == "renamed"]
    assert event.confidence == round(event.confidence or 0, 2)


# --- once per batch, determinism, sampling -------------------------------------


def test_events_are_per_batch_not_per_record_and_deterministic() -> None:
    previous = observe_schema(_coins())
    batch = [
        {**r, "market_cap": str(r["market_cap"]), "image": "x"}
        for r in _coins(5000, price_key="currentPrice")
    ]

    first = detect_drift(_source("freeze"), batch, previous)
    second = detect_drift(_source("freeze"), batch, previous)

    assert first.events == second.events
    assert first.error == second.error
    keys = [(e.kind, e.field, e.new_field) for e in first.events]
    assert len(keys) == len(set(keys))
    assert _kinds(first.events) == {
        ("missing", "current_price"),
        ("renamed", "current_price"),
        ("type_changed", "market_cap"),
        ("added", "currentPrice"),
        ("added", "image"),
    }


def test_a_field_present_in_one_unsampled_record_is_not_missing() -> None:
    batch: list[dict[str, Any]] = _coins(5000)
    for record in batch:
        del record["last_updated"]
    batch[1001]["last_updated"] = "2024-05-01T00:00:00Z"  # outside the sample

    outcome = detect_drift(_source("freeze"), batch, observe_schema(_coins()))

    assert outcome.events == []
    assert outcome.schema["last_updated"] == "string"


def test_empty_batch_changes_nothing() -> None:
    previous = observe_schema(_coins())
    for records in ([], ["not a record", 3]):
        outcome = detect_drift(_source("freeze"), records, previous)
        assert outcome.events == []
        assert outcome.error is None
        assert outcome.mapping == JSON_MAPPING
        assert outcome.schema == previous
    assert detect_drift(_source(), [], None).schema == {}


def test_event_to_dict_is_json_ready() -> None:
    event = DriftEvent("renamed", "a_b", "a_b -> aB", "aB", 0.99)
    assert event.to_dict() == {
        "kind": "renamed",
        "field": "a_b",
        "detail": "a_b -> aB",
        "new_field": "aB",
        "confidence": 0.99,
    }
