"""Identity: which unified row a source's new key belongs to.

Each source names its records with a key (its upstream id when the mapping has
one, else the canonical name). A key seen for the first time is compared with
the keys of the *other* sources already linked to rows, on generic evidence
only: equal canonical names, the ticker (``symbol``), names once generic words
and punctuation are set aside, the upstream ids' slugs, and values that agree
at close observation times. It joins the best row when the evidence is strong
and unambiguous; otherwise it starts a row of its own. Nothing here knows any
particular asset.

Conservative by design: a shared ticker alone never links (bridged, pegged and
reused tickers are common); names that differ by an edition word ("old",
"wrapped", "v2", ...), conflicting tickers, or values far apart at the same
moment keep keys apart; when two candidates are about as good, neither is
taken. A link, once made, does not move on later runs: only the identity file
(forced links and splits, applied by ``etl reprocess``) changes it.

The matching is pure (``decide``); ``Resolver`` reads the candidates from the
database inside the batch's transaction, under the identity lock.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec

from config.errors import ConfigError
from config.settings import Settings
from config.sources import SourceConfig, id_sources, load_sources
from persistence import links
from persistence.links import Member, NewKey, NewLink
from persistence.types import Conn
from pipelines.transform import canonical_name

# Words that name the kind of thing rather than the thing: "Curve DAO Token" is
# "Curve DAO", "Near Protocol" is "Near".
GENERIC_WORDS = frozenset({"the", "token", "tokens", "coin", "network", "protocol", "finance"})
# Words that mark another edition of an asset: "BitTorrent (Old Chain)" is not
# "BitTorrent", "Wrapped Bitcoin" is not "Bitcoin".
EDITION_WORDS = frozenset(
    {"old", "classic", "legacy", "wrapped", "bridged", "staked", "pegged", "v1", "v2", "v3", "v4"}
)
_WORDS = re.compile(r"[\W_]+")
_VERSION = re.compile(r"v\d+|\d+")

LINK_THRESHOLD = 0.75
"""Weakest evidence that links a key to a row."""
AMBIGUITY_MARGIN = 0.02
"""Two candidates closer than this are a doubt: neither is taken."""
HOME_BONUS = 0.03
"""Added to a row named exactly like the key's canonical name (more than the margin)."""
CLOSE_SECONDS = 3600.0
"""Observations this close in time can be compared by value."""
AGREE_RATIO = 1.1
DISAGREE_RATIO = 1.5
MIN_CORE_LETTERS = 3
"""Letters a name must keep without its generic words to be compared so."""
SUFFIX_MAX = 100
"""Characters of a key kept in the name of a row that needs telling apart."""


def _says_something(core: str) -> bool:
    return sum(c.isalpha() for c in core) >= MIN_CORE_LETTERS


def words(text: str) -> list[str]:
    return [w for w in _WORDS.split(canonical_name(text)) if w]


@dataclass(frozen=True, slots=True)
class Traits:
    """What a key is compared by, computed once."""

    names: tuple[str, ...]
    """Canonical names seen, oldest first; the last is the current one."""
    symbol: str | None
    compact: str
    """Current name without spaces or punctuation."""
    core: str
    """``compact`` without generic words."""
    core_words: frozenset[str]
    editions: frozenset[str]
    slugs: frozenset[str]
    """For keys that are ids: the id's words joined, with and without a leading
    word equal to the ticker (``bnb-binance-coin`` is ``binancecoin``)."""
    slug_cores: frozenset[str]
    """``slugs`` without generic words."""
    slug_words: frozenset[tuple[str, ...]]
    numbered: bool
    """The id ends in a number (or version) its name lacks: the upstream had to
    tell this asset apart from another of the same name."""


def traits(key: str, names: Sequence[str], symbol: str | None, *, is_id: bool) -> Traits:
    current = names[-1]
    name_words = words(current)
    core = [w for w in name_words if w not in GENERIC_WORDS] or name_words
    slugs: set[str] = set()
    slug_cores: set[str] = set()
    slug_words: set[tuple[str, ...]] = set()
    numbered = False
    if is_id:
        parts = words(key)
        variants = [parts]
        sym = "".join(words(symbol)) if symbol else ""
        if len(parts) > 1 and parts[0] == sym:
            variants.append(parts[1:])
        for variant in variants:
            slugs.add("".join(variant))
            slug_core = "".join(p for p in variant if p not in GENERIC_WORDS)
            if _says_something(slug_core):
                slug_cores.add(slug_core)
            if len(variant) > 1:
                slug_words.add(tuple(sorted(variant)))
        numbered = (
            len(parts) > 1
            and _VERSION.fullmatch(parts[-1]) is not None
            and parts[-1] not in name_words
        )
    return Traits(
        names=tuple(names),
        symbol=symbol,
        compact="".join(name_words),
        core="".join(core),
        core_words=frozenset(core),
        editions=frozenset(w for w in name_words if w in EDITION_WORDS),
        slugs=frozenset(slugs),
        slug_cores=frozenset(slug_cores),
        slug_words=frozenset(slug_words),
        numbered=numbered,
    )


