"""Live events for ``GET /events``: one LISTEN connection per process, fanned out.

Triggers (migration 0007) send ``pg_notify('kasparro_events', ...)`` in the very
transactions that record a run or change ``unified_data``, so every process
listening on the database hears of it at commit, whichever replica or ``etl
run`` wrote. This hub is a lifespan component, like Litestar's channels plugin:

- one connection LISTENs (``DATABASE_LISTEN_URL``, default the database URL: a
  LISTEN needs a session of its own, which a transaction pooler such as
  PgBouncer in transaction mode does not keep);
- a dispatcher task turns each notification into one encoded Server-Sent Event
  (reading the run object for the run events) and puts it on every subscriber's
  bounded queue without waiting: a subscriber whose queue is full is dropped
  (its stream ends; it reconnects and catches up with ``/changes``), so a slow
  reader never holds up the others or anything upstream;
- the connection is checked every few seconds and replaced after a loss, with a
  growing pause between attempts; once back, what happened meanwhile is sent as
  events (the changes' range, runs started or finished in the gap);
- a new connection must hear a probe sent from another one; one that does not
  (a transaction pooler lends a session for one transaction only) says so, and
  the hub reads what happened from the tables every second instead;
- :meth:`EventHub.end_streams` ends every stream at once, for a prompt shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import asyncpg
import msgspec
import structlog

from persistence.runs import Run

log = structlog.get_logger("kasparro.events")

CHANNEL = "kasparro_events"
"""The channel the triggers of migration 0007 notify."""
QUEUE_EVENTS = 256
"""Events a subscriber may fall behind by before it is dropped."""
CHECK_SECONDS = 5.0
"""How often the listening connection is checked with a round trip."""
RETRY_SECONDS = (0.2, 5.0)
"""The first and the longest pause between attempts to listen again."""
READ_TIMEOUT_SECONDS = 5.0
RECENT_RUN_EVENTS = 1024
"""Run events remembered, so that the catch-up after a reconnect sends none twice."""

PROBE_SECONDS = 2.0
"""How long a new listening connection may take to hear its own probe."""
POLL_SECONDS = 1.0
"""How often a listener that hears nothing reads what happened from the tables."""

Connect = Callable[[], Awaitable["asyncpg.Connection[Any]"]]
FetchRun = Callable[[uuid.UUID], Awaitable["Run | None"]]
LatestSeq = Callable[[], Awaitable[int]]
Notify = Callable[[str], Awaitable[None]]

_json = msgspec.json.Encoder()


class StreamEnd(msgspec.Struct, frozen=True):
    """Put on a subscriber's queue to end its stream, with the last words it sends."""

    comment: str


STOPPING = StreamEnd("the server is stopping")
DROPPED = StreamEnd("dropped: events were not read fast enough; reconnect, and read /changes")


def encode(event: str, data: Any) -> bytes:
    """One Server-Sent Event: its type and one line of JSON."""
    return b"event: " + event.encode() + b"\ndata: " + _json.encode(data) + b"\n\n"


