"""django-rq jobs for ingestion. Jobs carry the tenant's schema name and run inside it.

``manage.py rqworker`` runs ``IngestWorker`` (``RQ["WORKER_CLASS"]``): jobs run in the worker
process itself, with no fork per job, so the embedding model is loaded once per worker process
(when it starts) and kept. A worker that dies mid-job leaves the document ``processing``;
``knowledge.tasks.document_sweep`` notices the stale heartbeat and re-queues it (or fails it
after ``KB_INGEST_MAX_ATTEMPTS``).
"""

from __future__ import annotations

from typing import Any

import django_rq
import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django_tenants.utils import schema_context
from rq import Callback
from rq.worker import SimpleWorker

from knowledge.models import Document

logger = structlog.get_logger(__name__)


class IngestWorker(SimpleWorker):
    """The project's rq worker, django-rq's default here (``RQ["WORKER_CLASS"]``), so Procfile,
    Helm and a bare ``manage.py rqworker`` all run it.

    rq's default ``Worker`` forks a work horse per job: the model a job loads dies with the horse,
    and every job would load it again (about 6 s on a 2-vCPU machine). ``SimpleWorker`` runs jobs
    in the worker process; this class also starts loading the model when the worker starts
    (``embedder_warm``, off with ``EMBEDDING_PRELOAD=false``), so the first upload does not wait
    for it either.
    """

    def work(self, *args: Any, **kwargs: Any) -> bool:
        from knowledge.embeddings import embedder_warm

        embedder_warm()
        return bool(super().work(*args, **kwargs))


# One job for a whole import; the timeout grows with the number of documents.
BASE_TIMEOUT_SECONDS = 1800
PER_DOCUMENT_SECONDS = 30


def documents_ingest_job(schema: str, document_ids: list[int]) -> dict[str, int]:
    """RQ entry point: index ``document_ids`` of ``schema``. Returns the counts."""
    from knowledge.ingestion import ingest_documents

    structlog.contextvars.bind_contextvars(tenant_schema=schema, job="documents_ingest")
    try:
        with schema_context(schema):
            Document.objects.filter(pk__in=document_ids).update(attempts=F("attempts") + 1)
            report = ingest_documents(document_ids)
        return {"indexed": report.indexed, "failed": report.failed, "chunks": report.chunks}
    finally:
        structlog.contextvars.unbind_contextvars("tenant_schema", "job")


def _job_failed(job: Any, connection_: Any, exc_type: Any, exc_value: Any, traceback: Any) -> None:
    """RQ failure callback (timeouts, crashes in the job): fail the documents still unfinished."""
    from knowledge.ingestion import document_fail

    schema, document_ids = job.args
    with schema_context(schema):
        for document in Document.objects.filter(pk__in=document_ids, status__in=["pending", "processing"]):
            document_fail(document.pk, f"Indexing stopped: {exc_type.__name__ if exc_type else 'error'} "
                                       f"({exc_value}). Re-index to try again.")


def enqueue_ingest(document_ids: list[int]) -> None:
    """Queue ingestion of ``document_ids`` of the current schema once the transaction commits."""
    if not document_ids:
        return
    schema = connection.schema_name  # type: ignore[attr-defined]  # django-tenants' backend
    ids = list(document_ids)
    transaction.on_commit(lambda: _enqueue(schema, ids))


def _enqueue(schema: str, document_ids: list[int]) -> None:
    queue = django_rq.get_queue("ingest")
    job = queue.enqueue(
        documents_ingest_job, schema, document_ids,
        job_timeout=BASE_TIMEOUT_SECONDS + PER_DOCUMENT_SECONDS * len(document_ids),
        result_ttl=3600, failure_ttl=7 * 24 * 3600, on_failure=Callback(_job_failed),
    )
    with schema_context(schema):
        Document.objects.filter(pk__in=document_ids).update(job_id=job.id)
    logger.info("ingest_enqueued", schema=schema, documents=len(document_ids), job=job.id,
                queue_length=len(queue) if settings.DEBUG else None)
