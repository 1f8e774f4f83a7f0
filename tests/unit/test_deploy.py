"""The deployment files agree with each other and with the service.

compose.yaml against the Compose specification and free of default
credentials; the dashboard and Prometheus rules against the metrics the service
really exports; the Containerfile's final stage; .env.example against the
settings; the sample data against its generator.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from observability.metrics import Metrics, exposition
from persistence.metric_totals import EtlTotals

yaml = pytest.importorskip("yaml", reason="pyyaml is part of the dev extra")

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
COMPOSE_SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "compose-spec.json"
CONTAINERFILE = REPO_ROOT / "Containerfile"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "kasparro.json"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.test.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DATA_DIR = REPO_ROOT / "data"

# Series Prometheus makes up itself for every scrape target; rules may use them.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# Contract section 2, plus the settings the service adds and the variables
# compose.yaml requires.
SETTINGS = (
    "DATABASE_URL",
    "DATABASE_READ_URL",
    "DATA_DIR",
    "API_KEY",
    "APP_ENV",
    "SOURCES_FILE",
    "API_SOURCE_URL",
    "API_SOURCE_KEY",
    "CSV_SOURCE_PATH",
    "JSON_SOURCE_PATH",
    "ETL_INTERVAL_SECONDS",
    "ETL_ON_STARTUP",
    "ETL_BATCH_SIZE",
    "ETL_PARSE_PROCESS_MIN_BYTES",
    "ETL_FAIL_AFTER_RECORDS",
    "DATA_CACHE_BYTES",
    "ETL_LEASE_SECONDS",
    "DATABASE_POOL_SIZE",
    "DATABASE_RUN_POOL_SIZE",
    "DATABASE_STATEMENT_CACHE_SIZE",
    "HOST",
    "PORT",
    "SERVE_ADDRESS_FILE",
    "HTTP_HEADER_TIMEOUT_SECONDS",
    "HTTP_KEEP_ALIVE_SECONDS",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "GRAFANA_ADMIN_PASSWORD",
)

_SENSITIVE = re.compile(
    r"(?:^|_)(?:PASSWORD|PASSWD|PASS|SECRET|TOKEN|USER|USERNAME|KEY)(?:_|$)", re.IGNORECASE
)
# `${NAME}` and its operators; `$${...}` is an escape for the container's shell.
_INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}")
_REQUIRED = re.compile(r"^:\?\S.*$")
_URL_USERINFO = re.compile(r"[a-z][a-z0-9+.-]*://(?P<userinfo>[^@/\s]+)@", re.IGNORECASE)


# ---------------------------------------------------------------- helpers


def exported_metric_names() -> set[str]:
    """Every series name the service's registry exposes on ``/metrics``.

    Labelled metrics only show their samples once a label set exists, so each
    is touched once with placeholder labels first. The names are read back from
    the text exposition, which spells out every variant a query can use:
    ``_total`` (and ``_created``) for counters, ``_bucket``/``_sum``/``_count``
    for histograms, the bare name for gauges.
    """
    metrics = Metrics()
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # prometheus_client keeps the declared label names here; there is no
        # public accessor.
        label_names = getattr(metric, "_labelnames", ())
        if label_names:
            metric.labels(*(["x"] * len(label_names)))
    # The etl_* families, read from the database at each scrape: here from empty totals.
    text = exposition(metrics, EtlTotals(), ["x"], ["added"]).decode("utf-8")
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset", "inf", "nan", "start", "end"}
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        if name.lower() in _PROMQL_KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue  # a keyword, or a function or aggregation being called
        names.add(name)
    return names


def grafana_query_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana templating query (``label_values`` and friends)."""
    two_args = re.fullmatch(r"\s*label_values\((?P<selector>.+),\s*\w+\s*\)\s*", query)
    if two_args:
        return promql_metric_names(two_args.group("selector"))
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
        return set()  # a label name alone
    result = re.fullmatch(r"\s*query_result\((?P<expr>.+)\)\s*", query)
    return promql_metric_names(result.group("expr") if result else query)


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows included)."""
    return [
        node["expr"]
        for node in _walk(dashboard.get("panels", []))
        if isinstance(node, dict) and isinstance(node.get("expr"), str)
    ]


def dashboard_template_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str):
            queries.append(query)
    return queries


def prometheus_rule_expressions(config_path: Path) -> list[str]:
    """The ``expr`` of every rule in the files the Prometheus config loads."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    expressions: list[str] = []
    for pattern in config.get("rule_files") or []:
        files = sorted(config_path.parent.glob(pattern))
        assert files, f"rule_files entry {pattern!r} matches no file next to {config_path.name}"
        for rule_file in files:
            rules = yaml.safe_load(rule_file.read_text(encoding="utf-8"))
            for group in rules.get("groups", []):
                expressions.extend(str(rule["expr"]) for rule in group.get("rules", []))
    return expressions


