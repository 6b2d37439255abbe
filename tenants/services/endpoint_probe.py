"""Probing model endpoints: one small real request, its outcome recorded for the operations page
and the ``portal_model_endpoint_up`` gauge.

The probe is a one-token streamed chat completion sent through the same code a turn uses
(``agents.runtime.llm.stream_chat``, read until the first chunk arrives) rather than ``GET
{api_base}/models``: it works for every provider the platform can call (litellm's too, which
have no common ``/models``), it proves what a turn needs (the key is accepted, the named model
is loaded and generates) and its latency is the time to the first chunk a user would wait for.
It takes the same route as a turn: a tenant's own endpoint through the egress guard's client (a
private address is refused unless the staff allowlist opens it), a platform endpoint with the
plain client (staff's own URLs, such as the local model on 127.0.0.1). The cost is a handful of
prompt tokens and one completion token per probe; probes record no usage events.

Results of enabled platform endpoints go to the Redis hash ``endpoint_health_key()`` (field
``str(pk)``, value JSON ``{"ok", "latency_ms", "checked_at", "name", "tier", "error"}``); a
tenant's probes are only shown to the tenant and audited.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from django.db import connections, transaction
from django.utils import timezone

from compliance.services import audit_event_create
from config.errors import Forbidden, NotFound
from config.metrics import endpoint_health_key
from config.redis import redis_client
from tenants.models import ModelEndpoint
from tenants.principal import Principal

logger = structlog.get_logger(__name__)

# A probe waits at most this long (seconds) to connect and for each read, or the endpoint's own
# timeout when shorter: a health check must answer well inside the 60 s beat interval.
PROBE_TIMEOUT_SECONDS = 10.0
# Probes of the beat task run side by side, at most this many at once.
PROBE_CONCURRENCY = 8
PROBE_MESSAGES = [{"role": "user", "content": "Reply with the single word OK."}]


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: ``ok``; ``latency_ms`` from sending the request to the first
    streamed chunk (milliseconds; ``None`` when it failed); ``checked_at`` (aware, when the probe
    started); ``error_code`` (``agents.runtime.llm.LLMError`` codes such as ``model_unreachable``,
    ``model_timeout``, ``egress_denied``, ``model_auth_failed``; ``""`` when ok) and ``error``, a
    sentence for people."""

    ok: bool
    latency_ms: float | None
    checked_at: dt.datetime
    error_code: str = ""
    error: str = ""

    def as_health(self, endpoint: ModelEndpoint) -> dict[str, Any]:
        """The endpoint-health hash value of this result (see the module docstring)."""
        return {
            "ok": self.ok,
            "latency_ms": self.latency_ms,
            "checked_at": self.checked_at.isoformat(),
            "name": endpoint.name,
            "tier": endpoint.tier,
            "error": self.error,
        }


def _cause_text(exc: BaseException) -> str:
    """The transport error under an ``LLMError`` (``[Errno 111] Connection refused``), which the
    runtime's user-facing message leaves out; staff and the endpoint's owner need it here."""
    import httpx

    cause = exc.__cause__
    if isinstance(cause, httpx.TransportError) and str(cause):
        return str(cause)[:200]
    return ""


def _probe(endpoint: ModelEndpoint) -> ProbeResult:
    from agents.runtime.llm import LLMError, stream_chat

    probe_endpoint = copy.copy(endpoint)  # the shorter timeout must not leak into the caller's row
    probe_endpoint.timeout_seconds = min(endpoint.timeout_seconds, PROBE_TIMEOUT_SECONDS)
    checked_at = timezone.now()
    started = time.perf_counter()
    try:
        stream_chat(
            endpoints=[probe_endpoint],
            messages=PROBE_MESSAGES,
            temperature=0.0,
            max_tokens=1,
            on_delta=lambda _text: None,
            # The first chunk answers the question; the rest of the stream is not waited for.
            should_stop=lambda: True,
            metrics=False,  # probes would skew the latency and token figures of real calls
        )
    except LLMError as exc:
        cause = _cause_text(exc)
        return ProbeResult(
            ok=False,
            latency_ms=None,
            checked_at=checked_at,
            error_code=exc.code,
            error=f"{exc.message} ({cause})" if cause else exc.message,
        )
    except Exception as exc:  # a probe reports every failure (an unreadable key, a provider's bug) as a result
        logger.warning("endpoint_probe_crashed", endpoint=endpoint.pk, error=repr(exc)[:300])
        return ProbeResult(
            ok=False,
            latency_ms=None,
            checked_at=checked_at,
            error_code="probe_failed",
            error=f"The probe failed: {type(exc).__name__}.",
        )
    latency = round((time.perf_counter() - started) * 1000, 1)
    return ProbeResult(ok=True, latency_ms=latency, checked_at=checked_at)


def _recorded(endpoint: ModelEndpoint) -> bool:
    # Only enabled platform endpoints serve turns by tier, so only they count for platform health.
    return endpoint.tenant_id is None and endpoint.enabled


