"""The README's commands work: docs that cannot rot.

Every shell line of the README is checked: ``make`` targets exist, ``kasparro``
command lines parse, and every ``curl`` is sent to a real ``kasparro serve``
and answered 200.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.cli import build_parser
from tests.helpers import REPO_ROOT, csv_entry, csv_rows, write_csv, write_sources
from tests.integration.test_serve import Served, served_on_new_database

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
MAKEFILE = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
KEY = "readme-key-0123456789"


def shell_lines() -> list[str]:
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL):
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def table_commands() -> list[str]:
    """``kasparro ...`` usages from the commands table, placeholders filled in."""
    found = re.findall(r"^\| `(kasparro [^`]+)`", README, flags=re.MULTILINE)
    commands = []
    for usage in found:
        usage = usage.replace("[--source NAME]...", "--source csv")
        usage = re.sub(r"\[([^\]]+)\]", r"\1", usage)
        usage = usage.replace("NAME", "csv").replace(" H ", " 127.0.0.1 ").replace(" P", " 8000")
        commands.append(usage)
    return commands


def test_the_readme_has_the_quick_start_and_commands() -> None:
    lines = shell_lines()
    assert "make run" in " ".join(lines)
    assert "make test" in " ".join(lines)
    assert len(table_commands()) == 6


@pytest.mark.parametrize("line", [line for line in shell_lines() if "make " in line])
def test_every_make_target_in_the_readme_exists(line: str) -> None:
    target = line.split("make ", 1)[1].split()[0]
    assert re.search(rf"^{re.escape(target)}:", MAKEFILE, flags=re.MULTILINE), target


@pytest.mark.parametrize("usage", table_commands())
def test_every_documented_command_parses(usage: str) -> None:
    args = build_parser().parse_args(shlex.split(usage)[1:])
    assert args.command in ("serve", "etl", "db")


@pytest.fixture(scope="module")
def served(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("readme")
    write_csv(folder / "a.csv", csv_rows(50))
    sources = write_sources(folder, csv_entry(folder / "a.csv"))
    with served_on_new_database(server_url, sources, key=KEY, prefix="kasparro_readme") as live:
        yield live


@pytest.mark.parametrize("line", [line for line in shell_lines() if line.startswith("curl")])
def test_every_curl_in_the_readme_answers_200(served: Served, line: str) -> None:
    words = shlex.split(line.replace("$KEY", KEY))
    target = next(w for w in words if w.startswith("localhost:8000"))
    headers = {}
    if "-H" in words:
        key, _, value = words[words.index("-H") + 1].partition(":")
        headers[key.strip()] = value.strip()
    response = httpx.get(served.url + target.removeprefix("localhost:8000"), headers=headers)
    assert response.status_code == 200, (line, response.text)
    assert response.headers["x-request-id"]


def test_the_consumer_loop_of_the_readme_copies_the_table(served: Served) -> None:
    blocks = re.findall(r"## For consumers\n.*?```python\n(.*?)```", README, flags=re.DOTALL)
    assert len(blocks) == 1
    namespace: dict[str, object] = {}
    exec(blocks[0].replace("your-api-key", KEY), namespace)  # noqa: S102 - our own README
    with httpx.Client(base_url=served.url, headers={"x-api-key": KEY}) as client:
        namespace["catch_up"](client)  # type: ignore[operator]
        rows = client.get("/data", params={"limit": 1000}).json()["data"]
    copy = namespace["copy"]
    assert isinstance(copy, dict)
    assert sorted(copy) == sorted(row["name"] for row in rows) != []
    assert all(copy[row["name"]]["value"] == row["value"] for row in rows)
    assert namespace["after"] == max(row["seq"] for row in copy.values())