def credential_problems(compose_text: str) -> list[str]:
    """Ways a compose file could start with a credential nobody chose."""
    problems = []
    for match in _INTERPOLATION.finditer(compose_text):
        name, rest = match.group("name"), match.group("rest")
        if _SENSITIVE.search(name) and not _REQUIRED.match(rest):
            problems.append(f"${{{name}{rest}}} must use the required form ${{{name}:?message}}")
    document = yaml.safe_load(compose_text)
    for service_name, service in (document.get("services") or {}).items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            text = "" if value is None else str(value)
            if _SENSITIVE.search(key) and not re.fullmatch(r"\$\{[A-Za-z0-9_]+:\?[^}]+\}", text):
                problems.append(f"{service_name}: {key} is not taken from a required variable")
    for node in _walk(document):
        if not isinstance(node, str):
            continue
        for url in _URL_USERINFO.finditer(node):
            literal = _INTERPOLATION.sub("", url.group("userinfo")).replace(":", "")
            if literal:
                problems.append(f"credentials written into a URL: {url.group(0)}")
    return problems


def containerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions as ``(KEYWORD, arguments)``, grouped by stage, ARGs before FROM first."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def test_compose_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(
            f"Compose spec schema not found at {COMPOSE_SCHEMA} (shared/ is not beside the repo)"
        )
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is part of the dev extra")
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    # The spec names draft-07 by a URL jsonschema does not list; say it outright.
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft7Validator
    )
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors] == []


def test_compose_wires_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"db", "app", "prometheus", "grafana"}
    assert services["db"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in services["db"]["volumes"])
    app = services["app"]
    assert app["build"]["dockerfile"] == "Containerfile"
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert app["env_file"] in (".env", [".env"])
    assert "@db:5432/" in app["environment"]["DATABASE_URL"]
    assert "8000:8000" in [str(p) for p in app["ports"]]
    prometheus_mounts = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus" in prometheus_mounts
    grafana_mounts = " ".join(services["grafana"]["volumes"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in grafana_mounts
    assert "./deploy/grafana/dashboards" in grafana_mounts


def test_compose_has_no_default_credentials() -> None:
    assert credential_problems(COMPOSE_FILE.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "services:\n  db:\n    environment:\n      POSTGRES_PASSWORD: postgres\n",
        "services:\n  db:\n    environment:\n      DB_PASSWORD: ${DB_PASSWORD:-postgres}\n",
        "services:\n  db:\n    environment:\n      - POSTGRES_USER=admin\n",
        "services:\n  app:\n    environment:\n      URL: postgresql://app:s3cret@db:5432/app\n",
        "services:\n  app:\n    environment:\n      URL: postgresql://${DB_USER}:${DB_PASSWORD}@db/x\n",
    ],
)
def test_credential_check_catches_defaults(snippet: str) -> None:
    assert credential_problems(snippet) != []


def test_every_required_compose_variable_is_in_the_env_example() -> None:
    # `cp .env.example .env` must give a stack that starts.
    required = {
        m.group("name")
        for m in _INTERPOLATION.finditer(COMPOSE_FILE.read_text(encoding="utf-8"))
        if m.group("rest").startswith(":?")
    }
    assert required >= {
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "POSTGRES_DB",
        "GRAFANA_ADMIN_PASSWORD",
    }
    set_in_example = set(_env_example_entries(commented=False))
    assert required - set_in_example == set()


# ---------------------------------------------------------------- .env.example


def _env_example_entries(*, commented: bool) -> dict[str, str]:
    """``KEY=value`` lines of .env.example; with ``commented``, ``# KEY=value`` ones too."""
    pattern = r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^([A-Z][A-Z0-9_]*)=(.*)$"
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(pattern, text, re.MULTILINE)}


def test_env_example_lists_every_setting_with_placeholders() -> None:
    entries = _env_example_entries(commented=True)
    assert [name for name in SETTINGS if name not in entries] == []
    assert entries["ETL_BATCH_SIZE"] == "10000"
    for name, value in entries.items():
        if re.search(r"PASSWORD|SECRET|_KEY$", name):
            assert value.startswith("change-me"), f"{name} in .env.example looks like a real secret"
        for url in _URL_USERINFO.finditer(value):
            password = url.group("userinfo").partition(":")[2]
            assert password in ("", "change-me"), (
                f"{name}: URL carries a password other than change-me"
            )


