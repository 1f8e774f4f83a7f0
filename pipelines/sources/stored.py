"""Marking the records raw already holds, before they are prepared.

Whole-document sources (an HTTP response, a JSON array) hand on every record
every run, and most of them were stored by an earlier run. Preparing them
(drift, transform, encoding) and sending them to the batch statement only for
its unique index to refuse them would make an unchanged rerun cost as much as
the first load; one lookup of their content hashes costs a fraction of that.
A record found is a duplicate either way; one stored since is refused by the
batch statement as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from pipelines.records import Chunk

#: The hashes, of those given, that raw already holds for the source.
StoredLookup = Callable[[Sequence[bytes]], Awaitable[set[bytes]]]


async def mark_stored(chunk: Chunk, stored: StoredLookup | None) -> Chunk:
    """``chunk`` with ``stored`` set to the hashes of its records raw already holds."""
    if stored is None or not chunk.records:
        return chunk
    found = await stored([record.content_hash for record in chunk.records])
    if found:
        chunk.stored = frozenset(found)
    return chunk
