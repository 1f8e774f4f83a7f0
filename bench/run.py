"""``make bench``: run the scenarios, print one table, write ``bench/out/results.json``.

    python -m bench.run                  # full sizes (1M-row CSV, 3M for memory)
    python -m bench.run --quick          # small sizes: a smoke check in a minute or two
    python -m bench.run --only reads     # one scenario (repeatable)
    python -m bench.run --profile        # also py-spy the CSV run and summarize it
    python -m bench.run --variant before:/tmp/old-checkout   # and that code, in turns

The database server is an embedded PostgreSQL in a temporary folder, or the one
``BENCH_DATABASE_URL`` names (an admin URL: the bench creates and drops its own
databases there). ``ETL_BATCH_SIZE`` is passed through to the service.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench import load
from bench.db import DatabaseServer
from bench.inputs import FULL, QUICK, make_tickers, prepare
from bench.load import tool_name
from bench.proc import REPO_ROOT, compile_code
from bench.report import Results, code_version, machine, table
from bench.scenarios import DEFAULT, NEEDS, SCENARIOS, BenchError, Context, Variant
from bench.upstream import PagedUpstream

OUT = REPO_ROOT / "bench" / "out"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="Kasparro benchmarks against same-run baselines."
    )
    parser.add_argument("--quick", action="store_true", help="small inputs (100k-row CSV)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="N",
        help="loads per ingestion scenario, Kasparro and reference in turns (full: 3, quick: 1)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=_variant,
        metavar="LABEL:ITEM[,ITEM...]",
        help=(
            "also measure another build in turns with this one (repeatable): each ITEM "
            "a VAR=VALUE setting or the folder of another checkout, e.g. "
            "no-cache:DATA_CACHE_BYTES=0 or before:/tmp/kasparro-before "
            "(ingestion scenarios and reads)"
        ),
    )
    parser.add_argument("--profile", action="store_true", help="add the py-spy profile scenario")
    parser.add_argument(
        "--load-generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when installed, else the aiohttp generator (two processes)",
    )
    parser.add_argument(
        "--out", type=Path, default=OUT / "results.json", help="the JSON results file"
    )
    parser.add_argument(
        "--inputs",
        type=Path,
        default=None,
        help="keep generated inputs in this folder and reuse them (default: a temporary folder)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (inputs, database files)"
    )
    return parser


def _variant(text: str) -> Variant:
    try:
        return Variant.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _log(message: str) -> None:
    print(message, flush=True)


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every figure."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        sizes = dataclasses.replace(sizes, rounds=max(1, args.rounds))
    load.preferred = args.load_generator
    selected = list(args.only or DEFAULT)
    if args.profile and "profile" not in selected:
        selected.append("profile")
    # Run in the declared order whatever the order on the command line.
    selected = [name for name in SCENARIOS if name in selected]

    workdir = Path(tempfile.mkdtemp(prefix="kasparro-bench-"))
    if not args.keep:
        # Registered before the embedded server's own exit hook, so it runs after it.
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    out_dir = args.out.parent
    logs = out_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    results = Results()
    results.meta = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sizes": sizes.as_dict(),
        "scenarios": selected,
        "load_generator": tool_name(),
        "batch_size_env": os.environ.get("ETL_BATCH_SIZE"),
        "machine": machine(),
        "code": code_version(),
        "variants": [v.describe() for v in args.variant],
    }
    _log(f"bench ({sizes.label}): {', '.join(selected)}; work folder {workdir}")
    _log(f"load generator: {results.meta['load_generator']}")
    for variant in args.variant:
        _log(f"variant {variant.label}: code {variant.root}, settings {dict(variant.env)}")
    baseline = os.environ.get("BENCH_BASELINE", "").strip()
    compile_code(REPO_ROOT)
    for variant in args.variant:
        compile_code(variant.root, variant.python)
    if baseline:
        compile_code(Path(baseline))

    started = time.perf_counter()
    needed: set[str] = set().union(*(NEEDS[name] for name in selected))
    inputs = prepare(args.inputs or workdir / "inputs", sizes, needed, _log)
    _log(f"inputs ready in {time.perf_counter() - started:.1f}s")

    server = DatabaseServer.start(workdir)
    results.meta["database"] = server.describe()
    _log(f"database: {server.kind} PostgreSQL {server.version}")

    upstream: PagedUpstream | None = None
    if "ingest_http" in selected:
        upstream = PagedUpstream(
            make_tickers(sizes.http_records, seed=4), sizes.http_page_size
        ).start()
    ctx = Context(
        sizes=sizes,
        workdir=workdir,
        logs=logs,
        out=out_dir,
        inputs=inputs,
        server=server,
        results=results,
        upstream=upstream,
        variants=args.variant,
        log=_log,
    )
    try:
        for name in selected:
            load_before = _load_average()
            _log(f"[{name}]" + (f"  (load average {load_before:.2f})" if load_before else ""))
            begun = time.perf_counter()
            try:
                SCENARIOS[name](ctx)
            except BenchError as exc:
                results.errors[name] = str(exc)
                _log(f"  FAILED: {exc}")
            except Exception as exc:  # one broken scenario must not hide the others
                results.errors[name] = f"{type(exc).__name__}: {exc}"
                _log(f"  FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            _log(f"  ({time.perf_counter() - begun:.1f}s)")
            results.meta.setdefault("load_average", {})[name] = [load_before, _load_average()]
    finally:
        if upstream is not None:
            upstream.stop()
        if server.kind == "external":
            server.drop_all()
    results.meta["total_seconds"] = round(time.perf_counter() - started, 1)
    results.write_json(args.out)
    print()
    print(table(results))
    for name, error in results.errors.items():
        print(f"\n{name} FAILED: {error}")
    print(f"\nresults: {args.out}; logs of every child process: {logs}")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