def test_env_example_leaves_the_failure_injection_off() -> None:
    # compose defaults to APP_ENV=production, which refuses ETL_FAIL_AFTER_RECORDS.
    assert "ETL_FAIL_AFTER_RECORDS" not in _env_example_entries(commented=False)


# ---------------------------------------------------------------- metrics


def test_exported_metric_names_spell_out_every_variant() -> None:
    names = exported_metric_names()
    assert {"etl_runs_total", "etl_failures_total", "etl_records_total"} <= names
    assert {"etl_duration_seconds_bucket", "etl_duration_seconds_sum"} <= names
    assert {"etl_duration_seconds_count", "etl_last_success_timestamp_seconds"} <= names
    assert {"http_requests_total", "http_request_duration_seconds_bucket"} <= names
    # Families are not series: the bare counter or histogram name selects nothing.
    assert names.isdisjoint({"etl_runs", "etl_duration_seconds", "http_requests"})


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (status) (rate(etl_runs_total{status="failed"}[5m]))', {"etl_runs_total"}),
        (
            "histogram_quantile(0.9, sum by (le, route) (rate(x_bucket[$__rate_interval])))",
            {"x_bucket"},
        ),
        (
            'time() - etl_last_success_timestamp_seconds{source=~"$source"} > 1e3',
            {"etl_last_success_timestamp_seconds"},
        ),
        ("rate(a_sum[1h]) / ignoring(x) rate(a_count[1h]) offset 5m", {"a_sum", "a_count"}),
        ("sum(up == bool 0) and on (job) b", {"up", "b"}),
    ],
)
def test_promql_metric_names(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected


def test_template_query_metric_names() -> None:
    assert grafana_query_metric_names("label_values(etl_records_total, source)") == {
        "etl_records_total"
    }
    assert grafana_query_metric_names("label_values(source)") == set()


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used: set[str] = set()
    for expr in dashboard_expressions(dashboard):
        used |= promql_metric_names(expr)
    for query in dashboard_template_queries(dashboard):
        used |= grafana_query_metric_names(query)
    assert used - exported_metric_names() == set()
    # The panels the operations guide describes.
    assert used >= {
        "etl_runs_total",
        "etl_records_total",
        "etl_duration_seconds_bucket",
        "etl_last_success_timestamp_seconds",
        "etl_schema_drift_total",
        "etl_failures_total",
        "http_requests_total",
        "http_request_duration_seconds_bucket",
    }


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    provisioning = REPO_ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
    uids = {
        source["uid"]
        for path in provisioning.glob("*.yml")
        for source in yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]
    }
    referenced = {
        node["datasource"]["uid"]
        for node in _walk(dashboard)
        if isinstance(node, dict)
        and isinstance(node.get("datasource"), dict)
        and node["datasource"].get("type") == "prometheus"
    }
    assert referenced
    assert referenced <= uids
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrapes_the_app_and_its_rules_use_exported_metrics() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    interval = config.get("global", {}).get("scrape_interval")
    jobs = config["scrape_configs"]
    targets = [t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "app:8000" in targets
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs)
    assert all(job.get("scrape_interval", interval) == "15s" for job in jobs)
    used: set[str] = set()
    for expr in prometheus_rule_expressions(PROMETHEUS_CONFIG):
        used |= promql_metric_names(expr)
    assert used - exported_metric_names() - PROMETHEUS_SYNTHETIC == set()