# -- comparing two keys ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evidence:
    score: float
    rule: str


VETO = Evidence(-1.0, "veto")


def _symbols(a: str | None, b: str | None) -> str:
    if a is None or b is None:
        return "unknown"
    if a == b:
        return "equal"
    # TON / TONCOIN, IOTA / MIOTA: one ticker inside the other is no contradiction.
    if a.startswith(b) or b.startswith(a) or a.endswith(b) or b.endswith(a):
        return "compatible"
    return "conflict"


def _values(
    a: tuple[float | None, datetime | None], b: tuple[float | None, datetime | None]
) -> str:
    (va, ta), (vb, tb) = a, b
    if va is None or vb is None or ta is None or tb is None or va <= 0 or vb <= 0:
        return "unknown"
    if abs((ta - tb).total_seconds()) > CLOSE_SECONDS:
        return "unknown"
    ratio = max(va, vb) / min(va, vb)
    if ratio <= AGREE_RATIO:
        return "agree"
    if ratio >= DISAGREE_RATIO:
        return "disagree"
    return "unknown"


def compare(
    new: Traits,
    old: Traits,
    values: str,
) -> Evidence | None:
    """How strongly two keys of different sources are one asset.

    Returns ``VETO`` when something says they are not, ``None`` when nothing
    says they are, else the evidence's score (0..1) and the rule it comes from.
    """
    if new.editions != old.editions:
        return VETO
    symbols = _symbols(new.symbol, old.symbol)
    slug = _slug_relation(new, old)
    same_name = bool(set(new.names) & set(old.names))
    if symbols == "conflict" and not (slug == "equal" and same_name):
        return VETO
    numbered = new.numbered or old.numbered
    if values == "disagree" and (numbered or not same_name):
        return VETO
    if slug in ("equal", "core", "words") and symbols != "conflict":
        base = {"equal": 0.97, "core": 0.9, "words": 0.9}[slug]
        return Evidence(base + (0.01 if symbols == "equal" else 0.0), "id")
    if numbered and values != "agree":
        # The upstream itself knows another asset of this name: a name or a
        # ticker is not enough to tell which one the other source means.
        return None
    bonus = 0.03 if values == "agree" else 0.0
    if same_name:
        return Evidence(0.9 + (0.05 if symbols == "equal" else 0.0) + bonus, "name")
    # A name is compared without its generic words only when what is left says
    # something: "Coin 5" and "Token 5" are not one asset.
    same_core = new.core == old.core and _says_something(new.core)
    if symbols == "equal" and same_core:
        return Evidence(0.88 + bonus, "symbol")
    if slug == "name":
        return Evidence(0.85 + bonus, "id")
    if symbols == "unknown" and same_core:
        return Evidence(0.8 + bonus, "name")
    if (
        symbols == "equal"
        and values == "agree"
        and _says_something(new.core)
        and _says_something(old.core)
        and _similarity(new.core_words, old.core_words) >= 70
    ):
        return Evidence(0.75, "value")
    return None


def _similarity(a: Iterable[str], b: Iterable[str]) -> float:
    """Token-set similarity of two word lists, 0 to 100."""
    # Imported on first use: most runs never compare names this way, and the
    # import is a tenth of a short run's start-up.
    from rapidfuzz import fuzz

    return float(fuzz.token_set_ratio(" ".join(a), " ".join(b)))


def _slug_relation(a: Traits, b: Traits) -> str | None:
    if a.slugs and b.slugs:
        if a.slugs & b.slugs:
            return "equal"
        if a.slug_cores & b.slug_cores:
            return "core"
        if a.slug_words & b.slug_words:
            return "words"
    # One side's id spells the other's name: "binancecoin" and "Binance Coin".
    if not a.numbered and a.slugs & _spellings(b):
        return "name"
    if not b.numbered and b.slugs & _spellings(a):
        return "name"
    return None


def _spellings(t: Traits) -> set[str]:
    return {t.compact, t.core} if _says_something(t.core) else {t.compact}


