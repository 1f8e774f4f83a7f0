"""The matcher (pipelines/identity.py) and the identity file, without a database."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from config.errors import ConfigError
from persistence.links import Member, NewKey, StoredLink
from pipelines.identity import (
    VETO,
    Candidate,
    IdentityRules,
    compare,
    decide,
    load_identity,
    row_names,
    traits,
)
from pipelines.reprocess import stale_links
from pipelines.transform import canonical_name

T = datetime(2026, 3, 1, tzinfo=UTC)
SOURCES = {"api": True, "json": True, "csv": False}


def key(k: str, name: str, symbol: str | None, *, is_id: bool = True) -> Any:
    return traits(k, [canonical_name(name)], symbol, is_id=is_id)


@pytest.mark.parametrize(
    ("new", "old", "rule"),
    [
        # CoinPaprika's "Binance Coin" and CoinGecko's "BNB": their ids spell one slug.
        (("binancecoin", "BNB", "bnb"), ("bnb-binance-coin", "Binance Coin", "bnb"), "id"),
        # Toncoin: the tickers differ (TON, TONCOIN) but one contains the other.
        (
            ("the-open-network", "Toncoin", "ton"),
            ("toncoin-the-open-network", "The Open Network", "toncoin"),
            "id",
        ),
        # Names once generic words and punctuation are set aside.
        (
            ("havven", "Synthetix Network", "snx"),
            ("snx-synthetix", "Synthetix Token", "snx"),
            "symbol",
        ),
        (("kucoin-shares", "KuCoin", "kcs"), ("kcs-kucoin-token", "KuCoin Token", "kcs"), "symbol"),
        (("immutable-x", "ImmutableX", "imx"), ("imx-immutable-x", "Immutable X", "imx"), "id"),
        (("x1", "Polygon", "matic"), ("matic-polygon", "Polygon", "matic"), "name"),
    ],
)
def test_the_same_asset_spelled_differently_is_linked(
    new: tuple[str, str, str], old: tuple[str, str, str], rule: str
) -> None:
    found = compare(key(*new), key(*old), "unknown")
    assert found is not None
    assert found is not VETO
    assert found.rule == rule
    assert found.score >= 0.75


def test_similar_names_with_one_ticker_link_only_when_their_values_agree() -> None:
    hedera, hashgraph = key("x1", "Hedera", "hbar"), key("y2", "Hedera Hashgraph", "hbar")
    found = compare(hedera, hashgraph, "agree")
    assert found is not None
    assert found is not VETO
    assert (found.rule, found.score) == ("value", 0.75)
    assert compare(hedera, hashgraph, "unknown") is None
    # The same ticker and agreeing values, and names that have little in common.
    assert compare(key("x1", "Hedera", "hbar"), key("y2", "Helium Mobile", "hbar"), "agree") is None


@pytest.mark.parametrize(
    ("new", "old"),
    [
        # Same name, conflicting tickers: the new Aave and the old one.
        (("aave", "Aave", "aave"), ("lend-ethlend", "Aave", "lend")),
        # An edition word on one side only.
        (("bittorrent", "BitTorrent", "btt"), ("btt-bittorrent", "BitTorrent (Old Chain)", "btt")),
        (("bitcoin", "Bitcoin", "btc"), ("wbtc-wrapped-bitcoin", "Wrapped Bitcoin", "wbtc")),
    ],
)
def test_contradicting_evidence_vetoes(
    new: tuple[str, str, str], old: tuple[str, str, str]
) -> None:
    assert compare(key(*new), key(*old), "unknown") is VETO


def test_a_shared_ticker_alone_links_nothing() -> None:
    tokamak = key("ton-tokamak-network", "Tokamak Network", "ton")
    toncoin = key("the-open-network", "Toncoin", "ton")
    assert compare(toncoin, tokamak, "unknown") is None
    # Agreeing prices at the same moment are not enough either when names differ this much.
    assert compare(toncoin, tokamak, "agree") is None


@pytest.mark.parametrize("values", ["unknown", "agree"])
def test_names_that_are_only_generic_words_and_numbers_link_nothing(values: str) -> None:
    assert (
        compare(key("coin 5", "Coin 5", None, is_id=False), key("c5", "Token 5", None), values)
        is None
    )
    assert compare(key("coin-5", "Coin 5", "c"), key("token-5", "Token 5", "c"), values) is None


def test_a_numbered_id_needs_agreeing_values() -> None:
    # CoinGecko's "beam-2": the upstream itself had to tell two Beams apart.
    gaming = key("beam-2", "Beam", "beam")
    privacy = key("beam-beam", "Beam", "beam")
    assert compare(gaming, privacy, "unknown") is None
    assert compare(gaming, privacy, "disagree") is VETO
    agreed = compare(gaming, privacy, "agree")
    assert agreed is not None
    assert agreed is not VETO
    assert agreed.rule == "name"


def test_disagreeing_values_never_split_equal_names() -> None:
    # The base rule: one canonical name is one asset unless something contradicts it.
    found = compare(
        key("bitcoin", "Bitcoin", None, is_id=False),
        key("btc-bitcoin", "Bitcoin", "btc"),
        "disagree",
    )
    assert found is not None
    assert found is not VETO
    assert found.rule == "name"


def member(source: str, k: str, name: str, symbol: str | None, row: str, **kw: Any) -> Any:
    m = Member(source, k, row, (canonical_name(name),), symbol, kw.get("value"), kw.get("at"))
    return m, traits(k, m.names, symbol, is_id=SOURCES[source])


def candidates(*members: tuple[Any, Any]) -> dict[str, Candidate]:
    found: dict[str, Candidate] = {}
    for m, t in members:
        found.setdefault(m.entity, Candidate(m.entity)).members.append((m, t))
    return found


def new(k: str, name: str, symbol: str | None, value: float = 1.0, at: datetime = T) -> NewKey:
    return NewKey(k, canonical_name(name), symbol, value, at)


def test_two_rows_about_as_good_are_a_doubt_and_neither_is_taken() -> None:
    rows = candidates(
        member("api", "aave-new", "Aave", None, "aave"),
        member("api", "lend-ethlend", "Aave", None, "aave (lend-ethlend)"),
    )
    # A CSV "aave" would join either by name; the row named "aave" is its own.
    [(_, link)] = decide("csv", [new("aave", "Aave", None)], rows, IdentityRules(), is_id=False)
    assert link is not None
    assert link.entity == "aave"
    # A CoinGecko "Aave" without a ticker has no such tie-break against two equal
    # rows with other names.
    rows = candidates(
        member("api", "x-aave", "Aave", None, "aave one"),
        member("api", "y-aave", "Aave", None, "aave two"),
    )
    [(_, link)] = decide("json", [new("aave", "Aave", None)], rows, IdentityRules(), is_id=True)
    assert link is None


def test_a_row_takes_one_key_per_source_the_best_first() -> None:
    rows = candidates(member("api", "xrp-xrp", "XRP", "xrp", "xrp"))
    keys = [new("xrp-token", "XRP Token", "xrp"), new("ripple", "XRP", "xrp")]
    decided = dict(decide("json", keys, rows, IdentityRules(), is_id=True))
    chosen = decided[keys[1]]
    assert chosen is not None
    assert chosen.entity == "xrp"
    assert decided[keys[0]] is None


def test_the_identity_file_forces_links_and_splits() -> None:
    rows = candidates(
        member("api", "luna-terra", "Terra Classic", "lunc", "terra classic"),
        member("api", "beam-beam", "Beam", "beam", "beam"),
    )
    rules = IdentityRules(
        groups=(frozenset({("api", "luna-terra"), ("json", "terra-luna")}),),
        splits=(frozenset({("api", "beam-beam"), ("json", "beam")}),),
    )
    keys = [new("terra-luna", "Terra", "luna"), new("beam", "Beam", "beam")]
    decided = dict(decide("json", keys, rows, rules, is_id=True))
    terra = decided[keys[0]]
    assert terra is not None
    assert (terra.entity, terra.rule, terra.confidence) == (
        "terra classic",
        "manual",
        1.0,
    )
    assert decided[keys[1]] is None
    without = dict(decide("json", keys, rows, IdentityRules(), is_id=True))
    assert without[keys[0]] is None
    beam = without[keys[1]]
    assert beam is not None
    assert beam.entity == "beam"


def test_a_new_row_is_named_by_its_canonical_name_then_told_apart_by_its_key() -> None:
    names = row_names("api", "lend-ethlend", "aave", is_id=True)
    assert [next(names) for _ in range(4)] == [
        "aave",
        "aave (lend-ethlend)",
        "aave (api lend-ethlend)",
        "aave (api lend-ethlend 2)",
    ]
    names = row_names("csv", "aave", "aave", is_id=False)
    assert [next(names) for _ in range(3)] == ["aave", "aave (csv)", "aave (csv 2)"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "identity.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_identity_file_is_optional_unless_named(tmp_path: Path) -> None:
    assert load_identity(None, tmp_path / "sources.toml", SOURCES) == IdentityRules()
    with pytest.raises(ConfigError, match=r"^IDENTITY_FILE: file not found: "):
        load_identity(tmp_path / "nope.toml", tmp_path / "sources.toml", SOURCES)


def test_keys_of_sources_without_ids_are_canonical_names(tmp_path: Path) -> None:
    write(tmp_path, '[[link]]\nmembers = ["csv:  Binance COIN ", "json:binancecoin"]\n')
    rules = load_identity(None, tmp_path / "sources.toml", SOURCES)
    assert rules.groups == (frozenset({("csv", "binance coin"), ("json", "binancecoin")}),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[link]\n", "IDENTITY_FILE: .*identity.toml: "),
        ('[[merge]]\nmembers = ["api:a", "json:b"]\n', "unknown field"),
        ('[[link]]\nmembers = ["api:a", "nope:b"]\n', r"link\[0\]: unknown source 'nope'"),
        ('[[link]]\nmembers = ["api:a", "json"]\n', r"link\[0\]: 'json' is not 'source:key'"),
        ('[[split]]\nmembers = ["api:a"]\n', r"split\[0\]: needs at least two"),
        (
            '[[link]]\nmembers = ["api:a", "json:b"]\n[[link]]\nmembers = ["json:b", "api:c"]\n',
            "a link joins two keys of source 'api' \\(api:a, api:c\\)",
        ),
        (
            '[[link]]\nmembers = ["api:a", "json:b"]\n[[split]]\nmembers = ["json:b", "api:a"]\n',
            "api:a and json:b are both linked and split",
        ),
    ],
)
def test_a_bad_identity_file_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_identity(None, tmp_path / "sources.toml", SOURCES)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith("IDENTITY_FILE: ")


def test_reprocess_decides_again_the_links_the_file_contradicts() -> None:
    stored = [
        StoredLink("api", "luna-terra", "terra classic", "new"),
        StoredLink("json", "terra-luna", "terra", "new"),
        StoredLink("api", "beam-beam", "beam", "new"),
        StoredLink("json", "beam", "beam", "name"),
        StoredLink("api", "x", "x", "new"),
        StoredLink("json", "y", "x", "manual"),  # the file no longer says so
        StoredLink("api", "bnb-binance-coin", "bnb", "new"),
        StoredLink("json", "binancecoin", "bnb", "id"),
    ]
    rules = IdentityRules(
        groups=(frozenset({("api", "luna-terra"), ("json", "terra-luna")}),),
        splits=(frozenset({("api", "beam-beam"), ("json", "beam")}),),
    )
    assert stale_links(stored, rules) == [("json", "y"), ("json", "terra-luna"), ("json", "beam")]
    assert stale_links(stored, IdentityRules()) == [("json", "y")]


def test_traits_read_ids_with_or_without_a_leading_ticker() -> None:
    paprika = traits("theta-theta-token", ["theta"], "theta", is_id=True)
    gecko = traits("theta-token", ["theta network"], "theta", is_id=True)
    assert "thetatoken" in paprika.slugs & gecko.slugs
    assert traits("avalanche-2", ["avalanche"], "avax", is_id=True).numbered
    assert not traits("btc2-bitcoin-2", ["bitcoin 2"], "btc2", is_id=True).numbered
    assert traits("luna-terra-v2", ["terra"], "luna", is_id=True).numbered
