"""Liveness, readiness and Prometheus metrics endpoints (served by ``ProbeMiddleware``)."""

from __future__ import annotations

import hmac
import time

import structlog
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = structlog.get_logger(__name__)


def liveness(request: HttpRequest) -> HttpResponse:
    """200 while the process can answer at all; touches no dependency."""
    return JsonResponse({"status": "ok"})


# The longest /readyz waits for a pooled connection: the probe's own timeout (helm values: 5 s)
# must not run out first, or the orchestrator sees a hung pod instead of a 503.
READINESS_POOL_TIMEOUT_SECONDS = 2.0


def _check_database() -> str | None:
    try:
        pool = getattr(connection, "pool", None)  # Django's psycopg pool, None without one
        if pool is not None:
            # Straight from the pool with a short timeout: a dry pool answers 503 in time, and
            # the check leaves no connection behind in this request's thread.
            pool.open()
            with pool.connection(timeout=min(READINESS_POOL_TIMEOUT_SECONDS, pool.timeout)) as conn:
                conn.execute("SELECT 1")
        else:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        logger.warning("readiness_check_failed", check="database", error=str(exc))
        return type(exc).__name__
    return None


def _check_redis() -> str | None:
    from config.redis import redis_client

    try:
        redis_client().ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        logger.warning("readiness_check_failed", check="redis", error=str(exc))
        return type(exc).__name__
    return None


def readiness(request: HttpRequest) -> HttpResponse:
    """200 when PostgreSQL and Redis both answer, else 503 naming what failed.

    Body: ``{"status": "ok"|"unavailable", "checks": {"database": {"ok", "ms", "error"},
    "redis": {...}}}`` with round-trip times in milliseconds. ``error`` is only the exception's
    class name (the endpoint is reachable on every host); the full message goes to the log.
    """
    checks: dict[str, dict[str, object]] = {}
    for name, check in (("database", _check_database), ("redis", _check_redis)):
        started = time.perf_counter()
        error = check()
        checks[name] = {
            "ok": error is None,
            "ms": round((time.perf_counter() - started) * 1000, 2),
            "error": error,
        }
    ready = all(c["ok"] for c in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition: django-prometheus' and the portal's families, every process's
    with ``PROMETHEUS_MULTIPROC_DIR``, and the scrape-time state gauges (``config.metrics``).

    With ``METRICS_TOKEN`` set, the caller must send it as a bearer token (401 otherwise);
    without it but with ``METRICS_PORT`` set, 404 (the metrics are on that port).
    """
    from prometheus_client import CONTENT_TYPE_LATEST

    from config.metrics import exposition

    token = settings.METRICS_TOKEN
    if not token and settings.METRICS_PORT:
        # Served on their own port (``METRICS_PORT``), not on every host of the portal.
        return JsonResponse({"error": {"code": "not_found", "message": "Metrics are served on their own port."}},
                            status=404)
    if token:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), token.encode()):
            return JsonResponse({"error": {"code": "not_authenticated", "message": "Metrics need a token."}},
                                status=401)

    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