# -- the identity file -----------------------------------------------------------------


class _Group(msgspec.Struct, forbid_unknown_fields=True):
    members: list[str]


class _IdentityFile(msgspec.Struct, forbid_unknown_fields=True):
    link: list[_Group] = []
    split: list[_Group] = []


SourceKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """Links and splits a user forces (the identity file)."""

    groups: tuple[frozenset[SourceKey], ...] = ()
    """Keys that are one row, whatever the evidence."""
    splits: tuple[frozenset[SourceKey], ...] = ()
    """Keys that are all in different rows."""
    path: Path | None = None

    def group(self, member: SourceKey) -> frozenset[SourceKey] | None:
        for group in self.groups:
            if member in group:
                return group
        return None

    def kept_apart(self, a: SourceKey, b: SourceKey) -> bool:
        return any(a in split and b in split for split in self.splits)


def default_identity_path(sources_file: Path) -> Path:
    return sources_file.resolve().parent / "identity.toml"


def declared_sources(settings: Settings) -> list[SourceConfig]:
    """The sources file's sources, with the identity file checked against them:
    a bad identity file stops start-up like a bad sources file.

    Raises:
        ConfigError: either file is wrong; the message names the setting.
    """
    sources = load_sources(settings)
    load_identity(settings.identity_file, settings.sources_file, id_sources(sources))
    return sources


def load_identity(
    identity_file: Path | None, sources_file: Path, id_sources: Mapping[str, bool]
) -> IdentityRules:
    """Read the identity file: the one named by ``IDENTITY_FILE``, else
    ``identity.toml`` beside the sources file when there is one.

    Args:
        id_sources: every declared source, with whether its mapping has an ``id``
            (a key of a source without one is a canonical name, normalised here).

    Raises:
        ConfigError: the file cannot be read or says something impossible; the
            message starts with ``IDENTITY_FILE``.
    """
    path = identity_file or default_identity_path(sources_file)
    label = f"IDENTITY_FILE: {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if identity_file is not None:
            raise ConfigError(f"IDENTITY_FILE: file not found: {path}") from None
        return IdentityRules()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: {exc}") from None
    try:
        doc = msgspec.convert(tomllib.loads(text), _IdentityFile)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{label}: {' '.join(str(exc).split())}") from None

    def parse(kind: str, index: int, group: _Group) -> frozenset[SourceKey]:
        where = f"{label}: {kind}[{index}]"
        found: set[SourceKey] = set()
        for item in group.members:
            source, sep, key = item.partition(":")
            if not sep or not key.strip():
                raise ConfigError(f"{where}: {item!r} is not 'source:key'")
            if source not in id_sources:
                raise ConfigError(f"{where}: unknown source {source!r} in {item!r}")
            key = key if id_sources[source] else canonical_name(key)
            found.add((source, key))
        if len(found) < 2:
            raise ConfigError(f"{where}: needs at least two different members")
        return frozenset(found)

    groups = _merged([parse("link", i, g) for i, g in enumerate(doc.link)])
    splits = tuple(parse("split", i, g) for i, g in enumerate(doc.split))
    for group in groups:
        sources = [source for source, _ in group]
        twice = sorted({s for s in sources if sources.count(s) > 1})
        if twice:
            raise ConfigError(
                f"{label}: a link joins two keys of source {twice[0]!r} "
                f"({', '.join(sorted(f'{s}:{k}' for s, k in group if s == twice[0]))}); "
                "one source's keys are never one row"
            )
        for split in splits:
            both = sorted(group & split)
            if len(both) > 1:
                raise ConfigError(
                    f"{label}: {both[0][0]}:{both[0][1]} and {both[1][0]}:{both[1][1]} "
                    "are both linked and split"
                )
    return IdentityRules(groups=groups, splits=splits, path=path)


def _merged(groups: list[frozenset[SourceKey]]) -> tuple[frozenset[SourceKey], ...]:
    """Link groups sharing a member are one group."""
    merged: list[set[SourceKey]] = []
    for group in groups:
        overlapping = [m for m in merged if m & group]
        joined = set(group).union(*overlapping)
        merged = [m for m in merged if not (m & group)] + [joined]
    return tuple(frozenset(m) for m in merged)


# -- deciding a batch --------------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    """A row that new keys may join: its members from other sources."""

    name: str
    members: list[tuple[Member, Traits]] = field(default_factory=list)
    has_own: bool = False
    """A key of the deciding source is in it already."""


