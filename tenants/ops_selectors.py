"""Reads of the staff operations page (``/admin/ops/``): queue depths, turns in flight and recently
failed, model endpoint health, ingestion backlog and month-to-date usage, across every tenant.

Cross-tenant reads run ONE SQL statement each, a ``UNION ALL`` with one branch per tenant schema
(schema names quoted as identifiers with ``psycopg.sql``), so the page's query count does not
grow with the number of tenants (``tests/tenants/test_staff_ops.py`` asserts it). The tenants
are listed once per page (``ops_tenants``) and passed to each read.

Queue depths come from Redis: Celery's Redis transport keeps each queue as lists (one per
priority step, kombu's ``{queue}\\x06\\x16{priority}`` for priorities above 0) under the broker's
``global_keyprefix``; RQ's queues and registries are read with RQ's own classes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.db.models.expressions import RawSQL
from django.utils import timezone
from psycopg import sql

from billing.periods import month_bounds, month_of
from config.errors import Forbidden
from config.redis import redis_client
from tenants.models import ModelEndpoint, Tenant
from tenants.principal import Principal

CELERY_QUEUES = ("llm.light", "llm.standard", "llm.heavy", "default")
RQ_QUEUES = ("ingest", "default")
# kombu's Redis transport: a message of priority p > 0 waits in "{queue}\x06\x16{p}" (the default
# priority steps 0, 3, 6, 9; kombu.transport.redis.DEFAULT_PRIORITY_STEPS and Channel.sep).
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
# How far back "recently failed" reaches, and how many rows each turn list shows.
FAILED_TURNS_WINDOW = dt.timedelta(hours=24)
TURN_ROWS = 50


def endpoint_health_key() -> str:
    """The Redis hash of the last probe of each platform endpoint: field ``str(pk)``, value JSON
    ``{"ok", "latency_ms", "checked_at", "name", "tier", "error"}`` (written by
    ``tenants.services.endpoint_probe``, read here and by the ``portal_model_endpoint_up`` gauge)."""
    return f"{settings.CACHE_KEY_PREFIX}:endpoint-health"


def _require_staff(principal: Principal) -> None:
    if principal.kind not in {"staff", "system"}:
        raise Forbidden("The operations page is for platform staff.", code="staff_only")


# --- Tenants ------------------------------------------------------------------------------------


def ops_tenants(*, principal: Principal) -> list[Tenant]:
    """Every tenant whose schema exists (a row whose schema is gone or not yet made is skipped),
    in slug order, in one query. Raises ``Forbidden`` unless the principal is staff."""
    _require_staff(principal)
    existing = RawSQL("SELECT nspname::text FROM pg_catalog.pg_namespace", ())
    return list(
        Tenant.objects.exclude(schema_name=settings.PUBLIC_SCHEMA_NAME)
        .filter(schema_name__in=existing)
        .order_by("slug")
    )


def _run(statement: sql.Composable, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        text = statement.as_string(cursor.connection)  # type: ignore[attr-defined]  # the psycopg connection
        cursor.execute(text, list(params))
        return list(cursor.fetchall())


def _qualified(schema: str, model: Any) -> sql.Identifier:
    return sql.Identifier(schema, model._meta.db_table)


# --- Queues ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueDepth:
    """One queue: ``broker`` celery | rq; ``queued`` messages waiting; for RQ also ``started``
    (jobs running) and ``failed`` (jobs in the failed registry). ``None`` when unread."""

    name: str
    broker: str
    queued: int | None
    started: int | None = None
    failed: int | None = None


@dataclass(frozen=True)
class QueueReport:
    queues: list[QueueDepth]
    error: str = ""


@cache
def _broker_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def _celery_redis() -> redis.Redis:
    url = settings.CELERY_BROKER_URL
    return redis_client() if url == settings.REDIS_URL else _broker_client(url)


def celery_queue_depths() -> dict[str, int]:
    """Messages waiting in each Celery queue of ``CELERY_QUEUES`` (all priority steps summed),
    read with LLEN in one Redis round trip. Raises ``redis.RedisError`` when Redis is down."""
    prefix = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}).get("global_keyprefix", "")
    pipe = _celery_redis().pipeline(transaction=False)
    for queue in CELERY_QUEUES:
        for step in _KOMBU_PRIORITY_STEPS:
            pipe.llen(f"{prefix}{queue}" if step == 0 else f"{prefix}{queue}{_KOMBU_PRIORITY_SEP}{step}")
    lengths = pipe.execute()
    per = len(_KOMBU_PRIORITY_STEPS)
    return {queue: int(sum(lengths[i * per : (i + 1) * per])) for i, queue in enumerate(CELERY_QUEUES)}


def rq_queue_depths() -> dict[str, tuple[int, int, int]]:
    """``{queue: (queued, started, failed)}`` for each RQ queue of ``RQ_QUEUES``. Raises
    ``redis.RedisError`` when Redis is down."""
    import django_rq
    from rq.registry import FailedJobRegistry, StartedJobRegistry

    depths: dict[str, tuple[int, int, int]] = {}
    for name in RQ_QUEUES:
        queue = django_rq.get_queue(name)
        depths[name] = (
            queue.count,
            StartedJobRegistry(queue=queue).count,
            FailedJobRegistry(queue=queue).count,
        )
    return depths


def ops_queue_depths(*, principal: Principal) -> QueueReport:
    """Depth of every Celery and RQ queue; when Redis cannot be read, every depth is ``None`` and
    ``error`` says why (the page still renders). Raises ``Forbidden`` unless staff."""
    _require_staff(principal)
    try:
        celery = celery_queue_depths()
        rq = rq_queue_depths()
    except redis.RedisError as exc:
        return QueueReport(
            queues=[QueueDepth(q, "celery", None) for q in CELERY_QUEUES]
            + [QueueDepth(q, "rq", None) for q in RQ_QUEUES],
            error=f"Redis could not be read: {exc}",
        )
    return QueueReport(
        queues=[QueueDepth(q, "celery", celery[q]) for q in CELERY_QUEUES]
        + [QueueDepth(q, "rq", *rq[q]) for q in RQ_QUEUES]
    )


# --- Turns ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsTurn:
    """A turn of some tenant: ``duration`` is finished - started for a finished turn and now -
    started (or queued) for one in flight, in seconds."""

    tenant_slug: str
    turn_id: int
    agent: str
    status: str
    queue: str
    endpoint: str
    error_code: str
    error_message: str
    queued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    duration_seconds: float | None


_TURN_COLUMNS = [
    "turn_id",
    "agent",
    "status",
    "queue",
    "endpoint",
    "error_code",
    "error_message",
    "queued_at",
    "started_at",
    "finished_at",
]


def _turns(tenants: Sequence[Tenant], where: sql.Composable, params: list[Any], now: dt.datetime) -> list[OpsTurn]:
    if not tenants:
        return []
    from agents.models import Agent, AgentVersion, Turn

    slugs = {t.schema_name: t.slug for t in tenants}
    branches = []
    for tenant in tenants:
        schema = tenant.schema_name
        branches.append(
            sql.SQL(
                "(SELECT {schema} AS schema_name, t.id, a.name, t.status, t.queue, t.endpoint_name, t.error_code, "
                "left(t.error_message, 300), t.queued_at, t.started_at, t.finished_at "
                "FROM {turn} t JOIN {version} v ON v.id = t.agent_version_id JOIN {agent} a ON a.id = v.agent_id "
                "WHERE {where} ORDER BY coalesce(t.started_at, t.queued_at) DESC LIMIT {limit})"
            ).format(
                schema=sql.Literal(schema),
                turn=_qualified(schema, Turn),
                version=_qualified(schema, AgentVersion),
                agent=_qualified(schema, Agent),
                where=where,
                limit=sql.Literal(TURN_ROWS),
            )
        )
    statement = sql.SQL("SELECT * FROM ({union}) AS turns ORDER BY coalesce(started_at, queued_at) DESC LIMIT {limit}")
    rows = _run(
        statement.format(union=sql.SQL(" UNION ALL ").join(branches), limit=sql.Literal(TURN_ROWS)),
        params * len(tenants),
    )
    turns = []
    for row in rows:
        values = dict(zip(_TURN_COLUMNS, row[1:], strict=True))
        started, finished = values["started_at"], values["finished_at"]
        begin = started or values["queued_at"]
        end = finished or now
        turns.append(
            OpsTurn(
                tenant_slug=slugs[row[0]],
                duration_seconds=max(0.0, (end - begin).total_seconds()) if begin else None,
                **values,
            )
        )
    return turns


def ops_turns_in_flight(
    *, principal: Principal, tenants: Sequence[Tenant], now: dt.datetime | None = None
) -> list[OpsTurn]:
    """Turns queued, running or awaiting approval in any of ``tenants``, newest (by start, else
    by queueing) first, at most ``TURN_ROWS``: one statement. Raises ``Forbidden`` unless staff."""
    _require_staff(principal)
    from agents.models import Turn

    where = sql.SQL("t.status = ANY(%s)")
    return _turns(tenants, where, [sorted(Turn.UNFINISHED)], now or timezone.now())


def ops_turns_failed(
    *, principal: Principal, tenants: Sequence[Tenant], now: dt.datetime | None = None
) -> list[OpsTurn]:
    """Turns of ``tenants`` that failed within ``FAILED_TURNS_WINDOW`` (24 h) before ``now``,
    newest first, at most ``TURN_ROWS``: one statement. Raises ``Forbidden`` unless staff."""
    _require_staff(principal)
    now = now or timezone.now()
    where = sql.SQL("t.status = 'failed' AND coalesce(t.finished_at, t.queued_at) >= %s")
    return _turns(tenants, where, [now - FAILED_TURNS_WINDOW], now)


# --- Ingestion -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestionBacklog:
    """A tenant's documents waiting (``pending``) or being ingested (``processing``), and how
    long the oldest pending one has waited (seconds; ``None`` when none is pending)."""

    tenant_slug: str
    pending: int
    processing: int
    oldest_pending_seconds: float | None


def ops_ingestion_backlog(
    *, principal: Principal, tenants: Sequence[Tenant], now: dt.datetime | None = None
) -> list[IngestionBacklog]:
    """The tenants (slug order) with documents pending or processing: one statement. Raises
    ``Forbidden`` unless staff."""
    _require_staff(principal)
    if not tenants:
        return []
    from knowledge.models import Document

    now = now or timezone.now()
    branch = (
        "SELECT {schema}, count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'processing'), "
        "min(created_at) FILTER (WHERE status = 'pending') FROM {table} WHERE status IN ('pending', 'processing')"
    )
    statement = sql.SQL(" UNION ALL ").join(
        sql.SQL(branch).format(schema=sql.Literal(t.schema_name), table=_qualified(t.schema_name, Document))
        for t in tenants
    )
    slugs = {t.schema_name: t.slug for t in tenants}
    backlog = [
        IngestionBacklog(
            tenant_slug=slugs[schema],
            pending=pending,
            processing=processing,
            oldest_pending_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else None,
        )
        for schema, pending, processing, oldest in _run(statement)
        if pending or processing
    ]
    return sorted(backlog, key=lambda b: b.tenant_slug)


# --- Usage -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantUsage:
    """Month-to-date usage of one tenant: model tokens in and out, usage events, and the exact sum
    of their costs per currency (``costs``: ``[(currency, sum)]``, empty with no events). The
    month is the calendar month holding now in the tenant's timezone (``billing.periods``), as
    on the tenant's invoices."""

    tenant: Tenant
    period: str
    events: int
    input_tokens: int
    output_tokens: int
    costs: list[tuple[str, Decimal]]


