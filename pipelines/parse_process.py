"""Large files are read, parsed and transformed in a process of their own.

In one interpreter, parsing and transforming a chunk (about two thirds of the
loader's CPU) could only take turns with the event loop that sends batches to
the database: the GIL let them overlap in name only. A parse process works on
the next chunks while the database writes the current one, and hands over
ready :class:`pipelines.prepare.Prepared` chunks, already reduced to the
columns the batch statement takes, through a bounded queue: a slow database
slows the parser down, and memory stays flat however large the file.

The parse process stops when its parent does: it checks, whenever the queue is
full, that the process that started it is still there, and then exits without
flushing the queue.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
from collections.abc import AsyncGenerator, Mapping
from multiprocessing.process import BaseProcess
from typing import Any

from config.errors import SourceError
from config.runtime import collect_rarely
from config.sources import SourceConfig
from pipelines.prepare import Prepared, prepare
from pipelines.sources.files import file_chunks, read_error

QUEUE_CHUNKS = 2
"""Prepared chunks the parse process may keep ready ahead of the writer."""
POLL_SECONDS = 0.5
RECEIVE_GRACE_SECONDS = 30.0
"""How long a cancelled consumer waits for a receive under way to end."""

# What travels on the queue: ("chunk", Prepared), ("end", None),
# ("error", one line for the run record) or ("crash", a bug's one line).
_Message = tuple[str, Any]


class ParseProcessError(RuntimeError):
    """The parse process died or hit a bug; the source fails with this message."""


def _offer(channel: Any, message: _Message, parent: int) -> bool:
    """Put ``message`` on the queue; ``False`` when the parent went away meanwhile."""
    while True:
        try:
            channel.put(message, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            if os.getppid() != parent:
                # Nobody will read what is queued: exit without waiting for the
                # queue's writer thread, which would block on the full pipe forever.
                channel.cancel_join_thread()
                return False


def _parse(
    source: SourceConfig,
    cursor: Mapping[str, Any] | None,
    schema: dict[str, str] | None,
    batch_size: int,
    channel: Any,
    parent: int,
) -> None:
    """The parse process: chunks of the file, prepared, in order, then ``end``."""
    collect_rarely()
    try:
        for chunk in file_chunks(source, cursor, batch_size):
            prepared = prepare(source, chunk, schema)
            schema = prepared.outcome.schema
            if not _offer(channel, ("chunk", prepared), parent):
                return
            if prepared.outcome.error is not None:
                return  # the writer fails the source on this chunk
        _offer(channel, ("end", None), parent)
    except (SourceError, OSError) as exc:
        error = read_error(exc, source.name)
        _offer(channel, ("error", str(error or exc)), parent)
    except Exception as exc:  # a bug: the source fails with its type and message
        text = " ".join(str(exc).split())[:400] or type(exc).__name__
        _offer(channel, ("crash", f"{type(exc).__name__}: {text}"), parent)


def _receive(channel: Any, process: BaseProcess) -> _Message:
    while True:
        try:
            message: _Message = channel.get(timeout=POLL_SECONDS)
            return message
        except (EOFError, OSError):
            # The pipe ended, half way through a chunk or between two: the
            # process died (killed from outside, say) without saying ``end``.
            process.join(POLL_SECONDS)
            return ("crash", f"the parse process exited with code {process.exitcode}")
        except queue.Empty:
            if not process.is_alive():
                try:
                    late: _Message = channel.get(timeout=POLL_SECONDS)
                    return late
                except queue.Empty:
                    return ("crash", f"the parse process exited with code {process.exitcode}")


async def prepared_in_process(
    source: SourceConfig,
    cursor: Mapping[str, Any] | None,
    schema: dict[str, str] | None,
    batch_size: int,
) -> AsyncGenerator[Prepared, None]:
    """The source's prepared chunks, made by a parse process; close it when done.

    Raises:
        SourceError: the file cannot be read (the same one line as in-process).
        ParseProcessError: the parse process crashed.
    """
    context = multiprocessing.get_context("spawn")
    channel: Any = context.Queue(QUEUE_CHUNKS)
    process = context.Process(
        target=_parse,
        args=(source, dict(cursor or {}), schema, batch_size, channel, os.getpid()),
        name=f"kasparro-parse-{source.name}",
        daemon=True,
    )
    await asyncio.to_thread(process.start)
    # The process holds its own copy of the pipe's write end now. Closing ours
    # lets a process that dies half way through writing a chunk end the read
    # with EOF; with our copy open, the reader would wait forever for the rest.
    writer = getattr(channel, "_writer", None)
    if writer is not None:
        writer.close()
    receiving: asyncio.Future[_Message] | None = None
    try:
        while True:
            # Shielded: a consumer cancelled during a receive leaves it to finish.
            receiving = asyncio.ensure_future(asyncio.to_thread(_receive, channel, process))
            kind, value = await asyncio.shield(receiving)
            receiving = None
            if kind == "chunk":
                yield value
            elif kind == "end":
                return
            elif kind == "error":
                raise SourceError(value)
            else:
                raise ParseProcessError(value)
    finally:
        if receiving is not None:
            # A reader thread may be half way through a chunk: terminating the
            # process now would leave it waiting forever for the rest (the
            # parent holds the pipe's other end too). The process is alive and
            # writes the chunk whole, or exits and the receive says so.
            await asyncio.wait([receiving], timeout=RECEIVE_GRACE_SECONDS)
        if process.is_alive():
            process.terminate()
        await asyncio.to_thread(process.join, 5)
        channel.close()
        channel.cancel_join_thread()