@dataclass(eq=False, slots=True)
class Subscription:
    """One ``/events`` stream's queue of encoded events."""

    queue: asyncio.Queue[bytes | StreamEnd] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_EVENTS)
    )

    def end(self, reason: StreamEnd) -> None:
        """End the stream after what it has already read: the queue is emptied first."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(reason)


class EventHub:
    """The process's listener on ``kasparro_events`` and its subscribers.

    Args:
        connect: opens the listening connection.
        fetch_run: the run object of an id (``None`` when unknown).
        latest_seq: the largest change number visible now.
        notify: sends a payload on the channel from another connection (the probe
            that tells whether the listening connection hears the database).
        check_seconds: how often the listening connection is checked.
    """

    def __init__(
        self,
        connect: Connect,
        fetch_run: FetchRun,
        latest_seq: LatestSeq,
        notify: Notify | None = None,
        *,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self._connect = connect
        self._fetch_run = fetch_run
        self._latest_seq = latest_seq
        self._notify = notify
        self._probe: tuple[str, asyncio.Event] | None = None
        self.deaf = False
        """The last probe went unheard: notifications do not reach this listener."""
        self.check_seconds = check_seconds
        self.subscribers: set[Subscription] = set()
        self.listening = asyncio.Event()
        """Set while the connection listens."""
        self.connections = 0
        """Listening connections opened so far (1 until the first loss)."""
        self.dropped = 0
        """Subscribers dropped for falling behind."""
        self._notes: collections.deque[dict[str, Any]] = collections.deque()
        self._note_arrived = asyncio.Event()
        self._recent: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=RECENT_RUN_EVENTS
        )
        self._last_seq: int | None = None
        self._seen_at: datetime | None = None
        self._ended = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifespan ------------------------------------------------------------

    async def __aenter__(self) -> EventHub:
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="kasparro-events-listener"),
            asyncio.create_task(self._dispatch_forever(), name="kasparro-events-dispatcher"),
        ]
        # Start-up waits (a little) for the first LISTEN, so that a subscriber
        # arriving right after start-up hears of what happens next.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                await self.listening.wait()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end_streams()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def end_streams(self) -> None:
        """End every stream now, and any opened later at once (the server is stopping)."""
        self._ended = True
        for subscription in list(self.subscribers):
            subscription.end(STOPPING)
        self.subscribers.clear()

    # -- subscribers ---------------------------------------------------------------

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A subscription for the length of the block; its queue gets every event."""
        subscription = Subscription()
        if self._ended:
            subscription.end(STOPPING)
        else:
            self.subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self.subscribers.discard(subscription)

    def publish(self, message: bytes) -> None:
        """Put an encoded event on every subscriber's queue; never waits."""
        for subscription in list(self.subscribers):
            try:
                subscription.queue.put_nowait(message)
            except asyncio.QueueFull:
                self.subscribers.discard(subscription)
                subscription.end(DROPPED)
                self.dropped += 1
                log.warning("events_subscriber_dropped", queued=QUEUE_EVENTS)

    # -- the listening connection ----------------------------------------------------

    async def _listen_forever(self) -> None:
        pause = RETRY_SECONDS[0]
        while True:
            try:
                conn = await self._connect()
            except Exception as exc:
                log.warning("events_listen_failed", error=_one_line(exc), retry_seconds=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_SECONDS[1])
                continue
            try:
                await self._listen(conn)
            except Exception as exc:  # the connection failed; another one is opened
                log.warning("events_listener_lost", error=_one_line(exc))
            finally:
                self.listening.clear()
                conn.terminate()
            pause = RETRY_SECONDS[0]
            await asyncio.sleep(pause)

    async def _listen(self, conn: asyncpg.Connection[Any]) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._notified)
        reconnected = self.connections > 0
        self.connections += 1
        if reconnected:
            await self._catch_up(conn)
        else:
            self._last_seq = await self._latest_seq()
            self._seen_at = await conn.fetchval("SELECT now()", timeout=READ_TIMEOUT_SECONDS)
        self.listening.set()
        await self._check_hearing()
        log.info("events_listening", reconnected=reconnected, hears=not self.deaf)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS if self.deaf else self.check_seconds):
                    await lost.wait()
            if lost.is_set():
                raise ConnectionError("the listening connection was closed")
            if self.deaf:
                # Nothing is heard: what happened is read from the tables instead.
                await self._catch_up(conn)
            else:
                # A lost network shows only when something is sent; the server's clock
                # also bounds what the catch-up after a loss must look at.
                self._seen_at = await conn.fetchval("SELECT now()", timeout=READ_TIMEOUT_SECONDS)

    async def _check_hearing(self) -> None:
        """Send a probe from another connection and wait for it: a listener behind a
        transaction pooler (PgBouncer in transaction mode) would hear nothing, and
        say nothing about it."""
        if self._notify is None:
            return
        token = uuid.uuid4().hex
        heard = asyncio.Event()
        self._probe = (token, heard)
        try:
            await self._notify(_json.encode({"event": "probe", "token": token}).decode())
            async with asyncio.timeout(PROBE_SECONDS):
                await heard.wait()
            self.deaf = False
        except TimeoutError:
            self.deaf = True
            log.warning(
                "events_listener_deaf",
                hint="the listening connection does not hear this database's notifications: "
                "behind PgBouncer in transaction mode, set DATABASE_LISTEN_URL to a direct "
                f"connection; until then events are read from the tables every {POLL_SECONDS:g} s",
            )
        except Exception as exc:  # the probe could not be sent: no verdict
            log.warning("events_probe_failed", error=_one_line(exc))
        finally:
            self._probe = None

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            note = msgspec.json.decode(str(payload))
        except msgspec.DecodeError:
            log.warning("events_bad_notification", payload=str(payload)[:200])
            return
        if not isinstance(note, dict):
            return
        if note.get("event") == "probe":
            # Every listener of the database hears every probe; only its own counts.
            if self._probe is not None and note.get("token") == self._probe[0]:
                self._probe[1].set()
            return
        last = self._notes[-1] if self._notes else None
        if (
            note.get("event") == "unified_changed"
            and last is not None
            and last.get("event") == "unified_changed"
        ):
            # A burst of statements (a reprocess) reaches subscribers as one range.
            last["after"] = min(last["after"], note["after"])
            last["seq"] = max(last["seq"], note["seq"])
        else:
            self._notes.append(note)
        self._note_arrived.set()

    async def _catch_up(self, conn: asyncpg.Connection[Any]) -> None:
        """Send what happened while nothing was heard: the range of changes and the
        runs that started or finished meanwhile."""
        moment = await conn.fetchval("SELECT now()", timeout=READ_TIMEOUT_SECONDS)
        # Changes first: a run's changes commit before its end is recorded.
        latest = await self._latest_seq()
        if self._last_seq is not None and latest > self._last_seq:
            self._notes.append({"event": "unified_changed", "after": self._last_seq, "seq": latest})
            self._last_seq = latest
        if self._seen_at is not None:
            rows = await conn.fetch(_RUNS_SINCE, self._seen_at, timeout=READ_TIMEOUT_SECONDS)
            for row in rows:
                if row["started"]:
                    self._notes.append({"event": "run_started", "id": str(row["id"])})
                if row["finished"]:
                    self._notes.append({"event": "run_finished", "id": str(row["id"])})
        self._seen_at = moment
        self._note_arrived.set()

    # -- dispatch ----------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            await self._note_arrived.wait()
            self._note_arrived.clear()
            while self._notes:
                note = self._notes.popleft()
                try:
                    message = await self._message(note)
                except Exception as exc:  # one bad note must not end the events
                    log.warning("events_note_failed", error=_one_line(exc), note=str(note)[:200])
                    continue
                if message is not None:
                    self.publish(message)

    async def _message(self, note: dict[str, Any]) -> bytes | None:
        event = note.get("event")
        if event == "unified_changed":
            after, seq = int(note["after"]), int(note["seq"])
            self._last_seq = max(seq, self._last_seq or 0)
            return encode("unified_changed", {"after": after, "seq": seq})
        if event in ("run_started", "run_finished"):
            key = (event, str(note["id"]))
            if key in self._recent:
                return None
            self._recent.append(key)
            run_id = uuid.UUID(str(note["id"]))
            run: Run | None
            try:
                async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                    run = await self._fetch_run(run_id)
            except Exception as exc:
                log.warning("events_run_unread", run_id=str(run_id), error=_one_line(exc))
                run = None
            return encode(event, run if run is not None else {"id": str(run_id)})
        return None


# Runs that started, or finished, after the last moment the listener was known to
# hear everything (a second's margin: notifications reach a listener after commit).
_RUNS_SINCE = """
SELECT id, started_at > $1::timestamptz - interval '1 second' AS started,
    coalesce(finished_at > $1::timestamptz - interval '1 second', false) AS finished
FROM etl_runs
WHERE started_at > $1::timestamptz - interval '1 second'
   OR finished_at > $1::timestamptz - interval '1 second'
ORDER BY started_at
"""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
