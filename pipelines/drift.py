"""Schema drift of one source batch; pure, no I/O.

A batch's *observed schema* (dotted field path -> JSON type name) is compared
with the source's mapping and with the schema last seen for the source. The
rules, in the order they are applied:

Observation (``observe_schema``)
    Union of the paths of the batch's dict records; nested dicts are flattened
    to dotted paths up to ``max_depth`` segments and also recorded themselves as
    ``"object"``; lists are ``"array"`` and not descended. A path's type is its
    most frequent non-null type (int and float are both ``"number"``; ties go to
    the first of string, number, boolean, object, array); ``"null"`` only when
    the path is null everywhere. Batches above 1000 records are sampled: all of
    the first 1000, then every k-th record so at most about 2000 are walked
    (a large batch costs what 2000 records do). Non-dict records are ignored.

Presence
    A path is *present* when it is in the observation or, when the observation
    may be incomplete (sampled, deeper than ``max_depth``, a list index), when
    ``transform.lookup`` finds it in any record. So ``missing`` means absent
    from every record of the batch, never merely unsampled. (When more than 8
    paths would need that record-by-record look-up in a sampled batch, the
    whole batch is walked once instead.)

Events (at most one per kind and field, in a fixed order: missing, renamed,
type_changed, added, each sorted by field; running twice on the same inputs
gives the same list, and a caller dedupes across batches by
``(kind, field, new_field)``)
    ``missing``: a mapped path (name, value, observed_at, id, symbol) that is not
    present; and, when ``previous`` is given, a previously seen path that is not
    present. ``added``: only when ``previous`` is given, a present path not in
    it (a first batch never reports ``added``, or ``freeze`` would fail its
    first run). ``type_changed``: previous and observed types both non-null and
    different; never for ``csv`` sources, whose values are all strings. A path
    under a parent already reported (``quotes`` missing hides
    ``quotes.USD.price`` missing) is not repeated, except mapped paths.
    ``renamed``: for each missing mapped path, the best candidate among the
    observed paths with the same parent (compared case-folded, separators
    removed) that are not mapped and, when ``previous`` holds the old path,
    not in ``previous`` either (a field that coexisted with the old one is not
    its new name). Once the old path is gone from the remembered schema every
    unmapped field is a candidate again, so a followed rename is found on every
    later run too. Candidates need a name similarity >= 0.6 (see
    ``name_similarity``); the confidence is that similarity, halved when the
    candidate's type cannot hold the field (object, array, boolean), times 0.9
    when it is null everywhere or (non-CSV) its type differs from the old
    field's previous type; rounded to 2 places. Each new path is claimed by at
    most one old path (best pairs first).

Policies
    ``evolve``: a rename with confidence >= 0.8 is followed: the outcome mapping
    reads the new path, the ``renamed`` event replaces the ``missing`` one and
    no ``added`` event is reported for the new path. A weaker rename is reported
    next to the ``missing`` event and not followed. The source fails when the
    ``name`` or ``value`` path is missing with no followed rename (every record
    would be rejected); a missing ``observed_at``, ``id`` or ``symbol`` is only an event.
    ``freeze``: nothing is followed; any event fails the source. Either way the
    caller keeps the raw records.

Remembered schema
    The types of the fields present in this batch: observed types, the previous
    type where the batch only had nulls or the field was only found outside the
    sample. Fields absent from the batch are dropped (the drift is change since
    the last batch; renames stay stable across runs, see above). When the
    source fails, the previous schema is kept (the observed one for a first
    batch), so a frozen source keeps failing until someone acts.

An empty batch, or one without any dict record, has no evidence: no events, the
mapping unchanged, the previous schema (or ``{}``) kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any, Literal

import msgspec

from config.sources import FieldMapping, SourceConfig
from pipelines.transform import is_missing, lookup

Schema = dict[str, str]
EventKind = Literal["added", "missing", "type_changed", "renamed"]

#: A rename at or above this confidence is followed under ``evolve``.
FOLLOW_CONFIDENCE = 0.8
#: Below this name similarity a field is not "a similar new name" at all.
_MIN_SIMILARITY = 0.6
_SAMPLE_ALL = 1000
_SAMPLE_STRIDED = 1000
# Above this many paths to look up record by record in a sampled batch, one
# full walk of the batch is cheaper than the look-ups.
_MAX_LOOKUPS = 8
_MAX_LISTED_EVENTS = 8

_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    tuple: "array",
    type(None): "null",
}
_TYPE_ORDER = ("string", "number", "boolean", "object", "array")
# Types a mapped field can be read from (transform accepts strings and numbers).
_USABLE_TYPES = frozenset({"string", "number"})
_ROLES = ("name", "value", "observed_at", "id", "symbol")
_KIND_ORDER: dict[str, int] = {"missing": 0, "renamed": 1, "type_changed": 2, "added": 3}


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """One difference between a batch and what was expected of it."""

    kind: EventKind
    field: str
    detail: str
    new_field: str | None = None
    confidence: float | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for logs and the run record."""
        return {
            "kind": self.kind,
            "field": self.field,
            "detail": self.detail,
            "new_field": self.new_field,
            "confidence": self.confidence,
        }