def ops_usage_month_to_date(
    *, principal: Principal, tenants: Sequence[Tenant], now: dt.datetime | None = None
) -> list[TenantUsage]:
    """Month-to-date usage of every tenant in ``tenants`` (their order): one statement, grouped
    by currency in each schema. ``billing.selectors.invoices.staff_spend_month_to_date`` sums the
    same costs but with one query per tenant, which this page avoids. Raises ``Forbidden``
    unless staff."""
    _require_staff(principal)
    if not tenants:
        return []
    from billing.models import UsageEvent

    now = now or timezone.now()
    branch = sql.SQL(
        "SELECT {schema}, currency, count(*), "
        "coalesce(sum(quantity) FILTER (WHERE kind = 'llm.input_tokens'), 0), "
        "coalesce(sum(quantity) FILTER (WHERE kind = 'llm.output_tokens'), 0), coalesce(sum(cost), 0) "
        "FROM {table} WHERE created_at >= %s AND created_at < %s GROUP BY currency"
    )
    params: list[Any] = []
    periods: dict[str, str] = {}
    for tenant in tenants:
        period = month_of(now, tenant.time_zone)
        periods[tenant.schema_name] = period
        params += [month_bounds(period, tenant.time_zone)[0], now]
    statement = sql.SQL(" UNION ALL ").join(
        branch.format(schema=sql.Literal(t.schema_name), table=_qualified(t.schema_name, UsageEvent)) for t in tenants
    )
    by_schema: dict[str, list[tuple[Any, ...]]] = {}
    for row in _run(statement, params):
        by_schema.setdefault(row[0], []).append(row[1:])
    usage = []
    for tenant in tenants:
        rows = sorted(by_schema.get(tenant.schema_name, []), key=lambda r: r[0])
        usage.append(
            TenantUsage(
                tenant=tenant,
                period=periods[tenant.schema_name],
                events=sum(r[1] for r in rows),
                input_tokens=int(sum(r[2] for r in rows)),
                output_tokens=int(sum(r[3] for r in rows)),
                costs=[(r[0], r[4]) for r in rows],
            )
        )
    return usage


