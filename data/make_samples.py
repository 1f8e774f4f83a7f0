"""Generate the sample inputs of the ``csv`` and ``json`` sources.

    python data/make_samples.py            # rewrites data/sample.csv and data/third_source.json
    python data/make_samples.py --out DIR  # writes them somewhere else

The output is deterministic: one seeded ``random.Random`` drives every choice
and the files are written byte by byte (no locale, no platform line endings),
so regenerating gives the same bytes on every machine. Standard library only.

``sample.csv`` imitates a hand-maintained export: names with stray whitespace
and mixed case, the same coin many times with different timestamps, values with
thousands separators, empty cells, exact duplicate lines and a handful of rows
that must be rejected. ``third_source.json`` is a CoinGecko ``coins/markets``
page whose names overlap with the CSV and with CoinPaprika's tickers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

SEED = 20261126
CSV_ROWS = 3000
JSON_OBJECTS = 300
GENERATED_TOKENS = 320

# Real coins: (name as the upstreams spell it, symbol, rough USD price). The
# prices only need to look plausible; the pipeline never checks them.
COINS: tuple[tuple[str, str, float], ...] = (
    ("Bitcoin", "BTC", 97250.0),
    ("Ethereum", "ETH", 3420.0),
    ("Tether", "USDT", 1.0),
    ("XRP", "XRP", 2.31),
    ("BNB", "BNB", 655.0),
    ("Solana", "SOL", 191.0),
    ("USDC", "USDC", 1.0),
    ("Dogecoin", "DOGE", 0.32),
    ("Cardano", "ADA", 0.95),
    ("TRON", "TRX", 0.25),
    ("Chainlink", "LINK", 22.4),
    ("Avalanche", "AVAX", 40.2),
    ("Stellar", "XLM", 0.42),
    ("Toncoin", "TON", 5.5),
    ("Shiba Inu", "SHIB", 0.000022),
    ("Sui", "SUI", 4.2),
    ("Hedera", "HBAR", 0.28),
    ("Bitcoin Cash", "BCH", 452.0),
    ("Polkadot", "DOT", 7.5),
    ("Litecoin", "LTC", 105.0),
    ("Hyperliquid", "HYPE", 25.0),
    ("UNUS SED LEO", "LEO", 9.1),
    ("Uniswap", "UNI", 13.2),
    ("Dai", "DAI", 1.0),
    ("Pepe", "PEPE", 0.000018),
    ("NEAR Protocol", "NEAR", 5.2),
    ("Aptos", "APT", 9.5),
    ("Internet Computer", "ICP", 10.1),
    ("Ethereum Classic", "ETC", 27.3),
    ("Monero", "XMR", 201.0),
    ("Cronos", "CRO", 0.15),
    ("Render", "RENDER", 7.1),
    ("Polygon", "POL", 0.45),
    ("Kaspa", "KAS", 0.12),
    ("Artificial Superintelligence Alliance", "FET", 1.3),
    ("Arbitrum", "ARB", 0.8),
    ("Ethena USDe", "USDE", 1.0),
    ("Bittensor", "TAO", 452.0),
    ("VeChain", "VET", 0.045),
    ("Filecoin", "FIL", 5.2),
    ("Algorand", "ALGO", 0.35),
    ("Cosmos Hub", "ATOM", 6.5),
    ("Optimism", "OP", 1.9),
    ("Stacks", "STX", 1.6),
    ("Mantle", "MNT", 1.1),
    ("Injective", "INJ", 22.0),
    ("OKB", "OKB", 48.0),
    ("Immutable", "IMX", 1.3),
    ("The Graph", "GRT", 0.2),
    ("Bonk", "BONK", 0.000025),
    ("Theta Network", "THETA", 2.0),
    ("Fantom", "FTM", 0.7),
    ("Sei", "SEI", 0.4),
    ("Jupiter", "JUP", 0.9),
    ("Lido DAO", "LDO", 1.8),
    ("Aave", "AAVE", 301.0),
    ("Maker", "MKR", 1520.0),
    ("dogwifhat", "WIF", 1.9),
    ("Floki", "FLOKI", 0.00017),
    ("Ondo", "ONDO", 1.3),
    ("Celestia", "TIA", 5.0),
    ("THORChain", "RUNE", 4.0),
    ("Arweave", "AR", 16.0),
    ("Quant", "QNT", 110.0),
    ("Flow", "FLOW", 0.7),
    ("GALA", "GALA", 0.035),
    ("The Sandbox", "SAND", 0.5),
    ("Decentraland", "MANA", 0.45),
    ("Axie Infinity", "AXS", 6.0),
    ("EOS", "EOS", 0.8),
    ("Tezos", "XTZ", 1.2),
    ("Neo", "NEO", 13.0),
    ("IOTA", "IOTA", 0.3),
    ("Zcash", "ZEC", 50.0),
    ("Dash", "DASH", 35.0),
    ("Chiliz", "CHZ", 0.09),
    ("Curve DAO Token", "CRV", 0.9),
    ("PancakeSwap", "CAKE", 2.5),
    ("Kava", "KAVA", 0.45),
    ("Mina Protocol", "MINA", 0.55),
    ("eCash", "XEC", 0.00004),
    ("Helium", "HNT", 6.0),
    ("Conflux", "CFX", 0.15),
    ("Synthetix Network", "SNX", 2.2),
    ("Klaytn", "KLAY", 0.2),
    ("Pendle", "PENDLE", 5.0),
    ("Worldcoin", "WLD", 2.4),
    ("Beam", "BEAM", 0.025),
    ("Akash Network", "AKT", 3.0),
    ("Starknet", "STRK", 0.5),
    ("JasmyCoin", "JASMY", 0.035),
    ("Raydium", "RAY", 5.0),
    ("Ethereum Name Service", "ENS", 35.0),
    ("1inch", "1INCH", 0.4),
    ("Compound", "COMP", 80.0),
    ("Zilliqa", "ZIL", 0.025),
    ("Enjin Coin", "ENJ", 0.3),
    ("Basic Attention Token", "BAT", 0.25),
    ("Loopring", "LRC", 0.2),
    ("Ravencoin", "RVN", 0.02),
    ("Qtum", "QTUM", 3.5),
    ("Holo", "HOT", 0.002),
    ("Oasis Network", "ROSE", 0.08),
    ("Celo", "CELO", 0.7),
    ("Ankr", "ANKR", 0.035),
    ("Harmony", "ONE", 0.025),
    ("Decred", "DCR", 18.0),
    ("Kusama", "KSM", 30.0),
    ("Convex Finance", "CVX", 4.0),
    ("Gnosis", "GNO", 280.0),
    ("Frax", "FRAX", 1.0),
    ("TrueUSD", "TUSD", 1.0),
    ("PayPal USD", "PYUSD", 1.0),
    ("First Digital USD", "FDUSD", 1.0),
    ("Wrapped Bitcoin", "WBTC", 97180.0),
    ("Lido Staked Ether", "STETH", 3415.0),
    ("Wrapped Ether", "WETH", 3421.0),
    ("Rocket Pool ETH", "RETH", 3830.0),
    ("Coinbase Wrapped BTC", "CBBTC", 97210.0),
    ("Bitget Token", "BGB", 4.5),
    ("GateToken", "GT", 20.0),
    ("KuCoin Token", "KCS", 12.0),
    ("Pi Network", "PI", 1.5),
    ("Ethena", "ENA", 0.9),
    ("Virtuals Protocol", "VIRTUAL", 2.5),
    ("Official Trump", "TRUMP", 20.0),
    ("Pudgy Penguins", "PENGU", 0.03),
    ("Movement", "MOVE", 0.6),
    ("Fartcoin", "FARTCOIN", 1.0),
    ("World Liberty Financial", "WLFI", 0.2),
    ("Story", "IP", 5.0),
    ("Berachain", "BERA", 6.0),
    ("Sonic", "S", 0.6),
    ("XDC Network", "XDC", 0.08),
    ("Nexo", "NEXO", 1.3),
    ("Trust Wallet Token", "TWT", 1.2),
    ("Terra Luna Classic", "LUNC", 0.0001),
    ("Terra", "LUNA", 0.4),
    ("Osmosis", "OSMO", 0.5),
    ("dYdX", "DYDX", 1.5),
    ("GMX", "GMX", 28.0),
    ("Blur", "BLUR", 0.3),
    ("SafePal", "SFP", 0.8),
    ("Aerodrome Finance", "AERO", 1.2),
    ("Ocean Protocol", "OCEAN", 0.7),
    ("Livepeer", "LPT", 15.0),
    ("Golem", "GLM", 0.4),
    ("Siacoin", "SC", 0.006),
    ("Audius", "AUDIO", 0.15),
    ("SushiSwap", "SUSHI", 1.3),
    ("yearn.finance", "YFI", 8500.0),
    ("Balancer", "BAL", 2.5),
    ("Band Protocol", "BAND", 1.5),
    ("Horizen", "ZEN", 12.0),
    ("Wormhole", "W", 0.3),
    ("Pyth Network", "PYTH", 0.4),
    ("Jito", "JTO", 3.0),
    ("Core", "CORE", 1.1),
    ("GMT", "GMT", 0.15),
    ("Axelar", "AXL", 0.8),
)

# CoinGecko ids that are not simply the slug of the name.
GECKO_IDS = {
    "XRP": "ripple",
    "BNB": "binancecoin",
    "USDC": "usd-coin",
    "TRON": "tron",
    "Avalanche": "avalanche-2",
    "Toncoin": "the-open-network",
    "Hedera": "hedera-hashgraph",
    "UNUS SED LEO": "leo-token",
    "Polygon": "polygon-ecosystem-token",
    "Internet Computer": "internet-computer",
    "Cronos": "crypto-com-chain",
    "Artificial Superintelligence Alliance": "fetch-ai",
    "Ethena USDe": "ethena-usde",
    "Cosmos Hub": "cosmos",
    "Wrapped Bitcoin": "wrapped-bitcoin",
    "Lido Staked Ether": "staked-ether",
    "Wrapped Ether": "weth",
}

# CSV rows that must be rejected (name, value, updated_at), one per kind of
# defect the pipeline is expected to report.
BAD_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Cardano", "n/a", "2026-11-21T09:30:00Z"),
    ("Stellar", "n/a", "2026-11-23T17:05:00Z"),
    ("  Kaspa", "N/A", "2026-11-24T02:45:00Z"),
    ("", "12.50", "2026-11-22T11:00:00Z"),
    ("   ", "0.75", "2026-11-23T06:20:00Z"),
    ("", "3,210.00", "2026-11-25T13:40:00Z"),
    ("Monero", "NaN", "2026-11-22T15:10:00Z"),
    ("Token 0007", "NaN", "2026-11-24T19:55:00Z"),
    ("Litecoin", "-inf", "2026-11-25T08:00:00Z"),
    ("Ethereum", "3,398.10", "2026-11-31T10:00:00Z"),
    ("Solana", "188.42", "yesterday"),
    ("Dogecoin", "0.3187", "20/11/2026 08:15"),
    ("Chainlink", "", "2026-11-21T20:30:00Z"),
    ("Polkadot", "", "2026-11-26T04:15:00Z"),
    ("Tether", "  ", "2026-11-24T12:00:00Z"),
)

_EPOCH_START = datetime(2026, 11, 20, tzinfo=UTC)
_LATE_OCTOBER = datetime(2026, 10, 29, tzinfo=UTC)


def _slug(name: str) -> str:
    out = "".join(ch if ch.isalnum() else "-" for ch in name.lower())
    return "-".join(part for part in out.split("-") if part)


def _decimals(price: float) -> int:
    """Enough decimals to show a few significant digits of a small price."""
    if price >= 1:
        return 2
    return max(4, -math.floor(math.log10(price)) + 3)


def _entities(rng: random.Random) -> list[tuple[str, str, float, bool]]:
    """Every coin of the samples: (name, symbol, price, is_real)."""
    out = [(name, symbol, price, True) for name, symbol, price in COINS]
    numbers = rng.sample(range(10000), GENERATED_TOKENS)
    for n in numbers:
        price = math.pow(10.0, rng.uniform(-3.0, 1.7))
        out.append((f"Token {n:04d}", f"T{n:04d}", price, False))
    return out


def _jitter(rng: random.Random, price: float, spread: float = 0.03) -> float:
    if price == 1.0:  # stablecoins barely move
        return 1.0 + rng.uniform(-0.002, 0.002)
    return price * (1.0 + rng.gauss(0.0, spread))


def _name_variant(rng: random.Random, name: str) -> str:
    roll = rng.random()
    if roll < 0.55:
        return name
    if roll < 0.65:
        return f" {name.upper()} "
    if roll < 0.75:
        return name.lower()
    if roll < 0.83:
        return "  " + name
    if roll < 0.90:
        return name + "   "
    if roll < 0.95 and " " in name:
        return name.replace(" ", "  ", 1)
    if roll < 0.98:
        return name.title()
    return f"\t{name}"


def _value_text(rng: random.Random, value: float) -> str:
    text = f"{value:.{_decimals(abs(value))}f}"
    if abs(value) >= 1000 and rng.random() < 0.6:
        text = f"{value:,.2f}"
    elif rng.random() < 0.03:
        text = f" {text} "
    return text


def _csv_timestamp(rng: random.Random) -> str:
    if rng.random() < 0.04:
        moment = _LATE_OCTOBER + timedelta(seconds=rng.randrange(3 * 86400))
    else:
        moment = _EPOCH_START + timedelta(seconds=rng.randrange(7 * 86400))
    if rng.random() < 0.7:
        moment = moment.replace(second=0)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _csv_field(text: str) -> str:
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def build_csv(rng: random.Random, entities: list[tuple[str, str, float, bool]]) -> bytes:
    """The bytes of ``sample.csv``."""
    weights = [6.0 if real else 1.0 for *_, real in entities]
    rows: list[tuple[str, str, str]] = []
    target = CSV_ROWS - len(BAD_ROWS)
    while len(rows) < target:
        name, _symbol, price, _real = rng.choices(entities, weights)[0]
        stamp = _csv_timestamp(rng)
        value = _value_text(rng, _jitter(rng, price))
        if rng.random() < 0.005:
            stamp = ""  # a missing timestamp is allowed: ingestion time stands in
        rows.append((_name_variant(rng, name), value, stamp))
        if rng.random() < 0.004 and len(rows) < target:
            rows.append(rows[-1])  # an exact re-delivery of the same line
    rows.extend(BAD_ROWS)
    rng.shuffle(rows)
    lines = ["name,value,updated_at"]
    lines.extend(",".join(_csv_field(field) for field in row) for row in rows)
    return ("\n".join(lines) + "\n").encode("utf-8")


def _gecko_object(
    rng: random.Random, index: int, name: str, symbol: str, price: float, cap: float
) -> dict[str, object]:
    gecko_id = GECKO_IDS.get(name, _slug(name))
    current = _jitter(rng, price, 0.01)
    decimals = _decimals(current) + (1 if current >= 1 else 0)
    change_pct = rng.gauss(0.0, 3.5) if price != 1.0 else rng.uniform(-0.1, 0.1)
    change = current - current / (1.0 + change_pct / 100.0)
    high = current * (1.0 + abs(rng.gauss(0.0, 0.02)))
    low = current * (1.0 - abs(rng.gauss(0.0, 0.02)))
    supply = cap * rng.uniform(0.9, 1.1) / price
    stamp = datetime(2026, 11, 26, 14, tzinfo=UTC) + timedelta(
        seconds=rng.randrange(1800), milliseconds=rng.randrange(1000)
    )
    return {
        "id": gecko_id,
        "symbol": symbol.lower(),
        "name": name,
        "image": f"https://coin-images.coingecko.com/coins/images/{index}/large/{gecko_id}.png",
        "current_price": round(current, decimals),
        "market_cap": round(current * supply),
        "market_cap_rank": 0,
        "total_volume": round(current * supply * rng.uniform(0.005, 0.2)),
        "high_24h": round(high, decimals),
        "low_24h": round(low, decimals),
        "price_change_24h": round(change, decimals + 2),
        "price_change_percentage_24h": round(change_pct, 5),
        "circulating_supply": round(supply, 1),
        "last_updated": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
    }


def _market_cap(rng: random.Random, index: int, real_coin: bool) -> float:
    if real_coin:
        return 1.9e12 * math.pow(index + 1, -1.6)
    return math.pow(10.0, rng.uniform(6.0, 8.6))


def _by_market_cap(obj: dict[str, object]) -> tuple[float, str]:
    cap = obj["market_cap"]
    return (-float(cap) if isinstance(cap, int | float) else 0.0, str(obj["id"]))


def build_json(rng: random.Random, entities: list[tuple[str, str, float, bool]]) -> bytes:
    """The bytes of ``third_source.json``: every real coin plus generated tokens."""
    real = [e for e in entities if e[3]]
    generated = [e for e in entities if not e[3]]
    chosen = real + rng.sample(generated, JSON_OBJECTS - len(real))
    objects = [
        # Real coins keep roughly their order by size; generated ones trail behind.
        _gecko_object(rng, i + 1, name, symbol, price, _market_cap(rng, i, real_coin))
        for i, (name, symbol, price, real_coin) in enumerate(chosen)
    ]
    objects.sort(key=_by_market_cap)
    for rank, obj in enumerate(objects, start=1):
        obj["market_cap_rank"] = rank
    return (json.dumps(objects, indent=1, ensure_ascii=True) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    entities = _entities(rng)
    csv_bytes = build_csv(rng, entities)
    json_bytes = build_json(rng, entities)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sample.csv").write_bytes(csv_bytes)
    (args.out / "third_source.json").write_bytes(json_bytes)


if __name__ == "__main__":
    main()
