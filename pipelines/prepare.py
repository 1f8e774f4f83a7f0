"""A chunk made ready to write: drift checked, every record transformed.

Pure CPU work on plain data, so it can run in a worker thread or in a parse
process (:mod:`pipelines.parse_process`); the result pickles small: the
columns the batch statement takes, not the records it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from config.sources import FieldMapping, SourceConfig
from persistence.batches import BatchColumns, BatchKey, BatchRow, batch_keys, encode_rows
from pipelines.drift import DriftOutcome, detect_drift
from pipelines.records import Chunk, RawRecord
from pipelines.transform import (
    Rejection,
    Unified,
    canonical_symbol,
    lookup,
    record_id,
    transform,
)

#: A transformed record, its source-side id and its ticker.
Evaluated = tuple[Unified | Rejection, str | None, str | None]


@dataclass(slots=True)
class Prepared:
    """A chunk with its drift outcome and every record already transformed.

    Attributes:
        fetched: records the source received for this chunk, repeats included.
        cursor: the checkpoint that is true once the chunk is committed.
        final: the source has nothing more to give in this run.
        outcome: the chunk's drift outcome (``error`` set: the source fails).
        columns: one entry per distinct record, in source order.
    """

    fetched: int
    cursor: dict[str, Any]
    final: bool
    outcome: DriftOutcome
    columns: BatchColumns


def prepare(source: SourceConfig, chunk: Chunk, schema: dict[str, str] | None) -> Prepared:
    """Check drift against ``schema`` and transform the chunk's distinct records."""
    # Identical records within a chunk are one record (the later copies are duplicates).
    distinct: dict[bytes, RawRecord] = {}
    for record in chunk.records:
        distinct.setdefault(record.content_hash, record)
    received = list(distinct.values())
    # What raw already holds goes no further. Drift is judged on what is new (the
    # records raw holds were judged when they came), except under freeze: a
    # frozen source keeps failing while its upstream sends drifted records,
    # even the ones it sent before.
    records = [r for r in received if r.content_hash not in chunk.stored]
    judged = received if source.drift_policy == "freeze" else records
    outcome = detect_drift(source, [r.payload for r in judged], schema)
    payloads = [r.payload for r in records]
    hashes = [r.content_hash for r in records]
    if outcome.error is not None:
        # Only the raw records are written (the source fails): as text columns.
        cols = BatchColumns(content_hash=hashes, payload=[r.data.decode() for r in records])
        return Prepared(len(chunk.records), chunk.cursor, chunk.final, outcome, cols)
    rows: list[BatchRow] = []
    keyed: list[BatchKey] = []
    for record, (result, upstream_id, symbol) in zip(
        records, evaluate(payloads, outcome.mapping), strict=True
    ):
        if isinstance(result, Rejection):
            row: BatchRow = (
                record.content_hash,
                msgspec.Raw(record.data),
                None,
                None,
                None,
                None,
                result.field,
                result.reason,
                None,
                None,
            )
        else:
            key = source_key(result, upstream_id)
            row = (
                record.content_hash,
                msgspec.Raw(record.data),
                result.name,
                result.value,
                result.observed_at,
                upstream_id,
                None,
                None,
                upstream_id,  # the key; None: the name (see BatchRow)
                symbol,
            )
            keyed.append((key, result.name, symbol, result.value, result.observed_at))
        rows.append(row)
    # Encoded here, off the writer's critical path; only the hashes and this
    # document travel to the writer.
    cols = BatchColumns(content_hash=hashes, document=encode_rows(rows), keys=batch_keys(keyed))
    return Prepared(len(chunk.records), chunk.cursor, chunk.final, outcome, cols)


def evaluate(payloads: Sequence[Any], mapping: FieldMapping) -> list[Evaluated]:
    """Transform each record and pick its source-side id and ticker (pure)."""
    out: list[Evaluated] = []
    id_path = mapping.id
    symbol_path = mapping.symbol
    for payload in payloads:
        result = transform(payload, mapping)
        upstream_id: str | None = None
        symbol: str | None = None
        if isinstance(result, Unified):
            if id_path:
                found = record_id(lookup(payload, id_path))
                if isinstance(found, Rejection):
                    out.append((found, None, None))
                    continue
                upstream_id = found
            if symbol_path:
                symbol = canonical_symbol(lookup(payload, symbol_path))
        out.append((result, upstream_id, symbol))
    return out


def source_key(result: Unified, upstream_id: str | None) -> str:
    """A record's key in its source: its upstream id, else its canonical name (a
    source without ids, or a record whose id is absent)."""
    return upstream_id if upstream_id is not None else result.name
