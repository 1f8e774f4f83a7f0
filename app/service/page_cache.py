"""Rendered ``/data`` pages, served again while the data they show is unchanged.

A page is kept with the version of ``unified_data`` it was read at (migration
0003: the id of the last transaction that changed the table, set by statement
triggers in that same transaction). Serving a kept page costs one round trip
that reads the current version; any other version means some change committed
since, and the page is read again. A page is therefore never older than one
read from the database at the moment of the request, whoever wrote the change
(this service's ingestion, a separate ``etl run``, an operator's SQL).

Pages are evicted least recently used first once the memory they take exceeds
the byte budget (``DATA_CACHE_BYTES``; 0 turns the cache off). A page's text is
counted as the bytes its string occupies, not its characters: CPython stores a
string with one character beyond U+FFFF in four bytes per character.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections import OrderedDict
from typing import TYPE_CHECKING

from persistence import reads

if TYPE_CHECKING:
    from persistence.reads import Executor

PageKey = tuple[str | None, str | None, str | None, int, int]
"""``source``, ``name``, ``after``, ``limit``, ``offset``: what selects a page."""

ENTRY_OVERHEAD_BYTES = 400
"""What a kept page costs beyond its strings: the key, the entry, the dict slot."""


def _cost(key: PageKey, page: reads.DataPage) -> int:
    strings = [page.items, page.last_name, *key[:3]]
    return sum(sys.getsizeof(s) for s in strings if s is not None) + ENTRY_OVERHEAD_BYTES


class PageCache:
    """Least recently used pages of ``/data`` within ``max_bytes``, each checked
    against the current version of the data before it is served."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.hits = 0
        """Pages served from memory, after the version check."""
        self.misses = 0
        """Requests that found no page kept at the current version."""
        self.page_reads = 0
        """Pages read from the database: at most one per key at a time for the
        requests that miss together."""
        self._pages: OrderedDict[PageKey, reads.DataPage] = OrderedDict()
        self._reading: dict[PageKey, asyncio.Future[reads.DataPage]] = {}

    def __len__(self) -> int:
        return len(self._pages)

    async def page(
        self,
        db: Executor,
        *,
        source: str | None,
        name: str | None,
        after: str | None,
        limit: int,
        offset: int,
        version: int | None = None,
    ) -> reads.DataPage:
        """The page :func:`persistence.reads.data_page` reads for these arguments,
        from memory when the data has not changed since it was read.

        ``version``: the data's version, when the caller read it after the request
        arrived (it is read here otherwise).
        """
        read = functools.partial(
            reads.data_page, db, source=source, name=name, after=after, limit=limit, offset=offset
        )
        if self.max_bytes == 0:
            self.misses += 1
            self.page_reads += 1
            return await read()
        key: PageKey = (source, name, after, limit, offset)
        # Read after this request arrived: whatever is served must show at least
        # every change committed before that.
        if version is None:
            version = await reads.data_version(db)
        kept = self._pages.get(key)
        if kept is not None and kept.version == version:
            self.hits += 1
            self._pages.move_to_end(key)
            return kept
        self.misses += 1
        # Requests that miss together share one read: after a commit, every
        # connection asks for the same page at once. A shared read is taken only
        # when it shows the version this request saw, never an older one.
        reading = self._reading.get(key)
        if reading is not None:
            shared = await asyncio.shield(reading)
            if shared.version == version:
                return shared
        self.page_reads += 1
        reading = asyncio.ensure_future(read())
        self._reading[key] = reading
        reading.add_done_callback(functools.partial(self._read_done, key))
        return await asyncio.shield(reading)

    def _read_done(self, key: PageKey, reading: asyncio.Future[reads.DataPage]) -> None:
        if self._reading.get(key) is reading:
            del self._reading[key]
        if reading.cancelled() or reading.exception() is not None:
            return  # every request that waited for it has the error
        self._keep(key, reading.result())

    def _keep(self, key: PageKey, page: reads.DataPage) -> None:
        cost = _cost(key, page)
        if cost > self.max_bytes:
            return
        previous = self._pages.pop(key, None)
        if previous is not None:
            self.used_bytes -= _cost(key, previous)
        self._pages[key] = page
        self.used_bytes += cost
        while self.used_bytes > self.max_bytes:
            old_key, old_page = self._pages.popitem(last=False)
            self.used_bytes -= _cost(old_key, old_page)