@dataclass(frozen=True, slots=True)
class DriftOutcome:
    """What a batch's drift means for loading it."""

    events: list[DriftEvent]
    mapping: FieldMapping
    schema: Schema
    error: str | None


def _type_name(value: Any) -> str:
    name = _TYPE_NAMES.get(type(value))
    if name is not None:
        return name
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return "string"


def _walk(
    record: dict[Any, Any],
    prefix: str,
    depth: int,
    max_depth: int,
    counts: dict[tuple[str, str], int],
) -> None:
    for key, value in record.items():
        path = f"{prefix}{key}" if prefix else (key if isinstance(key, str) else str(key))
        kind = _TYPE_NAMES.get(type(value)) or _type_name(value)
        counts[path, kind] = counts.get((path, kind), 0) + 1
        if kind == "object" and depth < max_depth:
            _walk(value, path + ".", depth + 1, max_depth, counts)


def _sample(records: Sequence[Any]) -> Iterable[Any]:
    n = len(records)
    if n <= _SAMPLE_ALL:
        return records
    step = max(1, -(-(n - _SAMPLE_ALL) // _SAMPLE_STRIDED))
    return (records[i] for i in itertools.chain(range(_SAMPLE_ALL), range(_SAMPLE_ALL, n, step)))


def _observe(records: Iterable[Any], max_depth: int) -> Schema:
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        if isinstance(record, dict):
            _walk(record, "", 1, max_depth, counts)
    by_path: dict[str, dict[str, int]] = {}
    for (path, kind), count in counts.items():
        by_path.setdefault(path, {})[kind] = count
    schema: Schema = {}
    for path in sorted(by_path):
        kinds = by_path[path]
        best = "null"
        best_count = 0
        for kind in _TYPE_ORDER:
            count = kinds.get(kind, 0)
            if count > best_count:
                best, best_count = kind, count
        schema[path] = best
    return schema


def observe_schema(records: Sequence[Any], *, max_depth: int = 4) -> Schema:
    """The dotted paths of a batch's dict records and their JSON types.

    Args:
        records: the batch; non-dict records are ignored.
        max_depth: nested dicts are flattened up to this many path segments.

    Returns:
        Path -> ``"string"``, ``"number"``, ``"boolean"``, ``"object"``,
        ``"array"`` or ``"null"``, sorted by path; sampled above 1000 records.
    """
    return _observe(_sample(records), max_depth)


def _normalize(segment: str) -> str:
    folded = segment.casefold()
    for sep in ("_", "-", ".", " "):
        folded = folded.replace(sep, "")
    return folded


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _last(path: str) -> str:
    return path.rpartition(".")[2]


def _same_parent(old: str, new: str) -> bool:
    a, b = _parent(old).split("."), _parent(new).split(".")
    if len(a) != len(b):
        return False
    return all(_normalize(x) == _normalize(y) for x, y in zip(a, b, strict=True))


def name_similarity(old: str, new: str) -> float:
    """How alike two field paths are as names, 0..1 (0 across different parents).

    The last segments are compared case-folded with separators removed (so
    ``current_price`` and ``currentPrice`` agree), weighted 0.8, and case-folded
    as written, weighted 0.2 (an exact spelling beats a separator change).
    difflib's ``SequenceMatcher`` (standard library) is used: the comparisons
    per batch are few (missing mapped fields x new fields) and short, so a
    C-accelerated matcher such as rapidfuzz would add a dependency for nothing,
    and its ratio is deterministic across versions.
    """
    if not _same_parent(old, new):
        return 0.0
    raw_a, raw_b = _last(old).casefold(), _last(new).casefold()
    norm_a, norm_b = _normalize(raw_a), _normalize(raw_b)
    if not norm_a or not norm_b:
        return 0.0
    norm = SequenceMatcher(None, norm_a, norm_b, autojunk=False).ratio()
    raw = SequenceMatcher(None, raw_a, raw_b, autojunk=False).ratio()
    return 0.8 * norm + 0.2 * raw


def _confidence(
    old: str, new: str, new_type: str, old_type: str | None, type_matters: bool
) -> tuple[float, float]:
    similarity = name_similarity(old, new)
    score = similarity
    if new_type == "null":
        score *= 0.9
    elif new_type not in _USABLE_TYPES:
        score *= 0.5
    elif type_matters and old_type not in (None, "null") and old_type != new_type:
        score *= 0.9
    return similarity, round(min(1.0, max(0.0, score)), 2)


def _mapped_paths(mapping: FieldMapping) -> dict[str, list[str]]:
    """Mapped path -> the roles reading it, in role order."""
    paths: dict[str, list[str]] = {}
    for role in _ROLES:
        path = getattr(mapping, role)
        if path:
            paths.setdefault(path, []).append(role)
    return paths


def _needs_lookup(path: str, max_depth: int) -> bool:
    parts = path.split(".")
    return len(parts) > max_depth or any(part.isdigit() for part in parts)


def _find(records: list[dict[Any, Any]], path: str) -> tuple[bool, Any]:
    for record in records:
        value = lookup(record, path)
        if not is_missing(value):
            return True, value
    return False, None


def _under(path: str, tops: set[str]) -> bool:
    prefix = _parent(path)
    while prefix:
        if prefix in tops:
            return True
        prefix = _parent(prefix)
    return False


def _summary(events: list[DriftEvent]) -> str:
    parts = []
    for event in events[:_MAX_LISTED_EVENTS]:
        if event.kind == "renamed":
            parts.append(f"renamed {event.detail} ({event.confidence})")
        elif event.kind == "type_changed":
            parts.append(f"type_changed {event.field} {event.detail}")
        else:
            parts.append(f"{event.kind} {event.field}")
    more = len(events) - _MAX_LISTED_EVENTS
    if more > 0:
        parts.append(f"and {more} more")
    return ", ".join(parts)


def detect_drift(
    source: SourceConfig, records: Sequence[Any], previous: Schema | None
) -> DriftOutcome:
    """Compare one batch with the source's mapping and its last seen schema.

    Args:
        source: the source; its ``kind``, ``mapping`` and ``drift_policy`` are used.
        records: the batch as read (raw records, any shape).
        previous: the schema remembered from the source's last batch, or
            ``None`` when there is none yet.

    Returns:
        The events, the mapping to transform this batch with, the schema to
        remember, and a one-line error when the source must fail.
    """
    mapping = source.mapping
    dict_records = [r for r in records if isinstance(r, dict)]
    if not dict_records:
        return DriftOutcome([], mapping, dict(previous or {}), None)

    max_depth = 4
    sampled = len(dict_records) > _SAMPLE_ALL
    observed = observe_schema(dict_records, max_depth=max_depth)
    mapped = _mapped_paths(mapping)
    prev = previous or {}
    type_matters = source.kind != "csv"

    to_check = [p for p in itertools.chain(mapped, prev) if p not in observed]
    if sampled and len(to_check) > _MAX_LOOKUPS:
        observed = _observe(dict_records, max_depth)
        sampled = False

    schema: Schema = dict(observed)
    for path, kind in observed.items():
        if kind == "null" and prev.get(path, "null") != "null":
            schema[path] = prev[path]
    absent: set[str] = set()
    for path in dict.fromkeys(to_check):
        if path in observed:
            continue
        if not sampled and not _needs_lookup(path, max_depth):
            absent.add(path)  # the walk saw every record: not observed means absent
            continue
        found, value = _find(dict_records, path)
        if not found:
            absent.add(path)
        elif path not in schema:
            schema[path] = prev.get(path) or _type_name(value)

    missing_mapped = [p for p in mapped if p in absent]
    missing_other = sorted(p for p in prev if p in absent and p not in mapped)

    # Renames: every (old, new) pair scored, best pairs claimed first.
    pairs: list[tuple[float, float, str, str]] = []
    for old in missing_mapped:
        for new, new_type in observed.items():
            if new in mapped or (old in prev and new in prev):
                continue
            similarity, confidence = _confidence(old, new, new_type, prev.get(old), type_matters)
            if similarity >= _MIN_SIMILARITY:
                pairs.append((confidence, similarity, old, new))
    pairs.sort(key=lambda p: (-p[0], -p[1], p[2], p[3]))
    renames: dict[str, tuple[str, float]] = {}
    claimed: set[str] = set()
    for confidence, _, old, new in pairs:
        if old not in renames and new not in claimed:
            renames[old] = (new, confidence)
            claimed.add(new)

    evolve = source.drift_policy == "evolve"
    followed = {
        old: new
        for old, (new, confidence) in renames.items()
        if evolve and confidence >= FOLLOW_CONFIDENCE
    }

    events: list[DriftEvent] = []
    for path in missing_mapped:
        if path not in followed:
            detail = f"mapped {'/'.join(mapped[path])} field absent from the batch"
            events.append(DriftEvent("missing", path, detail))
    reported: set[str] = set(absent)
    for path in missing_other:
        if not _under(path, reported):
            events.append(DriftEvent("missing", path, "absent from the batch"))
    for old, (new, confidence) in renames.items():
        events.append(DriftEvent("renamed", old, f"{old} -> {new}", new, confidence))
    if type_matters and previous is not None:
        for path, kind in observed.items():
            before = prev.get(path)
            if before in (None, "null") or kind == "null" or kind == before:
                continue
            if not _under(path, reported):
                events.append(DriftEvent("type_changed", path, f"{before} -> {kind}"))
                reported.add(path)
    if previous is not None:
        new_paths = {p for p in schema if p not in prev}
        hidden = set(followed.values())
        for path in sorted(new_paths):
            if path in hidden or _under(path, new_paths | hidden | reported):
                continue
            events.append(DriftEvent("added", path, f"new {schema[path]} field"))
    events.sort(key=lambda e: (_KIND_ORDER[e.kind], e.field, e.new_field or ""))

    error: str | None = None
    if not evolve:
        if events:
            error = f"schema drift under freeze policy: {_summary(events)}"
    else:
        problems = []
        for role in ("name", "value"):
            path = getattr(mapping, role)
            if path not in missing_mapped or path in followed:
                continue
            label = "identity field" if role == "name" else "value field"
            text = f"{label} {path!r} missing and no confident rename"
            if path in renames:
                new, confidence = renames[path]
                text += f" (best {new!r} at {confidence})"
            if role == "value":
                text += "; every record would be rejected"
            problems.append(text)
        if problems:
            error = "; ".join(dict.fromkeys(problems))

    if followed:
        mapping = msgspec.structs.replace(
            mapping,
            **{
                role: followed[path]
                for role in _ROLES
                if (path := getattr(mapping, role)) and path in followed
            },
        )
    if error is not None:
        schema = dict(previous) if previous is not None else schema
    return DriftOutcome(events, mapping, schema, error)
