"""Reads of the staff operations page (``/admin/ops/``): queue depths, turns in flight and recently
failed, model endpoint health, ingestion backlog and month-to-date usage, across every tenant.

Cross-tenant reads run one SQL statement per ``SCHEMAS_PER_STATEMENT`` tenants, a ``UNION ALL``
with one branch per tenant schema (schema names quoted as identifiers with ``psycopg.sql``), so
the page's query count grows only by one per section every 250 tenants
(``tests/tenants/test_staff_ops.py`` asserts it stays put from 2 to 4 tenants) and no statement
holds more locks than PostgreSQL's lock table can give. The tenants are listed once per page
(``ops_tenants``) and passed to each read.

Celery queue depths and the endpoint-health hash are read with ``config.metrics``, as the
``/metrics`` gauges read them; RQ's queues and registries with RQ's own classes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.db.models.expressions import RawSQL
from django.utils import timezone
from psycopg import sql

from billing.periods import month_bounds, month_of
from config.db import schema_batches
from config.errors import Forbidden
from config.metrics import CELERY_QUEUES, RQ_QUEUES, celery_queue_depths, endpoint_health_read
from tenants.models import ModelEndpoint, Tenant
from tenants.principal import Principal

# How far back "recently failed" reaches, and how many rows each turn list shows.
FAILED_TURNS_WINDOW = dt.timedelta(hours=24)
TURN_ROWS = 50


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


def _turn_rows(tenants: Sequence[Tenant], where: sql.Composable, params: list[Any]) -> list[tuple[Any, ...]]:
    """One statement: the newest ``TURN_ROWS`` turns matching ``where`` across ``tenants``."""
    from agents.models import Agent, AgentVersion, Turn

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
    return rows


def _turns(tenants: Sequence[Tenant], where: sql.Composable, params: list[Any], now: dt.datetime) -> list[OpsTurn]:
    if not tenants:
        return []
    slugs = {t.schema_name: t.slug for t in tenants}
    rows: list[tuple[Any, ...]] = []
    for batch in schema_batches(tenants):
        rows += _turn_rows(batch, where, params)
    # Each statement gives its newest TURN_ROWS; the newest of those, across statements.
    rows.sort(key=lambda r: r[9] or r[8], reverse=True)
    turns = []
    for row in rows[:TURN_ROWS]:
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
    by queueing) first, at most ``TURN_ROWS``: one statement per 250 tenants. Raises ``Forbidden`` unless staff."""
    _require_staff(principal)
    from agents.models import Turn

    where = sql.SQL("t.status = ANY(%s)")
    return _turns(tenants, where, [sorted(Turn.UNFINISHED)], now or timezone.now())


def ops_turns_failed(
    *, principal: Principal, tenants: Sequence[Tenant], now: dt.datetime | None = None
) -> list[OpsTurn]:
    """Turns of ``tenants`` that failed within ``FAILED_TURNS_WINDOW`` (24 h) before ``now``,
    newest first, at most ``TURN_ROWS``: one statement per 250 tenants. Raises ``Forbidden`` unless staff."""
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
    """The tenants (slug order) with documents pending or processing: one statement per 250
    tenants. Raises
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
    rows: list[tuple[Any, ...]] = []
    for batch in schema_batches(tenants):
        rows += _run(sql.SQL(" UNION ALL ").join(
            sql.SQL(branch).format(schema=sql.Literal(t.schema_name), table=_qualified(t.schema_name, Document))
            for t in batch
        ))
    slugs = {t.schema_name: t.slug for t in tenants}
    backlog = [
        IngestionBacklog(
            tenant_slug=slugs[schema],
            pending=pending,
            processing=processing,
            oldest_pending_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else None,
        )
        for schema, pending, processing, oldest in rows
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
    """Month-to-date usage of every tenant in ``tenants`` (their order): one statement per 250
    tenants, grouped by currency in each schema. ``billing.selectors.invoices.staff_spend_month_to_date`` sums the
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
    periods = {t.schema_name: month_of(now, t.time_zone) for t in tenants}
    by_schema: dict[str, list[tuple[Any, ...]]] = {}
    for batch in schema_batches(tenants):
        params: list[Any] = []
        for tenant in batch:
            params += [month_bounds(periods[tenant.schema_name], tenant.time_zone)[0], now]
        statement = sql.SQL(" UNION ALL ").join(
            branch.format(schema=sql.Literal(t.schema_name), table=_qualified(t.schema_name, UsageEvent)) for t in batch
        )
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
