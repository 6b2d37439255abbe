"""The Celery application, tenant-aware through tenant-schemas-celery.

A task sent while a tenant's schema is active carries the schema name in its headers and runs
in that schema on the worker, so tasks never need to pass tenant ids around by hand.
"""

from __future__ import annotations

import os

from celery import signals
from celery.schedules import crontab
from tenant_schemas_celery.app import CeleryApp

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = CeleryApp("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Bind request_id (propagated from the request that sent the task), task id and tenant to every
# log line a task writes.
from django_structlog.celery.steps import DjangoStructLogInitStep  # noqa: E402

app.steps["worker"].add(DjangoStructLogInitStep)


@app.on_after_configure.connect
def _beat_invoices(sender: CeleryApp, **kwargs: object) -> None:
    """Beat: draft last month's invoice in every tenant's schema (no ``tenant_schemas``: sent once
    per tenant) on the 1st at 12:00 UTC, when the 1st has begun in every timezone (UTC-12 to
    UTC+14), so "last month" is the same month for every tenant."""
    sender.conf.beat_schedule["billing-invoice-draft"] = {
        "task": "billing.invoice_draft_last_month",
        "schedule": crontab(minute=0, hour=12, day_of_month=1),
    }


@signals.worker_init.connect
@signals.beat_init.connect
def _telemetry_start(**kwargs: object) -> None:
    """Traces of the worker's tasks (``config.telemetry``; off unless ``OTEL_*`` asks). Senders
    (the web) set it up themselves; the Celery instrumentation joins each task to the trace of
    the request that sent it."""
    from config.telemetry import telemetry_setup

    telemetry_setup(service="portal-worker")


@signals.worker_shutdown.connect
def _telemetry_flush(**kwargs: object) -> None:
    from config.telemetry import telemetry_shutdown

    telemetry_shutdown()


@signals.worker_ready.connect
def _embedder_preload(**kwargs: object) -> None:
    """Load the embedding model when the worker starts: chat turns search the knowledge base,
    and the first one should not wait for the model (``embedder_warm``)."""
    from knowledge.embeddings import embedder_warm

    embedder_warm()

