"""Database connections: the per-process pool's options, and what to do when it runs dry.

Every process takes its connections from a psycopg pool (Django's ``OPTIONS["pool"]``), bounded
by ``DATABASE_POOL_MAX_SIZE``. A request that cannot get one within
``DATABASE_POOL_TIMEOUT_SECONDS`` (or finds PostgreSQL refusing connections) is answered 503
with ``Retry-After`` by ``config.middleware.DatabaseAvailabilityMiddleware`` instead of a 500.
Code that waits on something other than the database for seconds (a model's token stream, a
chat turn's events) hands its connection back first with ``connection_release``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from django.db import connection
from django.http import HttpRequest, HttpResponse
from psycopg_pool import PoolTimeout, TooManyRequests

# How long a client told 503 should wait before retrying: a pool is usually free again within a
# few request lifetimes, and a shorter hint would only bring the same crowd back sooner.
RETRY_AFTER_SECONDS = 5
T = TypeVar("T")
# SQLSTATEs of a server that will not take (more) work now: too_many_connections,
# admin_shutdown, crash_shutdown, cannot_connect_now (PostgreSQL, Appendix A "Error Codes").
# Class 08 (connection exception) is matched by prefix.
_UNAVAILABLE_SQLSTATES = frozenset({"53300", "57P01", "57P02", "57P03"})


def pool_reset(conn: psycopg.Connection[Any]) -> None:
    """Reset a connection that went back into the pool (psycopg_pool's ``reset`` callback).

    django-tenants sets ``search_path`` once per checkout (``TENANT_LIMIT_SET_CALLS``) and the
    setting is session state, so it would survive in the pool; resetting it means no pooled
    connection carries the previous tenant's schema, whatever the next user does. The pool
    passes ``conn`` idle (no transaction) and requires it idle on return; any error discards it.
    """
    autocommit = conn.autocommit
    conn.autocommit = True
    conn.execute("RESET search_path")
    conn.autocommit = autocommit


def pool_options(*, min_size: int, max_size: int, timeout: float) -> dict[str, Any]:
    """The ``OPTIONS["pool"]`` dict for Django's PostgreSQL backend (``psycopg_pool.ConnectionPool``
    keyword arguments): ``min_size``/``max_size`` connections kept open/allowed per process,
    ``timeout`` seconds a caller waits for one before ``PoolTimeout``. Raises ``ValueError`` when
    ``min_size > max_size``."""
    if min_size > max_size:
        raise ValueError(f"the pool's min_size ({min_size}) exceeds its max_size ({max_size})")
    return {"min_size": min_size, "max_size": max_size, "timeout": timeout, "reset": pool_reset}


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised from) means no database connection could be had:
    the pool timed out or refused to queue the caller, PostgreSQL refused the connection (too
    many clients, shutting down, starting up) or the connection failed. Query errors (syntax,
    constraint, serialization) are not."""
    current: BaseException | None = exc
    for _ in range(5):  # Django wraps the driver's error once (``raise ... from``); a few is plenty
        if current is None:
            return False
        if isinstance(current, PoolTimeout | TooManyRequests):
            return True
        if isinstance(current, psycopg.OperationalError):
            state = current.sqlstate
            # A connection that fails before the server answers has no SQLSTATE at all.
            return state is None or state.startswith("08") or state in _UNAVAILABLE_SQLSTATES
        current = current.__cause__
    return False


def database_unavailable_response(request: HttpRequest) -> HttpResponse:
    """503 with ``Retry-After``: the API's error body (code ``unavailable``) under ``/api/``, a
    plain page elsewhere (rendered without templates or context processors, which may need the
    database)."""
    if request.path.startswith("/api/"):
        from config.api import error_response

        response: HttpResponse = error_response(
            request, status=503, code="unavailable",
            message="The service is busy: no database connection was free in time. Retry shortly.",
            details={"retry_after_seconds": RETRY_AFTER_SECONDS})
    else:
        response = HttpResponse(
            "<!doctype html><title>Busy</title><h1>The portal is busy</h1>"
            f"<p>Please try again in a few seconds. Request id: {getattr(request, 'request_id', '')}</p>",
            status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def connection_release() -> None:
    """Give this thread's database connection back (to the pool, or close it without one) before
    a wait on something else: a model's token stream, a turn's events. The next query takes a
    connection again (and django-tenants sets the schema again). Does nothing inside a
    transaction (``atomic``), where closing would break it."""
    if not connection.in_atomic_block:
        connection.close()


# Tenant schemas per cross-tenant statement: a statement holds an AccessShareLock on every table it
# reads until it ends, and PostgreSQL's lock table has max_locks_per_transaction (64 by default) x
# max_connections slots for all sessions together (docs/perf/2026-12-07-metrics-tenant-state.md).
SCHEMAS_PER_STATEMENT = 250


def schema_batches(items: Sequence[T], size: int = SCHEMAS_PER_STATEMENT) -> Iterator[Sequence[T]]:
    """``items`` (tenants or schema names) in consecutive slices of at most ``size``: one
    ``UNION ALL`` statement per slice keeps a cross-tenant read's locks bounded."""
    for start in range(0, len(items), size):
        yield items[start:start + size]