def test_every_alert_rule_has_a_case_that_fires_and_one_that_does_not() -> None:
    rules = {
        rule["alert"]
        for group in yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    }
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [ALERT_RULES.name]
    cases = [case for group in tests["tests"] for case in group.get("alert_rule_test", [])]
    assert {c["alertname"] for c in cases if c.get("exp_alerts")} == rules
    assert {c["alertname"] for c in cases if not c.get("exp_alerts")} == rules


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for args in (["check", "rules", str(ALERT_RULES)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- Containerfile


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    parsed = containerfile_stages(CONTAINERFILE.read_text(encoding="utf-8"))
    assert len(parsed) >= 3, "expected global ARGs, a builder stage and a final stage"
    return parsed


def _args(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def test_final_stage_is_slim_python_by_default(stages: list[list[tuple[str, str]]]) -> None:
    defaults = dict(a.partition("=")[::2] for a in _args(stages[0], "ARG"))
    image = _args(stages[-1], "FROM")[0].split()[0]
    assert image == "${BASE_IMAGE}", "the base must be a build argument (a local base)"
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], image)
    assert image == "docker.io/library/python:3.11-slim"


def test_final_stage_runs_as_non_root(stages: list[list[tuple[str, str]]]) -> None:
    users = _args(stages[-1], "USER")
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def _seconds(option: str, text: str) -> float:
    found = re.search(rf"--{option}=(\d+)s", text)
    assert found, f"no --{option}"
    return float(found.group(1))


def test_final_stage_has_a_health_check_that_starts_early(
    stages: list[list[tuple[str, str]]],
) -> None:
    checks = _args(stages[-1], "HEALTHCHECK")
    assert len(checks) == 1
    assert json.loads(checks[0].split("CMD", 1)[1]) == ["python", "-m", "app.healthcheck"]
    assert _seconds("interval", checks[0]) <= 5
    # The module asks /health with the standard library, at the address served.
    module = (REPO_ROOT / "app" / "healthcheck.py").read_text(encoding="utf-8")
    assert "/health" in module
    assert "urllib" in module
    assert "SERVE_ADDRESS_FILE" in module
    env = " ".join(_args(stages[-1], "ENV"))
    assert "SERVE_ADDRESS_FILE=" in env


def test_compose_health_check_is_the_images(compose: dict[str, Any]) -> None:
    # Podman builds OCI images by default, which drop HEALTHCHECK: compose says it again.
    check = compose["services"]["app"]["healthcheck"]
    assert check["test"] == ["CMD", "python", "-m", "app.healthcheck"]
    assert _seconds_of(check["interval"]) <= 5
    assert "start_period" in check


def _seconds_of(duration: str) -> float:
    found = re.fullmatch(r"(\d+)s", duration)
    assert found, duration
    return float(found.group(1))


def test_final_stage_has_no_build_tools(stages: list[list[tuple[str, str]]]) -> None:
    final = stages[-1]
    # The programs the final stage's RUN lines call (removing pip is no use of it).
    called = [
        command.split()[0]
        for run in _args(final, "RUN")
        for command in re.split(r"&&|\|\||;|\|", run)
        if command.strip()
    ]
    tools = r"(apt-get|apt|apk|pip3?|gcc|g\+\+|cc|make|python3? -m pip)"
    assert [c for c in called if re.fullmatch(tools, c)] == []
    removed = " ".join(_args(final, "RUN"))
    for package in ("site-packages/pip", "site-packages/setuptools", "ensurepip"):
        assert package in removed, f"the final stage keeps {package}"
    copies = _args(final, "COPY") + _args(final, "ADD")
    assert all(c.startswith("--from=") for c in copies), "the final stage copies from the context"
    assert any("/opt/venv" in c for c in copies)


def test_container_entrypoint_and_port(stages: list[list[tuple[str, str]]]) -> None:
    final = stages[-1]
    # tini is PID 1: it forwards signals and reaps the orphans of killed run children.
    assert json.loads(_args(final, "ENTRYPOINT")[-1]) == ["/usr/bin/tini", "--", "kasparro"]
    assert "--from=builder /usr/bin/tini /usr/bin/tini" in _args(final, "COPY")
    assert json.loads(_args(final, "CMD")[-1])[:1] == ["serve"]
    assert _args(final, "EXPOSE") == ["8000"]
    assert _args(final, "WORKDIR")[-1] == "/app"


def test_builder_copies_the_runtime_files(stages: list[list[tuple[str, str]]]) -> None:
    copied = " ".join(_args(stages[1], "COPY"))
    for needed in ("alembic/", "alembic.ini", "sources.toml", "data/", "pyproject.toml"):
        assert needed in copied


def test_dependencies_install_in_a_layer_before_the_code(
    stages: list[list[tuple[str, str]]],
) -> None:
    builder = stages[1]
    steps = [(kw, args) for kw, args in builder if kw in ("COPY", "RUN")]
    code = next(i for i, (kw, args) in enumerate(steps) if kw == "COPY" and "app/" in args)
    before = steps[:code]
    assert ("COPY", "pyproject.toml ./") in before
    assert any(kw == "RUN" and "dependencies" in args for kw, args in before)
    project = next(args for kw, args in steps[code:] if kw == "RUN" and "pip install" in args)
    assert "--no-deps" in project
    assert "--no-build-isolation" in project


def test_containerfile_passes_hadolint() -> None:
    # Also next to the interpreter: `make test` runs .venv/bin/pytest without activating.
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run(
        [hadolint, str(CONTAINERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- sample data


def test_sample_data_regenerates_byte_for_byte(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_samples", DATA_DIR / "make_samples.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name in ("sample.csv", "third_source.json"):
        generated = (tmp_path / name).read_bytes()
        assert generated == (DATA_DIR / name).read_bytes(), f"data/{name} is out of date"
        assert len(generated) < 400_000