# --- Model endpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointHealth:
    """A platform endpoint and its last probe (``probe`` is ``None`` when never probed, else the
    hash's JSON: ``ok``, ``latency_ms``, ``checked_at``, ``error``)."""

    endpoint: ModelEndpoint
    probe: dict[str, Any] | None

    @property
    def checked_at(self) -> dt.datetime | None:
        text = (self.probe or {}).get("checked_at")
        try:
            return dt.datetime.fromisoformat(text) if text else None
        except ValueError:
            return None


def endpoint_health_read() -> dict[str, dict[str, Any]]:
    """The endpoint-health hash as ``{str(pk): probe dict}`` (unreadable values skipped). Raises
    ``redis.RedisError`` when Redis is down."""
    raw = redis_client().hgetall(endpoint_health_key())
    health: dict[str, dict[str, Any]] = {}
    for field, value in raw.items():  # type: ignore[union-attr]  # a sync client
        try:
            probe = json.loads(value)
        except ValueError:
            continue
        if isinstance(probe, dict):
            health[field.decode() if isinstance(field, bytes) else str(field)] = probe
    return health


def ops_endpoint_health(*, principal: Principal) -> tuple[list[EndpointHealth], str]:
    """Every platform endpoint (tier, priority, name order) with its last probe, and an error text
    when Redis could not be read (then every probe is ``None``). One query and one Redis call.
    Raises ``Forbidden`` unless staff."""
    _require_staff(principal)
    endpoints = list(ModelEndpoint.objects.filter(tenant__isnull=True).order_by("tier", "priority", "name", "pk"))
    try:
        health, error = endpoint_health_read(), ""
    except redis.RedisError as exc:
        health, error = {}, f"Redis could not be read: {exc}"
    return [EndpointHealth(endpoint=e, probe=health.get(str(e.pk))) for e in endpoints], error