def model_endpoint_probe(*, endpoint: ModelEndpoint) -> ProbeResult:
    """Send one probe to ``endpoint`` (see the module docstring) and return its ``ProbeResult``;
    for an enabled platform endpoint also store it in the endpoint-health hash. Never raises for
    the endpoint's own failure; a Redis failure while recording is logged, not raised. Waits at
    most about ``PROBE_TIMEOUT_SECONDS`` for each connect or read."""
    result = _probe(endpoint)
    logger.info(
        "endpoint_probed",
        endpoint=endpoint.pk,
        name=endpoint.name,
        ok=result.ok,
        latency_ms=result.latency_ms,
        error_code=result.error_code,
    )
    if _recorded(endpoint):
        try:
            redis_client().hset(endpoint_health_key(), str(endpoint.pk), json.dumps(result.as_health(endpoint)))
        except redis.RedisError as exc:
            logger.warning("endpoint_health_not_recorded", endpoint=endpoint.pk, error=str(exc))
    return result


def _probe_in_thread(endpoint: ModelEndpoint) -> ProbeResult:
    try:
        return model_endpoint_probe(endpoint=endpoint)
    finally:
        connections.close_all()  # this thread's connections (the egress allowlist may be read)


def platform_endpoints_probe() -> dict[str, int]:
    """Probe every enabled platform endpoint (at most ``PROBE_CONCURRENCY`` at once) and drop the
    hash fields of endpoints that are gone or disabled, so the hash holds exactly the endpoints
    that serve turns. Returns ``{"ok": n, "failed": n, "removed": n}``."""
    endpoints = list(ModelEndpoint.objects.filter(tenant__isnull=True, enabled=True).order_by("pk"))
    live = {str(e.pk) for e in endpoints}
    removed = 0
    try:
        client = redis_client()
        fields = client.hkeys(endpoint_health_key())
        stale = [f for f in fields if (f.decode() if isinstance(f, bytes) else f) not in live]  # type: ignore[union-attr]
        if stale:
            removed = int(client.hdel(endpoint_health_key(), *stale))  # type: ignore[arg-type]
    except redis.RedisError as exc:
        logger.warning("endpoint_health_not_pruned", error=str(exc))
    if not endpoints:
        return {"ok": 0, "failed": 0, "removed": removed}
    with ThreadPoolExecutor(max_workers=min(PROBE_CONCURRENCY, len(endpoints))) as pool:
        results = list(pool.map(_probe_in_thread, endpoints))
    ok = sum(r.ok for r in results)
    return {"ok": ok, "failed": len(results) - ok, "removed": removed}


def _audit_payload(endpoint: ModelEndpoint, result: ProbeResult) -> dict[str, Any]:
    return {"name": endpoint.name, "ok": result.ok, "latency_ms": result.latency_ms, "error_code": result.error_code}


def model_endpoint_test(*, principal: Principal, endpoint: ModelEndpoint) -> ProbeResult:
    """A tenant member's "Test endpoint" on one of the tenant's own endpoints: probe it and audit
    ``model_endpoint.tested`` in the tenant's chain. Raises ``Forbidden`` without
    ``agents:write`` (who may change the endpoint may test it) and ``NotFound`` for an endpoint
    that is not the tenant's own (the platform's or another tenant's)."""
    principal.require("agents:write")
    tenant = principal.tenant
    if tenant is None or tenant.is_public or endpoint.tenant_id != tenant.pk:
        raise NotFound("No such model endpoint.")
    # No transaction around the request: it may take up to the probe's timeout.
    result = model_endpoint_probe(endpoint=endpoint)
    with transaction.atomic():
        audit_event_create(
            actor=principal,
            action="model_endpoint.tested",
            target_type="model_endpoint",
            target_id=endpoint.pk,
            payload=_audit_payload(endpoint, result),
            schema=tenant.schema_name,
        )
    return result


def staff_model_endpoint_test(*, principal: Principal, endpoint: ModelEndpoint) -> ProbeResult:
    """Staff's "Test endpoint" on a platform endpoint: probe it (recorded in the health hash when
    enabled) and audit ``model_endpoint.tested`` in the public chain. Raises ``Forbidden`` unless
    the principal is staff and ``NotFound`` for a tenant's own endpoint (staff test the
    platform's; a tenant tests its own)."""
    if principal.kind not in {"staff", "system"}:
        raise Forbidden("Testing platform endpoints is for platform staff.", code="staff_only")
    if endpoint.tenant_id is not None:
        raise NotFound("No such platform model endpoint.")
    result = model_endpoint_probe(endpoint=endpoint)
    with transaction.atomic():
        audit_event_create(
            actor=principal,
            action="model_endpoint.tested",
            target_type="model_endpoint",
            target_id=endpoint.pk,
            payload=_audit_payload(endpoint, result),
            schema="public",
        )
    return result
