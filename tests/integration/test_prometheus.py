"""A real Prometheus scrapes a live ``kasparro serve`` and evaluates the shipped
alert rules and every query of the shipped dashboard.

Each query must parse and return series (an empty answer is a panel that shows
nothing), and every rule must evaluate without error, on what the service
really exports. Skipped where the ``prometheus`` binary (Debian's package) is
absent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import REPO_ROOT, cli_env, csv_entry, csv_rows, write_csv, write_sources
from tests.integration.test_serve import Served

PROMETHEUS = shutil.which("prometheus")
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "kasparro.json"
RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
# Grafana's variables, as the dashboard would fill them in over a short range.
VARIABLES = {"$__rate_interval": "5s", "$__range": "1m", "$source": ".*"}

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus)"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for child in node.values():
            yield from _expressions(child)
    elif isinstance(node, list):
        for child in node:
            yield from _expressions(child)


class Prometheus:
    def __init__(self, folder: Path, target: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "kasparro", "static_configs": [{"targets": [target]}]}
                    ],
                }
            ),
            encoding="utf-8",
        )
        self.log = folder / "prometheus.log"
        assert PROMETHEUS is not None
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def ready(self, timeout: float) -> None:
        """Waits until the server answers queries (it says 503 while its storage opens)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/-/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.log.read_text(errors="replace")
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.2)

    def query(self, expr: str) -> list[Any]:
        response = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        assert response.status_code == 200, f"{expr}: {response.status_code} {response.text}"
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[Any] = body["data"]["result"]
        return result

    def until(self, expr: str, timeout: float) -> list[Any]:
        """The answer to ``expr`` once it has series; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.query(expr)
                if result:
                    return result
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.log.read_text(errors="replace")
            assert time.monotonic() < deadline, f"{expr} stayed empty"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def test_prometheus_evaluates_every_dashboard_query_and_rule_on_a_live_service(
    tmp_path: Path, database_url: str
) -> None:
    write_csv(tmp_path / "prices.csv", csv_rows(30))
    sources = write_sources(tmp_path, csv_entry("prices.csv"))
    env = cli_env(
        database_url,
        sources,
        API_KEY="prom-key-0123",  # pragma: allowlist secret
        ETL_ON_STARTUP="true",
        ETL_INTERVAL_SECONDS=0,
    )
    served = Served(env)
    prometheus: Prometheus | None = None
    try:
        target = urlsplit(served.listening()).netloc
        prometheus = Prometheus(tmp_path, target)
        prometheus.ready(timeout=60)
        # The startup run finished and was scraped, and a few scrapes followed.
        prometheus.until('etl_runs_total{status="success"} == 1', timeout=60)
        prometheus.until('count_over_time(up{job="kasparro"}[1m]) >= 6', timeout=60)

        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        expressions = list(_expressions(dashboard.get("panels", [])))
        assert len(expressions) >= 15
        for expr in expressions:
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert prometheus.query(expr), f"the panel query {expr!r} has no series"

        rules = httpx.get(f"{prometheus.base}/api/v1/rules", timeout=10).json()
        evaluated = [rule for group in rules["data"]["groups"] for rule in group["rules"]]
        assert len(evaluated) == 8
        assert [(r["name"], r.get("lastError", "")) for r in evaluated if r["health"] != "ok"] == []
        # One replica, all well: nothing fires.
        firing = [a for a in prometheus.query("ALERTS") if a["metric"]["alertstate"] == "firing"]
        assert firing == []
    finally:
        if prometheus is not None:
            prometheus.stop()
        served.kill()
