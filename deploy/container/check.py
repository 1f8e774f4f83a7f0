#!/usr/bin/env python3
"""Build the image and check how it behaves as a container (not part of ``make test``).

    sudo python3 deploy/container/check.py --base localhost/kasparro-base:bookworm \\
        --database postgresql://postgres@127.0.0.1:5432/postgres

Checks, each reported as PASS or FAIL with its numbers:

1. the image builds (``--format docker``, so HEALTHCHECK is kept), and a
   change to the code alone rebuilds without reinstalling the dependencies;
2. the image holds no pip, setuptools or wheel;
3. the service starts and turns healthy (the image's own health check, with
   ``--port`` different from ``PORT``), and a SIGTERM then stops it with exit 0;
4. a SIGTERM during start-up (the migrations waiting on a database that does
   not answer) stops it promptly with exit 0;
5. a run child killed with SIGKILL, and an orphan that PID 1 inherits, leave
   no zombie behind, and the service stays healthy.

The containers run with ``podman run`` (host network). Where Podman cannot
start containers (its OCI runtime refuses the host's cgroup set-up, for one),
``--runner chroot`` runs the same image the way an engine would, without an OCI
runtime: the image's root file system, mounted read-only by ``podman image
mount``, in new PID and mount namespaces, tini as PID 1, the image's user,
environment and working directory, tmpfs on /tmp and /dev/shm. ``--runner
auto`` (the default) tries Podman first.

Needs root, podman, util-linux (unshare) and a PostgreSQL the containers can
reach on the host's network (a database is created per check and dropped).
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/kasparro:check"
KEY = "container-check-key-0123456789"

results: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def run(args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), text=True, capture_output=True, check=False, **kwargs)


def wait_until(condition: Callable[[], object], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ database


def psql_url(base: str, database: str) -> str:
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@contextlib.contextmanager
def fresh_database(base: str) -> Iterator[str]:
    name = f"kasparro_check_{uuid.uuid4().hex[:8]}"
    created = run(["psql", base, "-q", "-c", f'CREATE DATABASE "{name}"'])
    if created.returncode != 0:
        raise SystemExit(f"cannot create a database on {base}: {created.stderr.strip()}")
    try:
        yield psql_url(base, name)
    finally:
        run(["psql", base, "-q", "-c", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'])


# ------------------------------------------------------------------ containers


class Container:
    """One container of the image: started, signalled, inspected, stopped."""

    def __init__(
        self,
        env: dict[str, str],
        args: Sequence[str],
        mounts: dict[str, str],
        *,
        init: bool = True,
    ) -> None:
        self.env = env
        self.args = list(args)
        self.mounts = mounts
        self.init = init
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in remove()
        self.started = time.monotonic()

    def lines(self) -> list[str]:
        raise NotImplementedError

    def exec(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def signal(self, signum: int) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> int | None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def healthy(self) -> bool:
        return self.exec(["python", "-m", "app.healthcheck"]).returncode == 0

    def processes(self) -> list[tuple[int, str, str]]:
        """(pid, state, command line) of every process in the container."""
        script = (
            "import os\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            "        stat = open(f'/proc/{pid}/stat').read()\n"
            "        cmd = open(f'/proc/{pid}/cmdline').read()\n"
            "        cmd = cmd.replace(chr(0), ' ').replace(chr(10), ' ')\n"
            "    except OSError:\n"
            "        continue\n"
            "    print(pid, stat[stat.rindex(')') + 2], cmd.strip() or stat.split()[1])\n"
        )
        listed = self.exec(["python", "-c", script])
        found = []
        for line in listed.stdout.splitlines():
            pid, state, *cmd = line.split(" ")
            found.append((int(pid), state, " ".join(cmd)))
        return found

    def event(self, name: str) -> bool:
        return any(f'"event":"{name}"' in line for line in self.lines())


class PodmanContainer(Container):
    def __init__(
        self,
        env: dict[str, str],
        args: Sequence[str],
        mounts: dict[str, str],
        *,
        init: bool = True,
    ) -> None:
        super().__init__(env, args, mounts, init=init)
        self.name = f"kasparro-check-{uuid.uuid4().hex[:8]}"
        command = ["podman", "run", "-d", "--name", self.name, "--network", "host"]
        if not init:
            command += ["--entrypoint", "kasparro"]
        for key, value in env.items():
            command += ["-e", f"{key}={value}"]
        for host, inside in mounts.items():
            command += ["-v", f"{host}:{inside}:ro"]
        started = run([*command, IMAGE, *self.args])
        if started.returncode != 0:
            raise RuntimeError(started.stderr.strip())

    def lines(self) -> list[str]:
        return run(["podman", "logs", self.name]).stdout.splitlines()

    def exec(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return run(["podman", "exec", self.name, *command])

    def healthy(self) -> bool:
        return run(["podman", "healthcheck", "run", self.name]).returncode == 0

    def signal(self, signum: int) -> None:
        run(["podman", "kill", "--signal", str(signum), self.name])

    def wait(self, timeout: float) -> int | None:
        try:
            waited = run(["podman", "wait", self.name], timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return int(waited.stdout.strip()) if waited.stdout.strip() else None

    def remove(self) -> None:
        run(["podman", "rm", "--force", "--time", "0", self.name])
        self.log.close()


class ChrootContainer(Container):
    """The image run without an OCI runtime (see the module docstring)."""

    root: Path
    config: dict[str, Any]

    def __init__(
        self,
        env: dict[str, str],
        args: Sequence[str],
        mounts: dict[str, str],
        *,
        init: bool = True,
    ) -> None:
        super().__init__(env, args, mounts, init=init)
        image_env = self.image_env()
        entrypoint = list(self.config.get("Entrypoint") or []) if init else ["kasparro"]
        workdir = str(self.config.get("WorkingDir") or "/")
        user = str(self.config.get("User") or "0:0")
        binds = "".join(
            f'mount --bind "{host}" "{self.root}{inside}" && mount -o remount,ro,bind '
            f'"{self.root}{inside}" && '
            for host, inside in mounts.items()
        )
        inner = (
            f'mount --rbind /dev "{self.root}/dev" && '
            f'mount -t tmpfs -o mode=1777 tmpfs "{self.root}/dev/shm" && '
            f'mount -t tmpfs -o mode=1777 tmpfs "{self.root}/tmp" && '
            f"{binds}"
            f'exec chroot --userspec={user} "{self.root}" /usr/bin/env -i -C {workdir} '
            + " ".join(f"'{k}={v}'" for k, v in image_env.items())
            + " "
            + " ".join(f"'{a}'" for a in [*entrypoint, *self.args])
        )
        self.process = subprocess.Popen(
            [
                "unshare",
                "--fork",
                "--pid",
                "--mount",
                f"--mount-proc={self.root}/proc",
                "--kill-child",
                "sh",
                "-c",
                inner,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if not wait_until(lambda: self.init_pid() is not None, 10, 0.02):
            raise RuntimeError("the container's PID 1 never started")

    @classmethod
    def prepare(cls) -> None:
        mounted = run(["podman", "image", "mount", IMAGE])
        if mounted.returncode != 0:
            raise SystemExit(f"podman image mount failed: {mounted.stderr.strip()}")
        cls.root = Path(mounted.stdout.strip())
        inspected = json.loads(run(["podman", "image", "inspect", IMAGE]).stdout)[0]
        cls.config = inspected["Config"]

    @classmethod
    def release(cls) -> None:
        run(["podman", "image", "unmount", IMAGE])

    def image_env(self) -> dict[str, str]:
        values = dict(str(e).split("=", 1) for e in self.config.get("Env") or [])
        values.update(self.env)
        return values

    def init_pid(self) -> int | None:
        """The host pid of the container's PID 1 (the child of unshare)."""
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def lines(self) -> list[str]:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().splitlines()

    def exec(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        pid = self.init_pid()
        if pid is None:
            return subprocess.CompletedProcess(list(command), 1, "", "the container has ended")
        user = str(self.config.get("User") or "0:0")
        image_env = self.image_env()
        # Into the container's PID and mount namespaces, then its root and user.
        return run(
            [
                "nsenter",
                f"--target={pid}",
                "--pid",
                "--mount",
                "chroot",
                f"--userspec={user}",
                str(self.root),
                "/usr/bin/env",
                "-i",
                "-C",
                str(self.config.get("WorkingDir") or "/"),
                *(f"{k}={v}" for k, v in image_env.items()),
                *command,
            ]
        )

    def signal(self, signum: int) -> None:
        pid = self.init_pid()
        if pid is not None:
            os.kill(pid, signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def remove(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


# ------------------------------------------------------------------ checks


def check_build(base: str | None, isolation: str | None) -> None:
    def build(tag: str, context: Path) -> tuple[subprocess.CompletedProcess[str], float]:
        command = ["podman", "build", "--format", "docker", "-t", tag, "-f", "Containerfile"]
        if base:
            command += ["--build-arg", f"BASE_IMAGE={base}"]
        if isolation:
            command += ["--isolation", isolation]
        started = time.monotonic()
        built = run([*command, "."], cwd=context)
        return built, time.monotonic() - started

    built, took = build(IMAGE, REPO_ROOT)
    if built.returncode != 0:
        report("build", False, (built.stderr.strip().splitlines() or ["?"])[-1])
        raise SystemExit(1)
    size = run(["podman", "image", "inspect", IMAGE, "--format", "{{.Size}}"]).stdout.strip()
    report("build", True, f"{took:.0f} s, {int(size) / 1e6:.0f} MB")

    # The same context with one changed line of code: only the code layers rebuild.
    with tempfile.TemporaryDirectory() as folder:
        context = Path(folder)
        files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT).stdout
        for name in files.splitlines():
            source = REPO_ROOT / name
            if source.is_file():
                (context / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, context / name)
        with (context / "app" / "__init__.py").open("a") as handle:
            handle.write("# a changed line\n")
        rebuilt, took = build(IMAGE + "-edit", context)
    run(["podman", "rmi", IMAGE + "-edit"])
    if rebuilt.returncode != 0:
        report("dependency layer cached", False, (rebuilt.stderr.strip().splitlines() or ["?"])[-1])
        return
    steps = rebuilt.stdout.split("STEP ")
    deps = next((s for s in steps if "dependencies" in s and "RUN" in s), "")
    cached = "Using cache" in deps
    report(
        "dependency layer cached",
        cached,
        f"rebuilt after a code change in {took:.0f} s; dependency step "
        f"{'from cache' if cached else 'ran again'}",
    )


def check_no_installers(make: type[Container]) -> None:
    names = ("pip", "setuptools", "wheel", "ensurepip")
    if make is ChrootContainer:
        root = ChrootContainer.root
        patterns = (
            "opt/venv/lib/python3*/site-packages/*",
            "usr/local/lib/python3*/site-packages/*",
            "usr/local/lib/python3*/*",
            "usr/lib/python3*/*",
            "usr/share/python-wheels",
        )
        found = sorted(
            str(path.relative_to(root))
            for pattern in patterns
            for path in root.glob(pattern)
            if path.name.split("-")[0] in names or path.name == "python-wheels"
        )
    else:
        script = f"import importlib.util as u; print(*[m for m in {names!r} if u.find_spec(m)])"
        listed = run(["podman", "run", "--rm", "--entrypoint", "python", IMAGE, "-c", script])
        found = listed.stdout.split() if listed.returncode == 0 else ["(podman run failed)"]
    report("no pip, setuptools, wheel", not found, ", ".join(found) or "none in the image")


def check_start_health_stop(make: type[Container], database: str) -> None:
    port = free_port()
    with fresh_database(database) as url:
        env = {"DATABASE_URL": url, "API_KEY": KEY, "PORT": "1", "ETL_ON_STARTUP": "false"}
        container = make(env, ["serve", "--host", "127.0.0.1", "--port", str(port)], {})
        try:
            healthy = wait_until(container.healthy, 60, 0.2)
            took = time.monotonic() - container.started
            report(
                "starts and turns healthy",
                healthy,
                f"healthy {took:.1f} s after start (served on --port {port}, PORT=1)"
                if healthy
                else "never healthy: " + " | ".join(container.lines()[-3:]),
            )
            init = [p for p in container.processes() if p[0] == 1]
            report(
                "tini is PID 1",
                bool(init) and "tini" in init[0][2],
                f"PID 1: {init[0][2] if init else '?'}",
            )
            sent = time.monotonic()
            container.signal(signal.SIGTERM)
            code = container.wait(30)
            took = time.monotonic() - sent
            report(
                "SIGTERM while serving", code == 0 and took < 10, f"exit {code} after {took:.1f} s"
            )
        finally:
            container.remove()


def check_sigterm_during_startup(make: type[Container]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        url = f"postgresql://k:pw@127.0.0.1:{port}/k"  # pragma: allowlist secret
        env = {"DATABASE_URL": url, "API_KEY": KEY}
        container = make(env, ["serve", "--host", "127.0.0.1", "--port", str(free_port())], {})
        try:
            silent.settimeout(30)
            connection, _ = silent.accept()  # the migrations are connecting
            sent = time.monotonic()
            container.signal(signal.SIGTERM)
            code = container.wait(40)
            took = time.monotonic() - sent
            connection.close()
            report(
                "SIGTERM during start-up",
                code == 0 and took < 5,
                f"exit {code} after {took:.1f} s (migrations waiting on a silent database)",
            )
        finally:
            container.remove()


ORPHAN = "import os, time; os.fork() or time.sleep(2)"
"""Run in the container: the forked child outlives its parent by two seconds."""


def check_killed_child(make: type[Container], database: str, *, expect_reaped: bool) -> None:
    with tempfile.TemporaryDirectory() as folder, fresh_database(database) as url:
        os.chmod(folder, 0o755)
        with (Path(folder) / "big.csv").open("w") as handle:
            handle.write("name,value,updated_at\n")
            for i in range(600_000):
                handle.write(f"coin {i},{i}.5,2026-01-01T00:00:00Z\n")
        (Path(folder) / "sources.toml").write_text(
            '[[sources]]\nname = "csv"\nkind = "csv"\nlocation = "big.csv"\n'
            'mapping = { name = "name", value = "value", observed_at = "updated_at" }\n'
        )
        os.chmod(Path(folder) / "big.csv", 0o644)
        os.chmod(Path(folder) / "sources.toml", 0o644)
        env = {"DATABASE_URL": url, "API_KEY": KEY, "SOURCES_FILE": "/mnt/sources.toml"}
        args = ["serve", "--host", "127.0.0.1", "--port", str(free_port())]
        container = make(env, args, {folder: "/mnt"}, init=expect_reaped)
        name = "a killed run child leaves no zombie" if expect_reaped else "control: without tini"
        try:

            def child() -> list[tuple[int, str, str]]:
                return [p for p in container.processes() if "app.cli etl run" in p[2]]

            if not wait_until(lambda: bool(child()), 60, 0.05):
                report(name, False, "no run child appeared")
                return
            # Beside the run child, an orphan: a process whose parent exits at
            # once, so that PID 1 inherits it and must reap it when it ends.
            container.exec(["python", "-c", ORPHAN])
            family = {
                pid
                for pid, _, cmd in container.processes()
                if "app.cli etl run" in cmd or ORPHAN in cmd
            }
            (victim, _, _), *_ = child()
            container.exec(
                ["python", "-c", f"import os, signal; os.kill({victim}, signal.SIGKILL)"]
            )

            def states() -> dict[int, str]:
                return {pid: state for pid, state, _ in container.processes() if pid in family}

            # Every orphan ends (its pipes close) and then is reaped, or stays a zombie.
            ended = wait_until(lambda: all(s == "Z" for s in states().values()), 30, 0.2)
            wait_until(lambda: not states(), 5, 0.2)
            left = [pid for pid, state in states().items() if state == "Z"]
            healthy = wait_until(container.healthy, 30, 0.2)
            detail = (
                f"{len(family)} processes of the run; {len(left)} zombies left after they ended"
            )
            if expect_reaped:
                report(name, ended and not left and healthy, f"{detail}; healthy: {healthy}")
            else:
                report(name, ended and bool(left), f"{detail} (what tini prevents)")
        finally:
            container.signal(signal.SIGTERM)
            container.wait(30)
            container.remove()


def podman_runs() -> bool:
    probe = run(["podman", "run", "--rm", "--entrypoint", "/bin/true", IMAGE])
    if probe.returncode != 0:
        print(f"podman run does not work here: {probe.stderr.strip().splitlines()[-1]}")
    return probe.returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", help="BASE_IMAGE build argument (a local base)")
    parser.add_argument(
        "--isolation", help="podman build --isolation (chroot where no OCI runtime works)"
    )
    parser.add_argument("--runner", choices=("auto", "podman", "chroot"), default="auto")
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--skip-build", action="store_true", help="check the image built before")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run the killed-child check without tini, to see the zombies it prevents",
    )
    args = parser.parse_args(argv)

    if not args.skip_build:
        check_build(args.base, args.isolation)
    runner = args.runner
    if runner == "auto":
        runner = "podman" if podman_runs() else "chroot"
    print(f"runner: {runner}", flush=True)
    make: type[Container] = PodmanContainer if runner == "podman" else ChrootContainer
    if make is ChrootContainer:
        ChrootContainer.prepare()
    try:
        check_no_installers(make)
        check_start_health_stop(make, args.database)
        check_sigterm_during_startup(make)
        check_killed_child(make, args.database, expect_reaped=True)
        if args.control:
            check_killed_child(make, args.database, expect_reaped=False)
    finally:
        if make is ChrootContainer:
            ChrootContainer.release()
    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