@dataclass(slots=True)
class _Index:
    by_name: dict[str, set[str]] = field(default_factory=dict)
    by_core: dict[str, set[str]] = field(default_factory=dict)
    by_symbol: dict[str, set[str]] = field(default_factory=dict)
    by_slug: dict[str, set[str]] = field(default_factory=dict)
    by_slug_words: dict[tuple[str, ...], set[str]] = field(default_factory=dict)

    def add(self, entity: str, t: Traits) -> None:
        for name in t.names:
            self.by_name.setdefault(name, set()).add(entity)
        for text in {t.core, t.compact}:
            self.by_core.setdefault(text, set()).add(entity)
        if t.symbol:
            self.by_symbol.setdefault(t.symbol, set()).add(entity)
        for text in t.slugs | t.slug_cores:
            self.by_slug.setdefault(text, set()).add(entity)
        for sorted_words in t.slug_words:
            self.by_slug_words.setdefault(sorted_words, set()).add(entity)

    def lookup(self, t: Traits) -> set[str]:
        found: set[str] = set()
        for name in t.names:
            found |= self.by_name.get(name, set())
        for text in {t.core, t.compact}:
            found |= self.by_core.get(text, set())
            found |= self.by_slug.get(text, set())
        if t.symbol:
            found |= self.by_symbol.get(t.symbol, set())
        for text in t.slugs | t.slug_cores:
            found |= self.by_slug.get(text, set())
            found |= self.by_core.get(text, set())
        for sorted_words in t.slug_words:
            found |= self.by_slug_words.get(sorted_words, set())
        return found


def decide(
    source: str,
    keys: Sequence[NewKey],
    candidates: Mapping[str, Candidate],
    rules: IdentityRules,
    *,
    is_id: bool,
) -> list[tuple[NewKey, NewLink | None]]:
    """Which candidate row each new key of ``source`` joins (``None``: a row of its own).

    Pairs are taken best first; a key or a row is taken once (a row holds at
    most one key per source); a pair with a rival about as good is a doubt and
    neither is taken. Keys are in batch order, which breaks exact ties.
    """
    index = _Index()
    for cand in candidates.values():
        for _, t in cand.members:
            index.add(cand.name, t)
    pairs: list[tuple[float, int, str, str]] = []
    for position, new in enumerate(keys):
        t = traits(new.key, [new.name], new.symbol, is_id=is_id)
        me = (source, new.key)
        group = rules.group(me)
        for name in sorted(index.lookup(t) | _forced(group, candidates)):
            cand = candidates[name]
            if cand.has_own or _refused(me, cand, rules):
                continue
            if group is not None and any((m.source, m.key) in group for m, _ in cand.members):
                pairs.append((2.0, position, name, "manual"))
                continue
            best: Evidence | None = None
            for member, mt in cand.members:
                seen = compare(
                    t, mt, _values((new.value, new.observed_at), (member.value, member.observed_at))
                )
                if seen is VETO:
                    best = VETO
                    break
                if seen is not None and (best is None or seen.score > best.score):
                    best = seen
            if best is None or best is VETO or best.score < LINK_THRESHOLD:
                continue
            # The row named exactly like the key is its natural home: "the row of
            # its canonical name" wins over an otherwise equal one.
            score = best.score + (HOME_BONUS if name == new.name else 0.0)
            pairs.append((score, position, name, best.rule))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    by_key: dict[int, list[tuple[float, int, str, str]]] = {}
    by_row: dict[str, list[tuple[float, int, str, str]]] = {}
    for pair in pairs:
        by_key.setdefault(pair[1], []).append(pair)
        by_row.setdefault(pair[2], []).append(pair)
    chosen: dict[int, NewLink] = {}
    taken: set[str] = set()
    doubtful: set[int] = set()
    for score, position, name, rule in pairs:
        if position in chosen or position in doubtful or name in taken:
            continue
        if rule != "manual":
            rivals = [
                p
                for p in by_key[position]
                if p[2] != name and p[2] not in taken and score - p[0] < AMBIGUITY_MARGIN
            ] + [
                p
                for p in by_row[name]
                if p[1] != position and p[1] not in chosen and score - p[0] < AMBIGUITY_MARGIN
            ]
            if rivals:
                doubtful.add(position)
                continue
        taken.add(name)
        confidence = 1.0 if rule == "manual" else round(min(1.0, score), 3)
        chosen[position] = NewLink(keys[position].key, name, rule, confidence)
    return [(new, chosen.get(position)) for position, new in enumerate(keys)]


