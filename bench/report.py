"""Result rows, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Goal:
    """An acceptance bound on a row's ratio (or on its value)."""

    op: Literal[">=", "<="]
    limit: float
    on: Literal["ratio", "value"] = "ratio"

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        subject = ratio if self.on == "ratio" else value
        if subject is None or math.isnan(subject):
            return None
        return subject >= self.limit if self.op == ">=" else subject <= self.limit

    def text(self, unit: str) -> str:
        if self.on == "ratio":
            return f"{self.op} {self.limit:g}x"
        return f"{self.op} {self.limit:g} {unit}"


@dataclass(slots=True)
class Row:
    """One figure beside its baseline."""

    scenario: str
    figure: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    goal: Goal | None = None
    note: str = ""
    ratio: float | None = field(init=False, default=None)
    passed: bool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.value is not None and self.baseline_value:
            self.ratio = self.value / self.baseline_value
        if self.goal is not None:
            self.passed = self.goal.met(self.value, self.ratio)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["goal"] = self.goal.text(self.unit) if self.goal else None
        return data


@dataclass(slots=True)
class Results:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "meta": self.meta,
            "rows": [r.as_dict() for r in self.rows],
            "details": self.details,
            "errors": self.errors,
        }
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit in ("rec/s", "req/s"):
        return f"{value:,.0f} {unit}"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if unit == "ms":
        return f"{value:,.2f} ms"
    if unit == "s":
        return f"{value:,.2f} s"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{value:,.4g} {unit}".strip()


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return ""
    return f"{row.ratio:.3f}x" if row.ratio < 0.1 else f"{row.ratio:.2f}x"


def table(results: Results) -> str:
    """The results as an aligned text table (also valid Markdown)."""
    header = ["scenario", "figure", "value", "baseline", "ratio", "goal", "ok"]
    lines: list[list[str]] = []
    for r in results.rows:
        baseline = ""
        if r.baseline:
            baseline = f"{fmt(r.baseline_value, r.unit)} ({r.baseline})"
        ok = {True: "yes", False: "NO", None: ""}[r.passed]
        goal = r.goal.text(r.unit) if r.goal else ""
        figure = r.figure + (f" [{r.note}]" if r.note else "")
        lines.append([r.scenario, figure, fmt(r.value, r.unit), baseline, _ratio(r), goal, ok])
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(render(line) for line in lines)
    return "\n".join(out)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _memory_total_mb() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the work tree had changes on top of it."""
    git = shutil.which("git")
    if git is None:
        return {}
    head = subprocess.run(  # noqa: S603
        [git, "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    status = subprocess.run(  # noqa: S603
        [git, "-C", str(Path(__file__).resolve().parent.parent), "status", "--porcelain"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "commit": head.stdout.strip() or None,
        "changed_files": len(status.stdout.splitlines()) if status.returncode == 0 else None,
    }


def machine() -> dict[str, Any]:
    """Where the bench ran."""
    wrk_version = None
    wrk = shutil.which("wrk")
    if wrk:
        done = subprocess.run(  # noqa: S603
            [wrk, "--version"], capture_output=True, text=True, check=False
        )
        wrk_version = (
            (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else "wrk"
        )
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_mb": _memory_total_mb(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "wrk": wrk_version,
    }
