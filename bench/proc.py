"""Child processes: a clean environment, and wall, CPU and peak RSS of one child.

CPU figures come from ``os.wait4`` on the child itself, so they belong to that
process and the processes it started and reaped (a loader's parse process), and
to no other child of the bench (``RUSAGE_CHILDREN`` would fold every earlier
child in). Peak RSS is the child's ``VmHWM`` plus that of each of its descendants,
sampled while it runs: the kernel's ``ru_maxrss`` of a
child also counts the parent's memory at the time of the spawn (the high-water
mark of the image replaced by ``exec``), which would credit the bench's own
memory to every process it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Settings of the service that the bench decides for itself; never inherited.
_SERVICE_VARIABLES = (
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
    "ETL_FAIL_AFTER_RECORDS",
    "HOST",
    "PORT",
    "LOG_FORMAT",
    "LOG_LEVEL",
)


def service_env(
    workdir: Path, settings: Mapping[str, str], root: Path = REPO_ROOT
) -> dict[str, str]:
    """The environment of a ``kasparro`` child: the caller's, minus the service's
    own settings, plus ``settings``. ``ETL_BATCH_SIZE`` passes through, so a
    batch size can be tried with ``ETL_BATCH_SIZE=… make bench``. ``root`` is
    the checkout whose code the child runs (another one for a variant)."""
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
    env["DATA_DIR"] = str(workdir / "service-data")
    env["LOG_FORMAT"] = "json"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(settings)
    return env


PACKAGES = ("app", "pipelines", "persistence", "observability", "config")


def compile_code(root: Path, python: str = sys.executable) -> None:
    """Byte-compile the service's packages in the checkout ``root``, as the image
    does: a child then loads bytecode, also where ``PYTHONDONTWRITEBYTECODE`` is
    set, and no load is timed with the compiling of the sources it imports."""
    folders = [str(root / name) for name in PACKAGES if (root / name).is_dir()]
    subprocess.run(  # noqa: S603
        [python, "-m", "compileall", "-q", *folders], check=True, stdout=subprocess.DEVNULL
    )


def kasparro(*args: str, python: str = sys.executable) -> list[str]:
    """The command line of ``kasparro ARGS`` with ``python`` (this interpreter)."""
    return [python, "-m", "app.cli", *args]


@dataclass(frozen=True, slots=True)
class Measured:
    """One finished child process."""

    returncode: int
    wall_seconds: float
    cpu_seconds: float
    user_seconds: float
    system_seconds: float
    peak_rss_mb: float
    stdout: str
    stderr_tail: str


def run_measured(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    timeout: float = 3600.0,
) -> Measured:
    """Run ``argv`` to completion; stdout is kept, stderr goes to ``log_path``."""
    out_path = log_path.with_suffix(".stdout")
    with out_path.open("wb") as out, log_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdout=out, stderr=err)  # noqa: S603
        status, usage, peak_kb = _wait4(proc, timeout)
        wall = time.perf_counter() - started
    # Tell Popen the child is reaped, so it never waits for it again.
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = log_path.read_text(encoding="utf-8", errors="replace")
    return Measured(
        returncode=proc.returncode,
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        # ru_maxrss (kilobytes) only when the child ended before a sample was taken.
        peak_rss_mb=(peak_kb or usage.ru_maxrss) / 1024.0,
        stdout=out_path.read_text(encoding="utf-8", errors="replace"),
        stderr_tail=stderr[-2000:],
    )


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (state is index 0, ppid index 1)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid``, of its live children and of the children it reaped."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    # utime, stime, cutime, cstime are fields 14-17 of stat: 11-14 here.
    ticks = sum(int(v) for v in fields[11:15])
    for child in children(pid):
        child_fields = stat_fields(child)
        if child_fields is not None:
            ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_times() -> tuple[float, float] | None:
    """(busy, idle) seconds of all CPUs together since boot, from ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / ticks, idle / ticks


def peak_rss_kb(pid: int) -> int | None:
    """``VmHWM`` of a live process: its resident set's high-water mark, in kilobytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/task/{current}/children", encoding="ascii") as children:
                kids = [int(k) for k in children.read().split()]
        except (OSError, ValueError):
            continue
        found.extend(kids)
        pending.extend(kids)
    return found


def _wait4(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, os.struct_rusage, int]:
    """Reap the child; its status, resource usage and its peak memory.

    The peak is the child's ``VmHWM`` plus that of each process it started (a
    loader's parse process): an upper bound on what they held together, since
    their peaks need not coincide. The child is sampled every 20 ms, its
    descendants every 100 ms (finding them costs more).
    """
    deadline = time.monotonic() + timeout
    peak = 0
    descendants: dict[int, int] = {}
    rounds = 0
    while True:
        # Sampled before the reap attempt: once reaped, /proc no longer shows it.
        peak = max(peak, peak_rss_kb(proc.pid) or 0)
        if rounds % 5 == 0:
            for pid in _descendants(proc.pid):
                descendants[pid] = max(descendants.get(pid, 0), _status_kb(pid, "VmHWM:"))
        rounds += 1
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            return status, usage, peak + sum(descendants.values())
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return status, usage, peak + sum(descendants.values())
        time.sleep(0.02)


class Background:
    """A long-running child (the API server, or an ingestion under way).

    Its output goes to ``log_path``; :meth:`stop` ends exactly this process.
    """

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(  # noqa: S603
            argv, env=dict(env), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.ended: float | None = None
        self.usage: os.struct_rusage | None = None

    @property
    def running(self) -> bool:
        self._poll()
        return self.ended is None

    def _poll(self) -> None:
        if self.ended is not None:
            return
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == self.proc.pid:
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.usage = usage
            self.ended = time.perf_counter()

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to end; its exit code."""
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.proc.returncode if self.ended is not None else None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.running:
            self.proc.terminate()
            if self.wait(grace) is None:
                self.proc.kill()
                self.wait(5.0)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
