"""Live processes shared by the browser and chat tests (a pytest plugin: ``-p tests.live``).

``portal`` is a real daphne server on the test database; ``ingest_worker`` an RQ worker and
``celery_worker`` a Celery worker (the ``llm.*`` queues, thread pool) on the same database;
``scripted_llm`` the scripted OpenAI-compatible server of ``tests.scripted_llm``.

These processes cannot see a test's rolled-back transaction, so tests that use them write
through the processes themselves (or commit under ``django_db_blocker.unblock()`` in
session-scoped fixtures, with unique names), and run after every other test (see
``pytest_collection_modifyitems``), because what they commit stays in tenant A.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from django.conf import settings
from django.db import connection

from tests.conftest import World
from tests.scripted_llm import ScriptedLLM

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 60.0
LIVE_KB_MAX_UPLOAD_MB = 4  # the live server's KB_MAX_UPLOAD_MB (the default is 50)
LIVE_FIXTURES = {"portal", "ingest_worker", "celery_worker", "traced_portal"}
# The servers take their connections from a pool, as in production (the pytest process has none).
LIVE_DATABASE_ENV = {"DATABASE_POOL": "true"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests that use live processes after every other test of the session (stable sort).

    What they do through the servers is committed in tenant A (invitations, keys, sessions,
    events in its append-only audit chain), and other tests assert on tenant A's rows.
    """
    items.sort(key=lambda item: bool(LIVE_FIXTURES & set(getattr(item, "fixturenames", ()))))


@dataclasses.dataclass(frozen=True)
class Portal:
    """The running server: its port, the committed world, and where its log is."""

    port: int
    world: World
    log: Path

    def url(self, host: str = "acme.localhost", path: str = "/") -> str:
        return f"http://{host}:{self.port}{path}"

    def api_get(self, path: str, *, key: str, host: str = "acme.localhost") -> int:
        """GET ``path`` with ``Authorization: Bearer <key>`` from outside the browser; the status."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",  # noqa: S310 (http to our own server)
                                         headers={"Host": f"{host}:{self.port}", "Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _database_url() -> str:
    """A libpq URL of the test database (a Unix-socket server: the socket directory is ``host``)."""
    db = settings.DATABASES["default"]
    auth = quote(str(db["USER"] or ""), safe="")
    if db.get("PASSWORD"):
        auth += ":" + quote(str(db["PASSWORD"]), safe="")
    query = {"host": db["HOST"], "port": db["PORT"], **db.get("OPTIONS", {})}
    return f"postgresql://{auth}@/{quote(str(db['NAME']))}?{urlencode({k: v for k, v in query.items() if v})}"


def _wait_until_healthy(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:  # noqa: S310
            if response.status == 200:
                return
        time.sleep(0.1)  # polling the server's start-up, not asserting on time
    raise RuntimeError(f"daphne did not answer /healthz within {STARTUP_TIMEOUT_S}s:\n"
                       f"{log.read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _close_server_connections(django_db_blocker: Any) -> None:
    """End the server's sessions on the test database, so that pytest-django can drop it."""
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(scope="session")
def portal(django_db_setup: World, django_db_blocker: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    """``daphne config.asgi:application`` on a free port of 127.0.0.1, using the test database."""
    daphne = Path(sys.executable).with_name("daphne")
    if not daphne.exists():
        pytest.skip(f"daphne is not installed next to {sys.executable}")
    port = _free_port()
    log = tmp_path_factory.mktemp("daphne") / "daphne.log"
    # PYTEST_VERSION is inherited, so the server runs with the test settings. A small upload
    # limit lets the browser tests cross it with a few megabytes.
    env = {**os.environ, "DATABASE_URL": _database_url(), "PUBLIC_PORT": str(port),
           "KB_MAX_UPLOAD_MB": str(LIVE_KB_MAX_UPLOAD_MB), **LIVE_DATABASE_ENV}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [str(daphne), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_healthy(process, port, log)
        yield Portal(port=port, world=django_db_setup, log=log)
    finally:
        _stop(process)
        _close_server_connections(django_db_blocker)


@pytest.fixture(scope="session")
def ingest_worker(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An ``rqworker`` on the ``ingest`` queue against the test database (as ``make run`` has),
    so uploads made through the browser get indexed. Yields its log file."""
    log = tmp_path_factory.mktemp("rqworker") / "rqworker.log"
    env = {**os.environ, "DATABASE_URL": _database_url(), "PUBLIC_PORT": str(portal.port), **LIVE_DATABASE_ENV}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [sys.executable, "manage.py", "rqworker", "ingest"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield log
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def scripted_llm() -> Iterator[ScriptedLLM]:
    """The scripted OpenAI-compatible server, on a free port of 127.0.0.1."""
    server = ScriptedLLM().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def celery_metrics_port() -> int:
    """The port on which ``celery_worker`` serves its own metrics (``METRICS_PORT``, as the Helm
    chart's worker pods do)."""
    return _free_port()


@pytest.fixture(scope="session")
def celery_worker(portal: Portal, celery_metrics_port: int,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``celery worker`` on every queue, thread pool (as the Procfile has), against the test
    database and this run's Redis key prefix, serving its metrics on ``celery_metrics_port``.
    Yields its log file."""
    log = tmp_path_factory.mktemp("celery") / "celery.log"
    celery = Path(sys.executable).with_name("celery")
    env = {**os.environ, "DATABASE_URL": _database_url(), "PUBLIC_PORT": str(portal.port),
           "METRICS_PORT": str(celery_metrics_port), **LIVE_DATABASE_ENV}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # its own registry, as in a worker pod
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [str(celery), "-A", "config", "worker", "-Q", "llm.light,llm.standard,llm.heavy,default",
             "--pool", "threads", "--concurrency", "16", "--without-heartbeat", "--without-gossip",
             "--without-mingle", "--loglevel", "INFO"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while b"ready." not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)  # polling the worker's start-up, not asserting on time
        yield log
    finally:
        _stop(process)
