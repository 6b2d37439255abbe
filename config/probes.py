"""Liveness, readiness and Prometheus metrics endpoints (served by ``ProbeMiddleware``)."""

from __future__ import annotations

import time

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse


def liveness(request: HttpRequest) -> HttpResponse:
    """200 while the process can answer at all; touches no dependency."""
    return JsonResponse({"status": "ok"})


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported as text
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_redis() -> str | None:
    from config.redis import redis_client

    try:
        redis_client().ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported as text
        return f"{type(exc).__name__}: {exc}"
    return None


def readiness(request: HttpRequest) -> HttpResponse:
    """200 when PostgreSQL and Redis both answer, else 503 naming what failed.

    Body: ``{"status": "ok"|"unavailable", "checks": {"database": {"ok", "ms", "error"},
    "redis": {...}}}`` with round-trip times in milliseconds.
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
    """Prometheus text exposition of the process's metrics (django-prometheus registry)."""
    from django_prometheus.exports import ExportToDjangoView

    return ExportToDjangoView(request)