def _forced(group: frozenset[SourceKey] | None, candidates: Mapping[str, Candidate]) -> set[str]:
    if group is None:
        return set()
    return {
        c.name for c in candidates.values() if any((m.source, m.key) in group for m, _ in c.members)
    }


def _refused(me: SourceKey, cand: Candidate, rules: IdentityRules) -> bool:
    """The identity file keeps ``me`` out of this row: split from a member, or the
    row is promised to another key of the same source."""
    for member, _ in cand.members:
        other = (member.source, member.key)
        if rules.kept_apart(me, other):
            return True
        group = rules.group(other)
        if group is not None and me not in group and any(s == me[0] for s, _ in group):
            return True
    return False


def row_names(source: str, key: str, name: str, *, is_id: bool) -> Iterator[str]:
    """Names a new row for ``key`` may take, in order of preference: its canonical
    name, then the name told apart by the key (or the source when the key is the
    name), then numbered."""
    yield name
    tag = canonical_name(key)[:SUFFIX_MAX] if is_id else ""
    if tag and tag != name:
        yield f"{name} ({tag})"
    qualified = f"{source} {tag}" if tag else source
    yield f"{name} ({qualified})"
    n = 2
    while True:
        yield f"{name} ({qualified} {n})"
        n += 1


class Resolver:
    """Decides the links of a source's new keys; one per run.

    Called inside the batch's transaction once the identity lock is held, so
    the candidates it reads include every link committed before.
    """

    def __init__(self, rules: IdentityRules, id_sources: Mapping[str, bool]) -> None:
        self.rules = rules
        self.id_sources = dict(id_sources)
        self._plain: dict[str, bool] = {}
        """Sources whose every link names the row by its key (see ``__call__``)."""

    async def plain(self, conn: Conn, source: str) -> bool:
        """Whether a new key of ``source`` that is a canonical name starts a row of
        its own named by the key: nothing to compare with (no other source has
        links, the identity file links nothing) and every row of the source is
        named by its key, so none holds that name yet."""
        if self.id_sources.get(source, False) or self.rules.groups:
            return False
        if await links.other_sources_linked(conn, source):
            return False
        if source not in self._plain:
            # Stays true for the run: without other sources' links, this
            # source's new rows are named by their keys.
            self._plain[source] = not await links.renamed_keys(conn, source)
        return self._plain[source]

    async def __call__(self, conn: Conn, source: str, keys: Sequence[NewKey]) -> list[NewLink]:
        is_id = self.id_sources.get(source, False)
        if all(k.key == k.name for k in keys) and await self.plain(conn, source):
            return [NewLink(k.key, k.key, "new", 1.0) for k in keys]
        others = []
        if await links.other_sources_linked(conn, source):
            others = await links.other_sources_links(conn, source)
        if not others and not self.rules.groups:
            # Nothing to compare with: every key starts a row of its own.
            return await self._name_new_rows(conn, source, [(k, None) for k in keys], is_id=is_id)
        candidates: dict[str, Candidate] = {}
        for member in others:
            cand = candidates.setdefault(member.entity, Candidate(member.entity))
            t = traits(
                member.key,
                member.names,
                member.symbol,
                is_id=self.id_sources.get(member.source, False),
            )
            cand.members.append((member, t))
        own = await links.names_in_use(conn, list(candidates), source)
        for name, has_own in own.items():
            candidates[name].has_own = has_own
        decided = decide(source, keys, candidates, self.rules, is_id=is_id)
        return await self._name_new_rows(conn, source, decided, is_id=is_id)

    async def _name_new_rows(
        self,
        conn: Conn,
        source: str,
        decided: Sequence[tuple[NewKey, NewLink | None]],
        *,
        is_id: bool,
    ) -> list[NewLink]:
        result: dict[str, NewLink] = {new.key: link for new, link in decided if link is not None}
        pending = [new for new, link in decided if link is None]
        choices = {new.key: row_names(source, new.key, new.name, is_id=is_id) for new in pending}
        wanted = {new.key: next(choices[new.key]) for new in pending}
        used: set[str] = set()
        while pending:
            in_db = await links.names_in_use(conn, sorted(set(wanted.values())), source)
            still: list[NewKey] = []
            for new in pending:
                name = wanted[new.key]
                if name in in_db or name in used:
                    wanted[new.key] = next(choices[new.key])
                    still.append(new)
                    continue
                used.add(name)
                result[new.key] = NewLink(new.key, name, "new", 1.0)
            pending = still
        return [result[new.key] for new, _ in decided]
