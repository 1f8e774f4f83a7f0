"""The loading processes' garbage collector (config/runtime.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import cast

import pytest

from app import cli
from config import runtime
from config.settings import Settings


@pytest.fixture
def collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_collect_rarely_freezes_what_is_alive_and_raises_the_young_threshold(
    collector: None,
) -> None:
    _, older, oldest = gc.get_threshold()
    gc.unfreeze()

    runtime.collect_rarely()

    assert gc.get_threshold() == (runtime.YOUNG_THRESHOLD, older, oldest)
    assert gc.get_freeze_count() > 1000  # the imported modules


def test_the_etl_commands_collect_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def reset(settings: object, sources: object) -> int:
        calls.append("reset")
        return 0

    monkeypatch.setattr(cli, "collect_rarely", lambda: calls.append("collect_rarely"))
    monkeypatch.setattr(cli, "_etl_reset", reset)
    args = cli.build_parser().parse_args(["etl", "reset", "--source", "csv"])

    assert cli._dispatch(args, cast("Settings", None)) == 0
    assert calls == ["collect_rarely", "reset"]
