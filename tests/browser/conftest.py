"""A real daphne server on the test database, and Debian's Chromium driven by Playwright.

The server is a subprocess started once per session against pytest-django's test database, so
it sees the personas world, which ``django_db_setup`` commits. Browser tests therefore never
use ``db`` / ``transactional_db`` / ``live_server``: the server could not see rolled-back rows,
and a flush would TRUNCATE the append-only audit tables (a trigger refuses that). Rows a test
needs are written through the browser itself, or committed under ``django_db_blocker.unblock()``
with unique names; since they stay, these tests run after all others (see
``pytest_collection_modifyitems``).

pytest-django creates the test database only when a collected test declares that it uses one,
so browser tests carry ``pytest.mark.django_db``: their own (empty, rolled-back) transaction in
this process is harmless, since they write nothing through it.

Playwright's sync API keeps an asyncio loop running in this thread while it is started, and
Django refuses ORM calls (including that rollback) while a loop runs. The browser is therefore
started and stopped by each test, inside the database fixture's lifetime, and browser tests do
any database work of their own before they open a page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from django.conf import settings
from django.db import connection

from tests.conftest import PASSWORD, World

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60.0


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the browser tests after every other test of the session.

    What they do through the server is committed in tenant A (invitations, keys, events in its
    append-only audit chain), and other tests assert on tenant A's rows. Sorting is stable, so
    every other test keeps its order.
    """
    here = Path(__file__).parent
    items.sort(key=lambda item: here in item.path.parents)


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
    # PYTEST_VERSION is inherited, so the server runs with the test settings.
    env = {**os.environ, "DATABASE_URL": _database_url(), "PUBLIC_PORT": str(port)}
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


@pytest.fixture
def browser(portal: Portal) -> Iterator[Any]:
    """Debian's Chromium, headless (never a downloaded browser), for one test."""
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """``new_page(java_script_enabled=...)``: a page in a fresh context (no cookies)."""
    contexts: list[Any] = []

    def make(**options: Any) -> Any:
        context = browser.new_context(**options)
        context.set_default_timeout(15_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page: Callable[..., Any]) -> Any:
    return new_page()


def sign_in(page: Any, portal: Portal, email: str, *, host: str = "acme.localhost") -> None:
    """Sign in through the real login form and wait for the page it leads to."""
    page.goto(portal.url(host, "/accounts/login/"))
    page.locator("input[name=login]").fill(email)
    page.locator("input[name=password]").fill(PASSWORD)
    with page.expect_navigation():
        page.locator("form:has(input[name=password]) [type=submit]").click()


@pytest.fixture(scope="session")
def ingest_worker(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An ``rqworker`` on the ``ingest`` queue against the test database (as ``make run`` has),
    so uploads made through the browser get indexed. Yields its log file."""
    log = tmp_path_factory.mktemp("rqworker") / "rqworker.log"
    env = {**os.environ, "DATABASE_URL": _database_url(), "PUBLIC_PORT": str(portal.port)}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [sys.executable, "manage.py", "rqworker", "--worker-class", "rq.worker.SimpleWorker", "ingest"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield log
    finally:
        _stop(process)
