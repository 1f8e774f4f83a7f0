"""What sources hand to the runner."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgspec

# Keys sorted so that the same record always has the same bytes and hash.
_encoder = msgspec.json.Encoder(order="sorted")
REPLACEMENT = "\ufffd"


@dataclass(slots=True)
class RawRecord:
    """One record exactly as received.

    Attributes:
        payload: the decoded record (for CSV, a header-to-string mapping).
        data: ``payload`` as canonical JSON, stored as-is in the raw table.
        content_hash: 16-byte digest of ``data``; raw rows are unique per source on it.
    """

    payload: Any
    data: bytes
    content_hash: bytes


def make_record(payload: Any) -> RawRecord:
    """Encode ``payload`` canonically and hash it.

    PostgreSQL's jsonb cannot hold U+0000: a record carrying it is stored with
    U+FFFD in its place (and a name holding either is rejected by the transform),
    so the record still reaches raw instead of failing its whole batch.
    """
    data = _encoder.encode(payload)
    if b"\\u0000" in data:
        data = _encoder.encode(_without_nul(payload))
    return RawRecord(payload, data, hashlib.blake2b(data, digest_size=16).digest())


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", REPLACEMENT)
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


@dataclass(slots=True)
class Chunk:
    """A slice of a source's stream; the runner writes each chunk in one transaction.

    Attributes:
        records: the records, in source order.
        cursor: the checkpoint that is true once these records are committed.
        final: the source has nothing more to give in this run.
        stored: content hashes of ``records`` that raw already held when they
            were read: duplicates, neither transformed nor sent to the batch
            statement.
    """

    records: list[RawRecord]
    cursor: dict[str, Any]
    final: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    stored: frozenset[bytes] = frozenset()
