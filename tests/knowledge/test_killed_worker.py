"""A worker killed in the middle of a job: the document is retried, never stuck.

Real processes: an ``rqworker`` subprocess indexes a 117-page PDF against the test database; it
is killed with SIGKILL once the embedding is under way; the sweeper notices the silent job and
re-queues it; a second worker finishes it. Rows are committed (a worker is another process), in a
tenant made for this test.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from django_tenants.utils import schema_context

from knowledge.jobs import _enqueue
from knowledge.models import Chunk, Document
from knowledge.services import collection_create, document_upload
from knowledge.tasks import documents_sweep
from tenants.principal import Principal
from tenants.services.provisioning import tenant_create

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _database_url() -> str:
    db = settings.DATABASES["default"]
    return f"postgresql://{db['USER']}@/{db['NAME']}?host={db['HOST']}&port={db['PORT']}"


def _start_worker(queue: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": _database_url(), "LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "rqworker", "--burst", queue],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_leaves_a_document_that_is_retried_to_completion(
        django_db_setup: Any, django_db_blocker: Any, corpus: Path) -> None:
    with django_db_blocker.unblock():
        slug = f"kill-{uuid.uuid4().hex[:8]}"
        tenant = tenant_create(actor=Principal.system("t"), slug=slug, name="Kill test",
                               owner_email="k@example.com").tenant
        schema = tenant.schema_name
        principal = Principal.system("t", tenant=tenant)
        with schema_context(schema):
            collection = collection_create(principal=principal, name="long")
            document = document_upload(principal=principal, collection=collection, filename="GeoTopo.pdf",
                                       data=(corpus / "pdf" / "GeoTopo-komprimiert.pdf").read_bytes(),
                                       queue=False).created[0]
        queue = django_rq.get_queue("ingest")
        queue.empty()

        def state() -> tuple[str, int]:
            with schema_context(schema):
                row = Document.objects.filter(pk=document.pk).values_list("status", "progress").get()
            connection.close()
            return row

        _enqueue(schema, [document.pk])
        worker = _start_worker("ingest")
        try:
            _wait(lambda: state()[0] == "processing" and state()[1] >= 25, 240, "embedding to start")
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        status, progress = state()
        assert status == "processing" and progress < 100, "killed before it finished"
        with schema_context(schema):
            assert not Chunk.objects.filter(document_id=document.pk).exists(), "nothing half-stored"
            # An hour later the sweeper finds the silent job and queues it again.
            outcome = documents_sweep(now=timezone.now() + dt.timedelta(hours=1))
        connection.close()
        assert outcome == {"requeued": 1, "failed": 0}
        assert state() == ("pending", 0)

        worker = _start_worker("ingest")
        try:
            _wait(lambda: state()[0] in ("indexed", "failed"), 300, "the retried job to finish")
        finally:
            worker.kill()
            worker.wait(10)
        with schema_context(schema):
            finished = Document.objects.get(pk=document.pk)
            assert finished.status == "indexed", finished.error_message
            assert finished.attempts == 2
            ordinals = list(Chunk.objects.filter(document_id=document.pk).values_list("ordinal", flat=True))
            assert ordinals == sorted(set(ordinals)) and len(ordinals) == finished.chunk_count > 100
        connection.close()
