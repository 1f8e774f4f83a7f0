"""A chunk made ready to write: drift checked, every record transformed.

Pure CPU work on plain data, so it can run in a worker thread or in a parse
process (:mod:`pipelines.parse_process`); the result pickles small: the
columns the batch statement takes, not the records it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persistence.batches import BatchColumns, batch_document
from pipelines.config import FieldMapping, SourceConfig
from pipelines.drift import DriftOutcome, detect_drift
from pipelines.records import Chunk, RawRecord
from pipelines.transform import Rejection, Unified, lookup, transform

#: A transformed record and its source-side id.
Evaluated = tuple[Unified | Rejection, str | None]


@dataclass(slots=True)
class Prepared:
    """A chunk with its drift outcome and every record already transformed.

    Attributes:
        fetched: records the source emitted for this chunk, repeats included.
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
    records = list(distinct.values())
    payloads = [r.payload for r in records]
    outcome = detect_drift(source, payloads, schema)
    cols = BatchColumns(
        content_hash=[r.content_hash for r in records],
        payload=[r.data.decode() for r in records],
    )
    if outcome.error is None:
        for result, record_id in evaluate(payloads, outcome.mapping):
            if isinstance(result, Rejection):
                cols.name.append(None)
                cols.value.append(None)
                cols.observed_at.append(None)
                cols.record_id.append(None)
                cols.rejected_field.append(result.field)
                cols.rejected_reason.append(result.reason)
            else:
                cols.name.append(result.name)
                cols.value.append(result.value)
                cols.observed_at.append(result.observed_at)
                cols.record_id.append(record_id)
                cols.rejected_field.append(None)
                cols.rejected_reason.append(None)
        # Encoded here, off the writer's critical path.
        cols.document = batch_document(cols)
    return Prepared(len(chunk.records), chunk.cursor, chunk.final, outcome, cols)


def evaluate(payloads: Sequence[Any], mapping: FieldMapping) -> list[Evaluated]:
    """Transform each record and pick its source-side id (pure)."""
    out: list[Evaluated] = []
    id_path = mapping.id
    for payload in payloads:
        result = transform(payload, mapping)
        record_id = None
        if id_path and isinstance(result, Unified):
            found = lookup(payload, id_path)
            if isinstance(found, str | int | float) and not isinstance(found, bool):
                record_id = str(found)
        out.append((result, record_id))
    return out
