"""Live processes for the benchmarks that run the portal as it runs in production: daphne, Celery
workers on the thread pool, and helper servers in processes of their own.

Shared by ``bench_chat.py`` and ``bench_tools.py``. Importing this module sets nothing in the
environment and loads no Django setting; ``start_workers`` imports the Celery app when called.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 90.0


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p95) of ``samples`` (inclusive method, as numpy's default 'linear')."""
    if len(samples) == 1:
        return samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[94]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``process`` and wait for it (SIGKILL after 20 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def start_daphne(port: int, log: Path) -> subprocess.Popen[bytes]:
    """daphne on 127.0.0.1:``port`` serving ``config.asgi``; returns once ``/healthz`` answers 200."""
    daphne = Path(sys.executable).with_name("daphne")
    env = {**os.environ, "PUBLIC_PORT": str(port)}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [str(daphne), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return wait_http(process, port, log)


def start_workers(processes: int, concurrency: int, log: Path) -> list[subprocess.Popen[bytes]]:
    """The Procfile's workers: ``processes`` Celery workers (thread pool on the llm.* queues),
    each with ``concurrency`` threads; returns once every one answers a ping."""
    celery = Path(sys.executable).with_name("celery")
    started: list[subprocess.Popen[bytes]] = []
    for n in range(1, processes + 1):
        with log.with_suffix(f".{n}.log").open("wb") as out:
            started.append(
                subprocess.Popen(  # noqa: S603 (fixed argument list)
                    [
                        str(celery),
                        "-A",
                        "config",
                        "worker",
                        "-Q",
                        "llm.light,llm.standard,llm.heavy,default",
                        "-n",
                        f"bench{n}@%h",
                        "--pool",
                        "threads",
                        "--concurrency",
                        str(concurrency),
                        "--without-heartbeat",
                        "--without-gossip",
                        "--without-mingle",
                        "--loglevel",
                        "WARNING",
                    ],
                    cwd=ROOT,
                    env=dict(os.environ),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    # With --loglevel WARNING the "ready." line is not printed; wait for the workers to answer a ping.
    return wait_workers(started, log.parent)


class ServerProcess:
    """A helper HTTP server in a process of its own: ``argv`` runs it, and it prints its port as
    its first line on stdout (its stderr goes to ``log``). A process of its own, so that its
    threads do not compete for the benchmark's GIL with the clients being timed; both processes
    read the same clock (``time.time()``)."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = log.open("wb")
        self.process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line.isdigit():
            raise RuntimeError(f"the server did not start: {line!r} (see {log})")
        self.port = int(line)

    def get_json(self, path: str) -> Any:
        """GET ``path`` on the server, parsed as JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:  # noqa: S310
            return json.load(response)

    def stop(self) -> None:
        stop(self.process)
        self._log.close()


class CpuMeter:
    """CPU seconds (user + system) spent by groups of processes between ``start()`` and
    ``stop()``: the given processes with their children (``alone``: without), and every process
    named like a group (``postgres``, ``redis-server``). Processes that exit in between lose
    their share."""

    def __init__(self, groups: dict[str, list[int]], names: dict[str, str], alone: dict[str, list[int]]) -> None:
        self.groups = groups
        self.names = names
        self.alone = alone
        self._before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        import psutil

        def cpu(process: Any) -> float:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                return float(times.user + times.system)
            return 0.0

        out: dict[str, float] = {}
        for group, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    process = psutil.Process(pid)
                    total += cpu(process) + sum(cpu(child) for child in process.children(recursive=True))
            out[group] = total
        for group, pids in self.alone.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    total += cpu(psutil.Process(pid))
            out[group] = total
        for group, name in self.names.items():
            out[group] = sum(cpu(p) for p in psutil.process_iter(["name"]) if p.info["name"] == name)
        return out

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since ``start()``."""
        after = self._read()
        return {group: after[group] - self._before.get(group, 0.0) for group in after}


def procfile_process(name: str) -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the argument list of the Procfile's ``name`` process
    (``NAME=value ... command args``), as honcho runs it."""
    import shlex

    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith(f"{name}:"))
    words = shlex.split(line.split(":", 1)[1])
    env: dict[str, str] = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def procfile_names(command: str) -> list[str]:
    """The Procfile's process names whose command runs ``command`` (e.g. ``celery -A config worker``)."""
    out = []
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name and command in rest:
            out.append(name.strip())
    return out


def start_procfile(name: str, log: Path, *, port: int | None = None,
                   extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The Procfile's ``name`` process as honcho would start it (its ``--port``/``-p`` replaced
    by ``port``), from this interpreter's virtualenv."""
    env_add, argv = procfile_process(name)
    if port is not None:
        for flag in ("--port", "-p"):
            if flag in argv:
                argv[argv.index(flag) + 1] = str(port)
    argv[0] = str(Path(sys.executable).with_name(argv[0])) if Path(sys.executable).with_name(argv[0]).exists() \
        else argv[0]
    env = {**os.environ, **env_add, **(extra_env or {})}
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603


def wait_http(process: subprocess.Popen[bytes], port: int, log: Path) -> subprocess.Popen[bytes]:
    """Return ``process`` once ``/healthz`` on ``port`` answers 200 (raise if it exits or never does)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the web process exited:\n{log.read_text(errors='replace')[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response,
        ):  # noqa: S310
            if response.status == 200:
                return process
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"the web process did not start:\n{log.read_text(errors='replace')[-3000:]}")


def wait_workers(started: list[subprocess.Popen[bytes]], log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """Return ``started`` once as many Celery workers answer a ping."""
    from config.celery import app

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in started:
            if process.poll() is not None:
                raise RuntimeError(f"celery exited; see {log_dir}")
        with contextlib.suppress(Exception):
            if len(app.control.ping(timeout=1.0)) >= len(started):
                return started
        time.sleep(0.5)
    for process in started:
        stop(process)
    raise RuntimeError(f"celery did not start; see {log_dir}")
