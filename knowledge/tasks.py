"""Celery beat task: the ingestion sweeper. No document stays ``processing`` or ``pending``
forever: a job that died is re-queued, and after ``KB_INGEST_MAX_ATTEMPTS`` the document fails
with a reason."""

from __future__ import annotations

import datetime as dt

import structlog
from celery import shared_task
from django.conf import settings
from django.utils import timezone

from knowledge.ingestion import document_fail
from knowledge.jobs import enqueue_ingest
from knowledge.models import Document

logger = structlog.get_logger(__name__)

_LIVE_JOB_STATES = {"queued", "started", "deferred", "scheduled"}


def _job_alive(job_id: str) -> bool:
    if not job_id:
        return False
    import django_rq
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        job = Job.fetch(job_id, connection=django_rq.get_connection("ingest"))
    except NoSuchJobError:
        return False
    return str(job.get_status(refresh=True)) in _LIVE_JOB_STATES


def documents_sweep(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Sweep the current schema: re-queue or fail documents whose job is gone or silent.

    ``processing`` with no heartbeat for ``KB_INGEST_STALE_SECONDS``: the worker died (a job
    alive in RQ still reports progress). ``pending`` that long with no live RQ job: the job was
    lost (e.g. Redis restarted without persistence). Returns counts by outcome.
    """
    now = now or timezone.now()
    stale = now - dt.timedelta(seconds=settings.KB_INGEST_STALE_SECONDS)
    requeue: list[int] = []
    failed = 0
    silent = Document.objects.filter(status=Document.Status.PROCESSING, heartbeat_at__lt=stale)
    for document in silent.only("pk", "attempts", "title"):
        if document.attempts >= settings.KB_INGEST_MAX_ATTEMPTS:
            document_fail(document.pk, f"Indexing stopped unexpectedly {document.attempts} times (the worker "
                                       "was stopped or ran out of memory). Re-index to try again.")
            failed += 1
        else:
            requeue.append(document.pk)
    waiting = Document.objects.filter(status=Document.Status.PENDING, updated_at__lt=stale).only("pk", "job_id")
    requeue.extend(document.pk for document in waiting if not _job_alive(document.job_id))
    if requeue:
        Document.objects.filter(pk__in=requeue).update(status=Document.Status.PENDING, progress=0, updated_at=now,
                                                       heartbeat_at=None)
        enqueue_ingest(requeue)
    return {"requeued": len(requeue), "failed": failed}


@shared_task(name="knowledge.document_sweep", ignore_result=True)
def document_sweep() -> dict[str, int]:
    """Beat entry point. tenant-schemas-celery's scheduler sends it once per tenant, and it runs
    inside that tenant's schema."""
    outcome = documents_sweep()
    if any(outcome.values()):
        logger.info("documents_swept", **outcome)
    return outcome
