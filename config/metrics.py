"""The portal's own Prometheus metric families (``portal_*``) and the ``/metrics`` exposition.

Two kinds of family:

* Events, recorded where they happen (``llm_call_record``, ``turn_finished``, ``tool_call_counted``,
  ``budget_block_counted``): counters and histograms of ``prometheus_client``. A Celery worker
  records them in its own process; with ``PROMETHEUS_MULTIPROC_DIR`` set (before the process
  imports ``prometheus_client``) every process writes them to files there and the web's
  ``/metrics`` sums them (``prometheus_client.multiprocess``), so one scrape of the web sees the
  workers' model calls too. Without it each process exposes only its own: in Kubernetes each worker
  serves its registry on ``METRICS_PORT`` (the Helm chart's ``metrics.workerPort`` and PodMonitor).
* State, computed at scrape time by ``StateCollector``: queue depths (Redis ``LLEN`` of the Celery
  and RQ queues), knowledge documents by status and pending approvals across every tenant schema
  (``UNION ALL`` over the schemas, ``SCHEMAS_PER_STATEMENT`` to a statement, cached
  ``STATE_CACHE_SECONDS`` in the cache so that several scrapers cost one read per interval; figures
  for 1,000 tenants: docs/perf/2026-12-07-metrics-tenant-state.md), and model endpoint health (the
  Redis hash the staff operations page's probes keep, ``endpoint_health_key()``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
import structlog
from django.conf import settings
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from config.db import SCHEMAS_PER_STATEMENT, schema_batches

logger = structlog.get_logger(__name__)

CELERY_QUEUES = ("llm.light", "llm.standard", "llm.heavy", "default")
RQ_QUEUES = ("ingest", "default")
STATE_CACHE_SECONDS = 15
# kombu's Redis transport keeps a queue's messages of priority 0 under the queue's name and
# those of the other priority steps (3, 6, 9 by default) under name + "\x06\x16" + step
# (kombu.transport.redis.DEFAULT_PRIORITY_STEPS and Channel.sep).
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)

# Seconds. Model calls stream for seconds to minutes; the first token comes in milliseconds to
# seconds (prefill of a long prompt on a loaded server).
_CALL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

MODEL_CALL_SECONDS = Histogram(
    "portal_model_call_seconds", "Wall time of one model call (one endpoint attempt), seconds.",
    ["tier", "endpoint"], buckets=_CALL_BUCKETS,
)
MODEL_TTFT_SECONDS = Histogram(
    "portal_model_ttft_seconds", "Time from sending a model call to its first streamed token, seconds.",
    ["tier", "endpoint"], buckets=_TTFT_BUCKETS,
)
MODEL_TOKENS = Counter(
    "portal_model_tokens", "Tokens of model calls (estimated where the server sent no usage).",
    ["tier", "kind"],
)
TURNS = Counter("portal_turns", "Turns that reached a final state.", ["status", "error_code"])
BUDGET_BLOCKS = Counter("portal_budget_blocks", "Model calls refused by a budget or the plan's quota.", ["code"])
TOOL_CALLS = Counter("portal_tool_calls", "Tool calls the model made, by outcome.", ["tool", "status"])


def llm_call_record(*, tier: str, endpoint: str, seconds: float, ttft_seconds: float | None,
                    input_tokens: int, output_tokens: int) -> None:
    """Record one model call: its wall time and time to first token (``None`` when no token came)
    in seconds, and its prompt and completion tokens."""
    MODEL_CALL_SECONDS.labels(tier, endpoint).observe(seconds)
    if ttft_seconds is not None:
        MODEL_TTFT_SECONDS.labels(tier, endpoint).observe(ttft_seconds)
    if input_tokens:
        MODEL_TOKENS.labels(tier, "prompt").inc(input_tokens)
    if output_tokens:
        MODEL_TOKENS.labels(tier, "completion").inc(output_tokens)


def turn_finished(status: str, error_code: str = "") -> None:
    """Count a turn that reached ``status`` (completed, failed, cancelled) with ``error_code``."""
    TURNS.labels(str(status), error_code or "").inc()


def tool_call_counted(tool: str, status: str) -> None:
    """Count one tool call of ``tool`` ending ``status`` (ok, error, invalid, rejected)."""
    TOOL_CALLS.labels(tool, str(status)).inc()


def budget_block_counted(code: str) -> None:
    """Count one model call refused with ``code`` (``budget_exceeded`` or ``quota_exceeded``)."""
    BUDGET_BLOCKS.labels(code).inc()


# --- State at scrape time -----------------------------------------------------------------


def endpoint_health_key() -> str:
    """The Redis hash of model endpoint probes: field ``str(ModelEndpoint.pk)``, value JSON
    ``{"ok", "latency_ms", "checked_at", "name", "tier", "error"}`` (written by the staff
    operations page's probes)."""
    return f"{settings.CACHE_KEY_PREFIX}:endpoint-health"


def _celery_key_prefix() -> str:
    options: dict[str, Any] = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", None) or {}
    return str(options.get("global_keyprefix") or "")


@cache
def _broker_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def _celery_redis() -> redis.Redis:
    from config.redis import redis_client

    url = settings.CELERY_BROKER_URL
    return redis_client() if url == settings.REDIS_URL else _broker_client(url)


def celery_queue_depths() -> dict[str, int]:
    """Messages waiting in each Celery queue of ``CELERY_QUEUES`` (all priority steps summed),
    read with LLEN under the broker's ``global_keyprefix`` in one Redis round trip. Raises
    ``redis.RedisError`` when Redis is down."""
    prefix = _celery_key_prefix()
    pipe = _celery_redis().pipeline(transaction=False)
    for queue in CELERY_QUEUES:
        for step in _KOMBU_PRIORITY_STEPS:
            pipe.llen(f"{prefix}{queue}" if step == 0 else f"{prefix}{queue}{_KOMBU_PRIORITY_SEP}{step}")
    lengths = pipe.execute()
    per = len(_KOMBU_PRIORITY_STEPS)
    return {queue: int(sum(lengths[i * per:(i + 1) * per])) for i, queue in enumerate(CELERY_QUEUES)}


def queue_depths() -> dict[tuple[str, str], int]:
    """Messages waiting per queue: ``{(broker, queue): count}`` for the Celery queues
    (``celery_queue_depths``) and the RQ queues (LLEN of RQ's queue lists). Raises
    ``redis.RedisError`` when Redis is down."""
    from config.redis import redis_client

    out = {("celery", queue): n for queue, n in celery_queue_depths().items()}
    pipe = redis_client().pipeline(transaction=False)
    for queue in RQ_QUEUES:
        pipe.llen(f"rq:queue:{queue}")
    for queue, n in zip(RQ_QUEUES, pipe.execute(), strict=True):
        out[("rq", queue)] = int(n)
    return out


@dataclass(frozen=True)
class TenantState:
    """Knowledge documents by status and pending approvals summed over every tenant schema;
    ``oldest_pending_at``: the creation time of the oldest pending approval (epoch seconds)."""

    documents: dict[str, int]
    approvals_pending: int
    oldest_pending_at: float | None


def _tenant_schemas(cursor: Any, tables: tuple[str, ...]) -> list[str]:
    """Tenant schemas that have every table of ``tables`` (a schema being created has not yet)."""
    cursor.execute(
        "SELECT t.schema_name FROM tenants_tenant t"
        " WHERE t.schema_name <> 'public' AND ("
        "  SELECT count(*) FROM pg_catalog.pg_tables p"
        "  WHERE p.schemaname = t.schema_name AND p.tablename = ANY(%s)) = %s"
        " ORDER BY t.schema_name",
        [list(tables), len(tables)],
    )
    return [row[0] for row in cursor.fetchall()]




def tenant_state_read() -> TenantState:
    """Read ``TenantState`` from the database: one statement per ``SCHEMAS_PER_STATEMENT``
    tenant schemas (``UNION ALL`` of each schema's counts), after the one that lists them."""
    from django.db import connection
    from psycopg import sql

    from agents.models import ApprovalRequest
    from knowledge.models import Document

    documents_table, approvals_table = Document._meta.db_table, ApprovalRequest._meta.db_table
    documents: dict[str, int] = {}
    pending, oldest = 0, None
    with connection.cursor() as cursor:
        schemas = _tenant_schemas(cursor, (documents_table, approvals_table))
        for batch in schema_batches(schemas, SCHEMAS_PER_STATEMENT):
            parts = []
            for schema in batch:
                parts.append(sql.SQL(
                    "SELECT 'document' AS kind, status, count(*) AS n, NULL::timestamptz AS oldest FROM {}.{}"
                    " GROUP BY status"
                ).format(sql.Identifier(schema), sql.Identifier(documents_table)))
                parts.append(sql.SQL(
                    "SELECT 'approval', 'pending', count(*), min(created_at) FROM {}.{} WHERE status = 'pending'"
                ).format(sql.Identifier(schema), sql.Identifier(approvals_table)))
            cursor.execute(sql.SQL("SELECT kind, status, sum(n)::bigint, min(oldest) FROM ({}) AS s"
                                   " GROUP BY kind, status").format(sql.SQL(" UNION ALL ").join(parts)))
            for kind, status, n, first in cursor.fetchall():
                if kind == "document":
                    documents[str(status)] = documents.get(str(status), 0) + int(n)
                else:
                    pending += int(n)
                    if first is not None:
                        oldest = min(oldest, first.timestamp()) if oldest is not None else first.timestamp()
    return TenantState(documents=documents, approvals_pending=pending, oldest_pending_at=oldest)


def _state_cache_key() -> str:
    return "metrics:tenant-state"


def tenant_state() -> TenantState:
    """``TenantState``, from the cache when read within ``STATE_CACHE_SECONDS``."""
    from django.core.cache import cache

    cached = cache.get(_state_cache_key())
    if isinstance(cached, dict):
        return TenantState(**cached)
    state = tenant_state_read()
    cache.set(_state_cache_key(), {"documents": state.documents, "approvals_pending": state.approvals_pending,
                                   "oldest_pending_at": state.oldest_pending_at}, STATE_CACHE_SECONDS)
    return state


def tenant_state_forget() -> None:
    """Drop the cached ``TenantState`` (the next scrape reads the database)."""
    from django.core.cache import cache

    cache.delete(_state_cache_key())


def endpoint_health_read() -> dict[str, dict[str, Any]]:
    """The endpoint-health hash as ``{str(pk): probe dict}`` (values that are not JSON objects
    skipped). Raises ``redis.RedisError`` when Redis is down."""
    from config.redis import redis_client

    health: dict[str, dict[str, Any]] = {}
    for field, value in redis_client().hgetall(endpoint_health_key()).items():  # type: ignore[union-attr]  # a sync client
        try:
            probe = json.loads(value)
        except ValueError:
            continue
        if isinstance(probe, dict):
            health[field.decode() if isinstance(field, bytes) else str(field)] = probe
    return health


def endpoint_health() -> list[dict[str, Any]]:
    """The probed model endpoints: dicts with ``name``, ``tier`` and ``ok`` (bool), from
    ``endpoint_health_read``."""
    return [{"name": str(entry.get("name") or ""), "tier": str(entry.get("tier") or ""), "ok": bool(entry.get("ok"))}
            for entry in endpoint_health_read().values()]


DOCUMENT_STATUSES = ("pending", "processing", "indexed", "failed")


class StateCollector(Collector):
    """The scrape-time gauges. A source that fails (Redis or the database down) is logged and
    left out of that scrape; the others are still exposed."""

    def collect(self) -> Iterator[Metric]:
        """Yield ``portal_queue_depth``, ``portal_ingestion_documents``, ``portal_approvals_pending``,
        ``portal_approvals_oldest_pending_seconds`` and ``portal_model_endpoint_up``."""
        yield from self._guarded("queues", self._queues)
        yield from self._guarded("tenants", self._tenants)
        yield from self._guarded("endpoints", self._endpoints)

    @staticmethod
    def _guarded(source: str, read: Any) -> Iterable[Metric]:
        try:
            return list(read())
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one source did
            logger.warning("metrics_source_failed", source=source, error=repr(exc)[:300])
            return []

    @staticmethod
    def _queues() -> Iterator[Metric]:
        depth = GaugeMetricFamily("portal_queue_depth", "Messages waiting in a queue.", labels=["queue", "broker"])
        for (broker, queue), n in sorted(queue_depths().items()):
            depth.add_metric([queue, broker], n)
        yield depth

    @staticmethod
    def _tenants() -> Iterator[Metric]:
        state = tenant_state()
        documents = GaugeMetricFamily("portal_ingestion_documents",
                                      "Knowledge documents across tenants, by status.", labels=["status"])
        for status in sorted(set(DOCUMENT_STATUSES) | set(state.documents)):
            documents.add_metric([status], state.documents.get(status, 0))
        yield documents
        yield GaugeMetricFamily("portal_approvals_pending", "Approval requests waiting for a decision.",
                                value=state.approvals_pending)
        age = max(0.0, time.time() - state.oldest_pending_at) if state.oldest_pending_at is not None else 0.0
        yield GaugeMetricFamily("portal_approvals_oldest_pending_seconds",
                                "Age of the oldest pending approval request, seconds (0 when none).", value=age)

    @staticmethod
    def _endpoints() -> Iterator[Metric]:
        up = GaugeMetricFamily("portal_model_endpoint_up", "1 when the last probe of a model endpoint succeeded.",
                               labels=["endpoint", "tier"])
        for entry in sorted(endpoint_health(), key=lambda e: (e["tier"], e["name"])):
            up.add_metric([entry["name"], entry["tier"]], 1 if entry["ok"] else 0)
        yield up


_state_registry = CollectorRegistry(auto_describe=False)
_state_registry.register(StateCollector())


def exposition() -> bytes:
    """The Prometheus text exposition for ``/metrics``: this process's registry (every process's,
    summed, with ``PROMETHEUS_MULTIPROC_DIR``) followed by the scrape-time state gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        events = generate_latest(registry)
    else:
        events = generate_latest(REGISTRY)
    return events + generate_latest(_state_registry)
