"""The start-up signal handling of ``kasparro serve``: a stop raised from the
signal handler reaches the caller wherever it lands, even inside an event
loop's callback (where asyncio only logs most exceptions)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from app.api.server import StopRequested, _StopSignals


def test_a_stop_that_lands_in_an_asyncio_callback_still_ends_the_step() -> None:
    async def step() -> None:
        loop = asyncio.get_running_loop()
        # The signal arrives while the loop runs a callback, as when a
        # connection to the database completes at that instant.
        loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.sleep(5)

    with _StopSignals().installed(), pytest.raises(StopRequested) as stopped:
        asyncio.run(step())
    assert stopped.value.code == 0


def test_a_stop_inside_a_shielded_step_waits_for_its_end() -> None:
    signals = _StopSignals()
    steps: list[str] = []

    def shielded_step() -> None:
        with signals.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("finished")

    with signals.installed(), pytest.raises(StopRequested):
        shielded_step()
    assert steps == ["finished"]


def test_once_serving_a_signal_asks_the_server_to_stop() -> None:
    class Server:
        should_exit = False
        force_exit = False

    signals = _StopSignals()
    server = Server()
    signals.server = server  # type: ignore[assignment]
    with signals.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        assert server.should_exit
        assert not server.force_exit
        os.kill(os.getpid(), signal.SIGINT)
        assert server.force_exit
