"""Database connections come from a bounded per-process pool (``config.db``): the search path
never leaks between tenants through a pooled connection, a request that cannot get a connection
in time gets 503 with ``Retry-After``, and PostgreSQL's backends stay within the pool whatever
the concurrency (issue 28, "PostgreSQL connection exhaustion").

The live tests start their own daphne on the test database with a small pool; ``PGAPPNAME``
(libpq) names its connections in ``pg_stat_activity`` so they can be counted apart from the
suite's own and from other live servers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db.utils import load_backend

from config.db import pool_options
from tests.conftest import HOST_A, World
from tests.live import _database_url, _free_port, _stop, _wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
# The test database must exist (pytest-django creates it for tests that use it); each test talks
# to it through connections of its own, outside the test's transaction.
pytestmark = pytest.mark.django_db


def _raw_connection(**kwargs: Any) -> psycopg.Connection[Any]:
    """A plain psycopg connection to the test database, outside Django and its test transaction."""
    db = settings.DATABASES["default"]
    return psycopg.connect(dbname=str(db["NAME"]), host=str(db["HOST"]), port=str(db["PORT"] or ""),
                           user=str(db["USER"]), password=str(db["PASSWORD"] or "") or None, **kwargs)


@contextlib.contextmanager
def _daphne(tmp_path: Path, **env: str) -> Iterator[tuple[int, str]]:
    """daphne on the test database with ``env`` on top of the suite's; yields (port, app name)."""
    daphne = Path(sys.executable).with_name("daphne")
    if not daphne.exists():
        pytest.skip(f"daphne is not installed next to {sys.executable}")
    port = _free_port()
    app_name = f"pooltest-{uuid.uuid4().hex[:8]}"
    log = tmp_path / f"daphne-{port}.log"
    full_env = {**os.environ, "DATABASE_URL": _database_url(), "PUBLIC_PORT": str(port), "PGAPPNAME": app_name,
                "EMBEDDING_PRELOAD": "false", **env}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [str(daphne), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
            cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(process, port, log)
        yield port, app_name
    finally:
        _stop(process)


def _get(port: int, path: str, *, host: str = HOST_A, key: str | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    headers = {"Host": f"{host}:{port}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (our own server)
            return int(response.status), dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers), exc.read()


def _backends(conn: psycopg.Connection[Any], app_name: str, *, waiting_on_lock: bool = False) -> int:
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    if waiting_on_lock:
        sql += " AND wait_event_type = 'Lock'"
    row = conn.execute(sql, (app_name,)).fetchone()
    return int(row[0]) if row else 0


# --- Tenant isolation through a pooled connection -------------------------------------------

@pytest.fixture
def pooled_wrappers(django_db_setup: World, django_db_blocker: Any) -> Iterator[tuple[Any, Any]]:
    """Two django-tenants database wrappers (as two threads would have) sharing one pool of a
    single connection, so the second is served the very connection the first used."""
    default: dict[str, Any] = settings.DATABASES["default"]
    backend = load_backend(str(default["ENGINE"]))
    alias = f"pool_isolation_{uuid.uuid4().hex[:8]}"
    options = {key: value for key, value in default["OPTIONS"].items() if key != "pool"}
    settings_dict = {**default, "CONN_MAX_AGE": 0,
                     "OPTIONS": {**options, "pool": pool_options(min_size=1, max_size=1, timeout=10)}}
    first = backend.DatabaseWrapper(dict(settings_dict), alias=alias)
    second = backend.DatabaseWrapper(dict(settings_dict), alias=alias)
    with django_db_blocker.unblock():
        try:
            yield first, second
        finally:
            first.close()
            second.close()
            first.close_pool()


def _search_path_and_pid(wrapper: Any) -> tuple[str, int]:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT current_setting('search_path'), pg_backend_pid()")
        search_path, pid = cursor.fetchone()
    return str(search_path), int(pid)


def test_it_serves_the_next_tenant_its_own_search_path_on_a_pooled_connection(
        pooled_wrappers: tuple[Any, Any], django_db_setup: World) -> None:
    first, second = pooled_wrappers
    tenant_a, tenant_b = django_db_setup.tenant_a, django_db_setup.tenant_b
    first.set_tenant(tenant_a)
    path_a, pid_a = _search_path_and_pid(first)
    first.close()  # back to the pool, as at the end of a request

    second.set_tenant(tenant_b)
    path_b, pid_b = _search_path_and_pid(second)
    with second.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM tenants_domain")  # public tables stay visible
        cursor.execute("SELECT current_schema()")
        (schema_b,) = cursor.fetchone()
    second.close()

    assert pid_b == pid_a, "the pool of one connection must hand the same backend to both"
    assert tenant_a.schema_name in path_a
    assert tenant_a.schema_name not in path_b
    assert path_b.startswith(tenant_b.schema_name)
    assert schema_b == tenant_b.schema_name

    # And back to the public schema on the same connection: no tenant schema at all.
    first.set_schema_to_public()
    path_public, pid_public = _search_path_and_pid(first)
    assert pid_public == pid_a
    assert tenant_a.schema_name not in path_public and tenant_b.schema_name not in path_public


def test_it_clears_the_search_path_when_a_connection_goes_back_to_the_pool(
        pooled_wrappers: tuple[Any, Any], django_db_setup: World) -> None:
    first, _ = pooled_wrappers
    first.set_tenant(django_db_setup.tenant_a)
    _, pid = _search_path_and_pid(first)
    first.close()

    # Whoever takes the connection straight from the pool (not through django-tenants) finds
    # the server's default search path, not tenant A's.
    with first.pool.connection(timeout=10) as raw:
        row = raw.execute("SELECT current_setting('search_path'), pg_backend_pid()").fetchone()
    assert row is not None
    assert int(row[1]) == pid
    assert django_db_setup.tenant_a.schema_name not in str(row[0])


# --- 503 when no connection is free, and recovery -------------------------------------------

def test_it_answers_503_with_retry_after_while_no_connection_is_free_and_recovers(
        django_db_setup: World, tmp_path: Path) -> None:
    key = django_db_setup.key_a
    with _daphne(tmp_path, DATABASE_POOL="true", DATABASE_POOL_MIN_SIZE="1", DATABASE_POOL_MAX_SIZE="1",
                 DATABASE_POOL_TIMEOUT_SECONDS="0.5") as (port, app_name), \
            _raw_connection(autocommit=True) as watcher, _raw_connection() as locker:
        # Hold the server's only pooled connection: a request that waits on a lock we hold.
        locker.execute("LOCK TABLE public.tenants_domain IN ACCESS EXCLUSIVE MODE")
        held: dict[str, Any] = {}
        blocked = threading.Thread(target=lambda: held.update(result=_get(port, "/api/v1/me", key=key, timeout=60)))
        blocked.start()
        try:
            deadline = time.monotonic() + 30
            while _backends(watcher, app_name, waiting_on_lock=True) < 1:
                assert time.monotonic() < deadline, "the first request never reached the lock"
                time.sleep(0.05)  # polling for the request to arrive, not asserting on time

            status, headers, body = _get(port, "/api/v1/me", key=key)
            assert status == 503
            assert int(headers["Retry-After"]) > 0
            assert headers["Content-Type"].startswith("application/json")
            assert b'"code": "unavailable"' in body

            status, headers, body = _get(port, "/agents/")  # a console page: plain 503, no traceback
            assert status == 503
            assert int(headers["Retry-After"]) > 0
            assert b"Traceback" not in body and b"busy" in body.lower()

            status, _, body = _get(port, "/readyz", host="127.0.0.1")
            assert status == 503
            assert b"PoolTimeout" in body
        finally:
            locker.rollback()  # releases the lock
            blocked.join(timeout=60)

        assert held["result"][0] == 200
        assert _get(port, "/api/v1/me", key=key)[0] == 200
        assert _get(port, "/readyz", host="127.0.0.1")[0] == 200
        assert _backends(watcher, app_name) <= 1


# --- Backends stay bounded under concurrency -------------------------------------------------

def test_it_keeps_postgres_backends_within_the_pool_under_concurrent_requests(
        django_db_setup: World, tmp_path: Path) -> None:
    key = django_db_setup.key_a
    pool_max = 4
    # DATABASE_CONN_MAX_AGE=60 is what production ran with before the pool (and what it falls
    # back to without one): a connection kept per request thread.
    with _daphne(tmp_path, DATABASE_CONN_MAX_AGE="60", DATABASE_POOL="true", DATABASE_POOL_MIN_SIZE="1",
                 DATABASE_POOL_MAX_SIZE=str(pool_max), DATABASE_POOL_TIMEOUT_SECONDS="30") as (port, app_name), \
            _raw_connection(autocommit=True) as watcher:
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(_backends(watcher, app_name))
                time.sleep(0.1)  # sampling interval, not an assertion

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=60) as executor:
                statuses = list(executor.map(lambda _: _get(port, "/api/v1/me", key=key, timeout=60)[0], range(60)))
        finally:
            done.set()
            sampler.join()
        samples.append(_backends(watcher, app_name))  # after the burst: nothing may linger either

    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) > 0
    assert max(samples) <= pool_max, f"backends sampled: {samples}"
