"""The API against its own OpenAPI document, with generated requests (schemathesis).

A real ``kasparro serve`` on a database with known rows; every operation of
``/schema/openapi.json`` gets generated requests, valid and invalid, with the
API key. No response may be a server error or contradict the document.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import (
    coin,
    csv_entry,
    csv_rows,
    json_entry,
    write_csv,
    write_json_array,
    write_sources,
)
from tests.integration.test_serve import Served, served_on_new_database

KEY = "schema-key-0123456789"
# No server error, and every response (status, content type, headers, body) as
# documented. Not "schema-valid data is accepted": an opaque cursor or a run id
# that does not exist is schema-valid and rightly refused.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 200


@pytest.fixture(scope="module")
def live(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("schema")
    write_csv(folder / "a.csv", csv_rows(300))
    write_json_array(
        folder / "b.json", [coin(f"Coin {i}", i + 0.5, "2026-01-01T00:00:00Z") for i in range(50)]
    )
    sources = write_sources(folder, csv_entry(folder / "a.csv"), json_entry(folder / "b.json"))
    with served_on_new_database(server_url, sources, key=KEY, prefix="kasparro_schema") as served:
        yield served


def test_every_operation_conforms_to_the_document(live: Served) -> None:
    api = schemathesis.openapi.from_url(live.url + "/schema/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    # The event stream stays open until the client leaves (tests/integration/test_events.py).
    streams = [op for op in operations if op.path == "/events"]
    assert len(streams) == 1
    operations = [op for op in operations if op not in streams]
    assert len(operations) >= 9
    calls = 0

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers={"x-api-key": KEY}, checks=CHECKS, timeout=10)

        check()
    print(f"{calls} generated requests over {len(operations)} operations")
    assert calls >= 1000
