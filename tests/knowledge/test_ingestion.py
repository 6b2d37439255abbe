"""Uploads and the ingestion pipeline: storage, dedupe, bad inputs, progress, re-index, delete."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.db import connection
from django.utils import timezone
from rq.worker import SimpleWorker

from billing.models import UsageEvent
from compliance.models import AuditEvent
from config.errors import PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from knowledge.jobs import documents_ingest_job
from knowledge.models import Chunk, Collection, Document, Posting
from knowledge.retrieval import chunk_search
from knowledge.services import document_delete, document_reindex, document_upload
from knowledge.tasks import documents_sweep
from tenants.principal import Principal
from tests.conftest import World
from tests.knowledge.conftest import docx_bomb, docx_bytes, pdf_with_stream, truncated

HANDBOOK = b"""# Employee handbook

## Leave

Every employee has twenty-five days of paid leave a year. Unused days expire at the end of March.

## Expenses

Submit expense reports within thirty days. Receipts above fifty euros need a manager's approval.
"""


def _system(world: World) -> Principal:
    return Principal.system("t", tenant=world.tenant_a)


def _upload(world: World, collection: Collection, name: str, data: bytes, **kwargs: Any):  # type: ignore[no-untyped-def]
    return document_upload(principal=_system(world), collection=collection, filename=name, data=data,
                           queue=False, **kwargs)


def _index(document_ids: list[int]) -> None:
    documents_ingest_job(connection.schema_name, document_ids)  # type: ignore[attr-defined]


def test_a_markdown_upload_is_chunked_embedded_and_searchable(world: World, collection_a: Collection) -> None:
    result = _upload(world, collection_a, "handbook.md", HANDBOOK)
    document = result.created[0]
    assert document.status == "pending" and document.title == "handbook"
    _index([document.pk])
    document.refresh_from_db()
    assert document.status == "indexed" and document.progress == 100
    assert document.title == "Employee handbook"
    chunks = list(Chunk.objects.filter(document=document).order_by("ordinal"))
    assert len(chunks) == document.chunk_count >= 1
    assert any(c.heading_path == ["Employee handbook", "Leave"] for c in chunks)
    assert all(len(c.embedding) == 384 for c in chunks)
    assert Posting.objects.filter(chunk__document=document, lexeme="leav").exists()  # English stem of "leave"
    collection_a.refresh_from_db()
    assert collection_a.chunk_count == len(chunks)
    assert collection_a.lexeme_total == sum(c.lexeme_count for c in chunks) > 0
    usage = UsageEvent.objects.get(kind="embedding.tokens")
    assert usage.quantity > 0 and usage.metadata["document_id"] == document.pk
    assert AuditEvent.objects.filter(action="document.uploaded", target_id=str(document.pk)).exists()


def _chunk_row_writes() -> tuple[int, int]:
    """(rows inserted, rows updated) in ``knowledge_chunk`` by this transaction so far."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables "
                       "WHERE schemaname = current_schema() AND relname = 'knowledge_chunk'")
        row = cursor.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def test_each_chunk_row_is_written_once_with_the_length_its_postings_carry(world: World,
                                                                          collection_a: Collection) -> None:
    inserted, updated = _chunk_row_writes()
    document = _upload(world, collection_a, "handbook.md", HANDBOOK).created[0]
    _index([document.pk])
    document.refresh_from_db()
    # An UPDATE after the insert would be a second row version: a second entry in every index
    # of the table, the HNSW graph included.
    assert _chunk_row_writes() == (inserted + document.chunk_count, updated)
    for chunk in Chunk.objects.filter(document=document):
        postings = list(Posting.objects.filter(chunk=chunk))
        assert chunk.lexeme_count == sum(p.tf for p in postings) > 0
        assert {p.chunk_len for p in postings} == {chunk.lexeme_count}
        assert {p.collection_id for p in postings} == {collection_a.pk}
        assert {p.pk for p in postings} == {(chunk.pk, p.lexeme) for p in postings}


def test_a_chunk_has_one_posting_per_term(world: World, collection_a: Collection) -> None:
    from django.db import IntegrityError, transaction

    document = _upload(world, collection_a, "handbook.md", HANDBOOK).created[0]
    _index([document.pk])
    posting = Posting.objects.filter(chunk__document=document, lexeme="leav").get()
    with pytest.raises(IntegrityError), transaction.atomic():
        Posting.objects.create(collection_id=collection_a.pk, chunk_id=posting.chunk_id, lexeme="leav", tf=1,
                               chunk_len=posting.chunk_len)


def test_the_same_bytes_twice_return_the_existing_document(world: World, collection_a: Collection) -> None:
    first = _upload(world, collection_a, "handbook.md", HANDBOOK).created[0]
    again = _upload(world, collection_a, "copy-of-handbook.md", HANDBOOK)
    assert again.created == [] and [d.pk for d in again.duplicates] == [first.pk]
    assert Document.objects.filter(collection=collection_a).count() == 1


def test_a_jsonl_file_with_a_bad_line_ingests_the_good_lines(world: World, collection_a: Collection) -> None:
    lines = [
        json.dumps({"_id": "a1", "title": "Leave", "text": "Twenty-five days of paid leave."}),
        '{"_id": "a2", "title": "Broken", "text": ',  # line 2: cut off
        json.dumps({"_id": "a3", "title": "Expenses", "text": "Submit reports within thirty days."}),
        json.dumps({"title": "No id", "text": "orphan"}),  # line 4
        json.dumps({"_id": "a5", "title": "Empty"}),  # line 5: no text
        json.dumps({"_id": "a1", "text": "duplicate id in the file"}),  # line 6
    ]
    result = _upload(world, collection_a, "records.jsonl", "\n".join(lines).encode())
    assert sorted(d.external_id for d in result.created) == ["a1", "a3"]
    assert [e["line"] for e in result.line_errors] == [2, 4, 5, 6]
    assert "not valid JSON" in result.line_errors[0]["error"]
    _index([d.pk for d in result.created])
    assert set(Document.objects.filter(collection=collection_a).values_list("status", flat=True)) == {"indexed"}


def test_a_jsonl_record_with_new_content_replaces_the_old(world: World, collection_a: Collection) -> None:
    first = _upload(world, collection_a, "r.jsonl", b'{"_id": "p1", "text": "Old policy text."}').created[0]
    _index([first.pk])
    again = _upload(world, collection_a, "r.jsonl", b'{"_id": "p1", "text": "New policy text."}')
    assert [d.pk for d in again.updated] == [first.pk]
    _index([first.pk])
    assert Chunk.objects.get(document=first).text == "New policy text."
    collection_a.refresh_from_db()
    assert collection_a.chunk_count == 1


@pytest.mark.parametrize(("name", "pdf", "code_words"), [
    ("libreoffice-writer-password.pdf", True, "password-protected"),
    ("imagemagick-images.pdf", True, "no text layer"),
])
def test_bad_pdfs_leave_a_failed_row_that_says_why(world: World, collection_a: Collection, corpus: Path,
                                                   name: str, pdf: bool, code_words: str) -> None:
    document = _upload(world, collection_a, name, (corpus / "pdf" / name).read_bytes()).created[0]
    _index([document.pk])
    document.refresh_from_db()
    assert document.status == "failed"
    assert code_words in document.error_message
    assert not Chunk.objects.filter(document=document).exists()


def test_the_repaired_pdf_is_indexed_with_a_warning(world: World, collection_a: Collection, corpus: Path) -> None:
    document = _upload(world, collection_a, "unreadablemetadata.pdf",
                       (corpus / "pdf" / "unreadablemetadata.pdf").read_bytes()).created[0]
    _index([document.pk])
    document.refresh_from_db()
    assert document.status == "indexed"
    assert any("damaged" in w for w in document.metadata["warnings"])


def test_a_truncated_docx_and_a_one_byte_html_fail_without_harming_others(
        world: World, collection_a: Collection) -> None:
    good = _upload(world, collection_a, "ok.md", HANDBOOK).created[0]
    bad_docx = _upload(world, collection_a, "cut.docx", truncated(docx_bytes([("Normal", "Hello " * 500)]))).created[0]
    tiny_html = _upload(world, collection_a, "tiny.html", b"<").created[0]
    _index([good.pk, bad_docx.pk, tiny_html.pk])
    statuses = dict(Document.objects.filter(collection=collection_a).values_list("original_filename", "status"))
    assert statuses == {"ok.md": "indexed", "cut.docx": "failed", "tiny.html": "failed"}
    assert "damaged or truncated" in Document.objects.get(pk=bad_docx.pk).error_message
    assert "no text" in Document.objects.get(pk=tiny_html.pk).error_message


def test_decompression_bombs_fail_with_the_reason_and_the_worker_indexes_the_next_files(
        world: World, collection_a: Collection) -> None:
    docx = _upload(world, collection_a, "bomb.docx", docx_bomb(10)).created[0]  # 10 MB of <w:p/> in 12 KB
    pdf = _upload(world, collection_a, "bomb.pdf",  # a content stream of 90 MB in 90 KB
                  pdf_with_stream(b"Hello", filler=b"0 0 m\n", repeat=15_000_000)).created[0]
    good_docx = _upload(world, collection_a, "ok.docx",
                        docx_bytes([("Normal", "Expenses are paid monthly.")])).created[0]
    good_pdf = _upload(world, collection_a, "ok.pdf", pdf_with_stream(b"Leave is booked online.")).created[0]
    _index([docx.pk, pdf.pk])
    _index([good_docx.pk, good_pdf.pk])  # the same worker process, after the bombs
    documents = {d.original_filename: d for d in Document.objects.filter(collection=collection_a)}
    assert {name: d.status for name, d in documents.items()} == {
        "bomb.docx": "failed", "bomb.pdf": "failed", "ok.docx": "indexed", "ok.pdf": "indexed"}
    assert "100 times its packed size" in documents["bomb.docx"].error_message
    assert "decompresses to more than 20 MB" in documents["bomb.pdf"].error_message
    assert "decompression bomb" in documents["bomb.pdf"].error_message


@pytest.mark.parametrize(("name", "data", "error", "code"), [
    ("empty.txt", b"", ValidationFailed, "empty_file"),
    ("blank.md", b"   \n\n ", ValidationFailed, "empty_file"),
    ("report.docx", b"%PDF-1.4 not really", UnsupportedMediaType, "extension_mismatch"),
    ("sheet.xlsx", b"PK\x03\x04whatever", UnsupportedMediaType, "unsupported_media_type"),
])
def test_uploads_that_cannot_be_documents_are_refused_and_nothing_is_stored(
        world: World, collection_a: Collection, name: str, data: bytes, error: type, code: str) -> None:
    with pytest.raises(error) as excinfo:
        _upload(world, collection_a, name, data)
    assert excinfo.value.code == code  # type: ignore[attr-defined]
    assert not Document.objects.exists()


def test_an_oversized_file_is_refused(world: World, collection_a: Collection, settings: Any) -> None:
    settings.KB_MAX_UPLOAD_MB = 1
    with pytest.raises(PayloadTooLarge):
        _upload(world, collection_a, "big.txt", b"word " * 300_000)
    assert not Document.objects.exists()


def test_reindexing_replaces_chunks_and_keeps_statistics_right(world: World, collection_a: Collection) -> None:
    document = _upload(world, collection_a, "handbook.md", HANDBOOK).created[0]
    _index([document.pk])
    before = list(Chunk.objects.filter(document=document).values_list("text", flat=True))
    collection_a.refresh_from_db()
    stats = (collection_a.chunk_count, collection_a.lexeme_total)
    document_reindex(principal=_system(world), document=document)
    assert Document.objects.get(pk=document.pk).status == "pending"
    _index([document.pk])
    assert list(Chunk.objects.filter(document=document).values_list("text", flat=True)) == before
    collection_a.refresh_from_db()
    assert (collection_a.chunk_count, collection_a.lexeme_total) == stats


def test_deleting_removes_chunks_postings_statistics_and_the_file(world: World, collection_a: Collection,
                                                                  django_capture_on_commit_callbacks: Any) -> None:
    from django.core.files.storage import default_storage

    document = _upload(world, collection_a, "handbook.md", HANDBOOK).created[0]
    _index([document.pk])
    name = document.file.name
    assert default_storage.exists(name)
    with django_capture_on_commit_callbacks(execute=True):
        document_delete(principal=_system(world), document=document)
    assert not Chunk.objects.filter(document_id=document.pk).exists()
    assert not Posting.objects.filter(collection=collection_a).exists()
    collection_a.refresh_from_db()
    assert (collection_a.chunk_count, collection_a.lexeme_total) == (0, 0)
    assert not default_storage.exists(name)
    assert AuditEvent.objects.filter(action="document.deleted", target_id=str(document.pk)).exists()


def test_the_upload_is_queued_and_an_rq_worker_indexes_it(world: World, collection_a: Collection,
                                                          django_capture_on_commit_callbacks: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from knowledge import embeddings
    from knowledge.jobs import IngestWorker

    warmed: list[bool] = []
    monkeypatch.setattr(embeddings, "embedder_warm", lambda: warmed.append(True))
    queue = django_rq.get_queue("ingest")
    queue.empty()
    # Jobs that an earlier run's worker left "started" on this Redis (killed mid-job) would be
    # cleaned up by the worker below, running their failure callbacks inside this test's
    # transaction against schemas that no longer exist.
    queue.connection.delete(queue.started_job_registry.key)
    with django_capture_on_commit_callbacks(execute=True):
        result = document_upload(principal=_system(world), collection=collection_a, filename="handbook.md",
                                 data=HANDBOOK)
    document = Document.objects.get(pk=result.created[0].pk)
    assert document.job_id and len(queue) == 1
    # ``manage.py rqworker``'s worker: jobs in the worker process (no fork that would take the
    # model with it), the model loading as the worker starts.
    worker = django_rq.get_worker("ingest")
    assert isinstance(worker, IngestWorker) and isinstance(worker, SimpleWorker)
    worker.work(burst=True)
    assert warmed == [True]
    document.refresh_from_db()
    assert document.status == "indexed" and document.attempts == 1


def test_the_sweeper_requeues_a_silent_job_and_fails_it_after_the_last_attempt(
        world: World, collection_a: Collection, django_capture_on_commit_callbacks: Any) -> None:
    document = _upload(world, collection_a, "handbook.md", HANDBOOK).created[0]
    long_ago = timezone.now() - dt.timedelta(hours=1)
    Document.objects.filter(pk=document.pk).update(status="processing", heartbeat_at=long_ago, attempts=1,
                                                   progress=40)
    queue = django_rq.get_queue("ingest")
    queue.empty()
    with django_capture_on_commit_callbacks(execute=True):
        assert documents_sweep() == {"requeued": 1, "failed": 0}
    document.refresh_from_db()
    assert document.status == "pending" and document.progress == 0 and len(queue) == 1
    Document.objects.filter(pk=document.pk).update(status="processing", heartbeat_at=long_ago, attempts=3)
    assert documents_sweep() == {"requeued": 0, "failed": 1}
    document.refresh_from_db()
    assert document.status == "failed" and "stopped unexpectedly 3 times" in document.error_message


def test_the_sweeper_leaves_live_and_recent_work_alone(world: World, collection_a: Collection) -> None:
    document = _upload(world, collection_a, "handbook.md", HANDBOOK).created[0]
    Document.objects.filter(pk=document.pk).update(status="processing", heartbeat_at=timezone.now())
    assert documents_sweep() == {"requeued": 0, "failed": 0}
    Document.objects.filter(pk=document.pk).update(status="pending", updated_at=timezone.now())
    assert documents_sweep() == {"requeued": 0, "failed": 0}


def _policies(n: int) -> list[bytes]:
    return [f"# Policy {i}\n\nRule {i}: receipts above {i * 10} euros need approval.\n".encode() for i in range(n)]


def test_documents_over_several_groups_end_indexed_in_order_each_with_its_own_vectors(
        world: World, collection_a: Collection) -> None:
    from knowledge.ingestion import ingest_documents

    ids = [_upload(world, collection_a, f"p{i}.md", data).created[0].pk for i, data in enumerate(_policies(7))]
    seen: list[tuple[int, int]] = []
    # Two chunks per group: seven one-chunk documents make four groups, each sorted by length
    # before it is embedded; the vectors must go back to the right documents.
    report = ingest_documents(ids, on_document=lambda done, total: seen.append((done, total)), group_chunks=2)
    assert (report.indexed, report.failed, report.chunks) == (7, 0, 7)
    assert seen == [(i, 7) for i in range(1, 8)]
    assert set(Document.objects.filter(pk__in=ids).values_list("status", "progress")) == {("indexed", 100)}
    for document_id in ids:  # each document got its own vectors, not a neighbour's
        text = Chunk.objects.get(document_id=document_id).text
        hits = chunk_search(query=text, collections=[collection_a], top_k=1, mode="vector", record_usage=False)
        assert hits[0].document_id == document_id


def test_documents_are_marked_processing_one_slice_at_a_time(
        world: World, collection_a: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    from knowledge import ingestion
    from knowledge.ingestion import pipeline, preparation

    ids = [_upload(world, collection_a, f"s{i}.md", data).created[0].pk for i, data in enumerate(_policies(5))]
    monkeypatch.setattr(pipeline, "START_SLICE", 2)
    real_prepare = ingestion.prepare
    seen: list[tuple[int, dict[int, str]]] = []

    def prepare(document: Document, collection: Collection) -> preparation.Prepared:
        seen.append((document.pk, dict(Document.objects.filter(pk__in=ids).values_list("pk", "status"))))
        return real_prepare(document, collection)

    monkeypatch.setattr(pipeline, "prepare", prepare)
    report = ingestion.ingest_documents([*reversed(ids), ids[0]], group_chunks=100)  # order and repeats do not matter
    assert (report.indexed, report.failed) == (5, 0)
    assert [pk for pk, _ in seen] == ids  # each document once, in id order
    # Preparing the third document: its slice (the 3rd and 4th) is processing, the 5th still pending.
    statuses = seen[2][1]
    assert [statuses[pk] for pk in ids] == ["processing", "processing", "processing", "processing", "pending"]
    started = Document.objects.filter(pk__in=ids).values_list("started_at", flat=True)
    assert all(started) and set(Document.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"indexed"}


def test_slow_documents_do_not_leave_the_rest_of_their_slice_looking_stalled(
        world: World, collection_a: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from knowledge import ingestion
    from knowledge.ingestion import pipeline, preparation

    ids = [_upload(world, collection_a, f"slow{i}.md", data).created[0].pk for i, data in enumerate(_policies(4))]
    monkeypatch.setattr(pipeline, "START_REFRESH_SECONDS", 0.05)
    real_prepare = ingestion.prepare
    ages: list[float] = []

    def slow_prepare(document: Document, collection: Collection) -> preparation.Prepared:
        heartbeat = Document.objects.get(pk=document.pk).heartbeat_at
        assert heartbeat is not None
        ages.append((timezone.now() - heartbeat).total_seconds())
        time.sleep(0.1)  # a long PDF
        return real_prepare(document, collection)

    monkeypatch.setattr(pipeline, "prepare", slow_prepare)
    assert ingestion.ingest_documents(ids).indexed == 4
    # One slice, marked again before each document once the mark is 50 ms old: no document
    # starts with a heartbeat older than that (unmarked, the fourth would start 0.3 s old).
    assert len(ages) == 4 and max(ages) < 0.08


def test_a_bulk_load_refreshes_the_planner_statistics(
        world: World, collection_a: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    from knowledge import ingestion
    from knowledge.ingestion import storage

    def posting_rows_estimate() -> float:
        with connection.cursor() as cursor:
            cursor.execute("SELECT reltuples FROM pg_class WHERE oid = 'knowledge_posting'::regclass")
            return float(cursor.fetchone()[0])

    ids = [_upload(world, collection_a, f"bulk{i}.md", data).created[0].pk for i, data in enumerate(_policies(6))]
    first, second = ids[:3], ids[3:]
    before = posting_rows_estimate()
    ingestion.ingest_documents(first)  # 3 chunks: below the minimum, no analyze
    assert posting_rows_estimate() == before
    monkeypatch.setattr(storage, "ANALYZE_MIN_CHUNKS", 3)
    ingestion.ingest_documents(second)  # 3 chunks, half the table: analyzed
    assert posting_rows_estimate() == Posting.objects.count() > 0
    # A run that adds little to what the planner already knows leaves it to autovacuum.
    assert storage._analyze_if_grown(3)
    monkeypatch.setattr(storage, "ANALYZE_FRACTION", 0.6)  # 3 chunks against 6 known
    assert not storage._analyze_if_grown(3)
    # Unless a collection it wrote to grew by that share of itself: a new collection always does.
    assert storage._grew_enough(0, 3) and not storage._grew_enough(3, 3)
    assert storage._analyze_if_grown(3, collection_grew=True)


def test_a_run_that_fills_a_new_collection_refreshes_its_statistics_in_a_large_tenant(
        world: World, collection_a: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    from knowledge import ingestion
    from knowledge.ingestion import storage

    ids = [_upload(world, collection_a, f"grow{i}.md", data).created[0].pk for i, data in enumerate(_policies(3))]
    monkeypatch.setattr(storage, "ANALYZE_MIN_CHUNKS", 3)
    with connection.cursor() as cursor:
        # The planner believes the table holds a million chunks: 3 more are far below 10 % of it.
        cursor.execute("UPDATE pg_class SET reltuples = 1e6 WHERE oid = 'knowledge_chunk'::regclass")
    ingestion.ingest_documents(ids)
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = 'knowledge_chunk'::regclass")
        assert float(cursor.fetchone()[0]) == Chunk.objects.count()


def test_an_embedding_failure_fails_its_group_only_and_says_why(world: World, collection_a: Collection,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from knowledge.embeddings import EmbeddingError, embedder
    from knowledge.ingestion import ingest_documents

    ids = [_upload(world, collection_a, f"p{i}.md", data).created[0].pk for i, data in enumerate(_policies(4))]
    model = embedder()
    real = model.embed
    calls = {"n": 0}

    def flaky(texts: list[str], **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise EmbeddingError("embedding endpoint failed: ReadTimeout")
        return real(texts, **kwargs)

    monkeypatch.setattr(model, "embed", flaky)
    report = ingest_documents(ids, group_chunks=2)
    assert (report.indexed, report.failed) == (2, 2)
    statuses = dict(Document.objects.filter(pk__in=ids).values_list("pk", "status"))
    assert [statuses[i] for i in ids] == ["indexed", "indexed", "failed", "failed"]
    failed = Document.objects.get(pk=ids[2])
    assert "The embedding service failed" in failed.error_message and "ReadTimeout" in failed.error_message
    assert Chunk.objects.filter(document_id__in=ids[2:]).count() == 0


def test_a_large_document_shows_its_embedding_progress(
        world: World, collection_a: Collection, monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    from knowledge import ingestion
    from knowledge.ingestion import pipeline, preparation

    body = "\n\n".join(f"## Section {i}\n\n" + f"Paragraph {i} explains the expense rules in detail. " * 12
                       for i in range(60))
    document = _upload(world, collection_a, "big.md", f"# Big\n\n{body}".encode()).created[0]
    settings.EMBEDDING_LOCAL_BATCH_SIZE = 8
    written: list[int] = []
    real = preparation._progress

    def spy(document_ids: list[int], percent: int, **fields: object) -> None:
        written.append(percent)
        real(document_ids, percent, **fields)

    for module in (preparation, pipeline):  # each module that writes progress looks the name up itself
        monkeypatch.setattr(module, "_progress", spy)
    batches: list[int] = []
    report = ingestion.ingest_documents([document.pk], on_chunks=batches.append)
    document.refresh_from_db()
    assert report.indexed == 1 and document.chunk_count > 40 and document.progress == 100
    embedding_steps = [p for p in written if 20 < p <= 95]
    assert len(embedding_steps) > 1 and embedding_steps == sorted(embedding_steps)
    # The finer-grained callback (kb_import's chunk bar): one call per encoder batch of 8.
    assert sum(batches) == document.chunk_count and max(batches) == 8
    assert len(batches) == -(-document.chunk_count // 8)


def test_outside_a_transaction_groups_are_stored_on_one_other_thread_in_the_tenant_schema(world: World) -> None:
    import threading

    from django.db import connections as db_connections
    from django_tenants.utils import schema_context

    from knowledge.ingestion.storage import _Storer

    seen: list[tuple[str, str, list[str]]] = []
    connections: list[Any] = []
    commit_modes: list[str] = []
    release = threading.Event()

    def store_group(group: list[str], embedded: list[Any]) -> None:
        if group == ["first"]:
            assert release.wait(10)  # the caller goes on while this group is stored
        own = db_connections["default"]  # this thread's connection (``connection`` is a proxy)
        seen.append((threading.current_thread().name, own.schema_name, group))  # type: ignore[attr-defined]
        connections.append(own)
        with own.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            commit_modes.append(cursor.fetchone()[0])
        if group == ["broken"]:
            raise RuntimeError("storing failed")

    # pytest-django runs each test in a transaction; ingestion outside one chooses the thread.
    with schema_context(world.tenant_a.schema_name):
        storer = _Storer(store_group, threaded=True)  # type: ignore[arg-type]
    storer.submit(["first"], [])  # type: ignore[list-item]
    assert seen == []  # submit returned while the group was still being stored
    release.set()
    storer.submit(["second"], [])  # type: ignore[list-item]  # waits for "first": one group in flight
    storer.submit(["broken"], [])  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="storing failed"):
        storer.close()
    assert [group for _, _, group in seen] == [["first"], ["second"], ["broken"]]
    assert {name.startswith("ingest-store") for name, _, _ in seen} == {True}
    assert {schema for _, schema, _ in seen} == {world.tenant_a.schema_name}
    assert commit_modes == ["off", "off", "off"]  # set up once, when the thread started
    # The store thread's own connection, not the test's, and closed at the end.
    assert connections[0] is not db_connections["default"] and connections[0].connection is None


def test_inside_a_transaction_groups_are_stored_on_the_calling_thread(world: World) -> None:
    import threading

    from knowledge.ingestion.storage import _Storer

    names: list[str] = []
    storer = _Storer(lambda group, embedded: names.append(threading.current_thread().name))
    storer.submit([], [])
    storer.close()
    assert names == [threading.current_thread().name]


def test_storing_a_document_deleted_meanwhile_writes_nothing(world: World, collection_a: Collection) -> None:
    from knowledge.embeddings import embedder
    from knowledge.ingestion import prepare, store

    document = _upload(world, collection_a, "gone.md", HANDBOOK).created[0]
    prepared = prepare(document, collection_a)
    vectors = embedder().embed([d.embed_text for d in prepared.drafts]).vectors
    Document.objects.filter(pk=document.pk).delete()
    with pytest.raises(Document.DoesNotExist):
        store(prepared, vectors, 10, collection_a)
    collection_a.refresh_from_db()
    assert Chunk.objects.filter(document_id=document.pk).count() == 0
    assert (collection_a.chunk_count, collection_a.lexeme_total) == (0, 0)
    assert not UsageEvent.objects.filter(kind="embedding.tokens").exists()


def test_a_document_that_gained_chunks_meanwhile_has_them_replaced(world: World, collection_a: Collection) -> None:
    from knowledge.embeddings import embedder
    from knowledge.ingestion import prepare, store

    document = _upload(world, collection_a, "twice.md", HANDBOOK).created[0]
    _index([document.pk])  # another job indexed it after this one loaded the row (chunk_count 0)
    collection_a.refresh_from_db()
    first = (collection_a.chunk_count, collection_a.lexeme_total)
    prepared = prepare(document, collection_a)
    assert prepared.document.chunk_count == 0  # the stale copy
    vectors = embedder().embed([d.embed_text for d in prepared.drafts]).vectors
    store(prepared, vectors, 10, collection_a)
    collection_a.refresh_from_db()
    assert Chunk.objects.filter(document_id=document.pk).count() == len(prepared.drafts) == first[0]
    assert (collection_a.chunk_count, collection_a.lexeme_total) == first
    assert UsageEvent.objects.filter(kind="embedding.tokens").count() == 2


def test_the_binary_statement_runs_in_the_tenant_schema_on_a_fresh_connection(world: World) -> None:
    import threading

    from django.db import connections as db_connections
    from django_tenants.utils import schema_context

    from knowledge.ingestion.storage import _execute

    schemas: list[str] = []

    def on_a_new_thread() -> None:  # a new thread has a connection of its own, not yet opened
        try:
            with schema_context(world.tenant_a.schema_name):
                schemas.append(_execute("SELECT current_schema()", {})[0])
        finally:
            db_connections["default"].close()

    thread = threading.Thread(target=on_a_new_thread)
    thread.start()
    thread.join(10)
    assert schemas == [world.tenant_a.schema_name]


def _submitted_groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes (documents) of the groups handed to the storer, in order, as ingestion runs."""
    from knowledge.ingestion import storage

    submitted: list[int] = []
    real_submit = storage._Storer.submit

    def submit(self: Any, group: Any, embedded: Any) -> None:
        submitted.append(len(group))
        real_submit(self, group, embedded)

    monkeypatch.setattr(storage._Storer, "submit", submit)
    return submitted


def test_the_encoder_gives_up_one_thread_only_while_a_group_is_being_stored() -> None:
    import torch

    from knowledge.ingestion.encoding import _EncoderThreads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = _EncoderThreads()
        assert threads.full == 2
        threads.update(True)
        assert torch.get_num_threads() == 1
        threads.update(True)
        assert torch.get_num_threads() == 1
        threads.update(False)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)  # one thread to begin with: nothing to give up
        single = _EncoderThreads()
        single.update(True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_storer_is_busy_only_while_its_thread_stores_a_group(world: World) -> None:
    import threading

    from django_tenants.utils import schema_context

    from knowledge.ingestion.storage import _Storer

    release = threading.Event()
    with schema_context(world.tenant_a.schema_name):
        storer = _Storer(lambda group, embedded: release.wait(10), threaded=True)  # type: ignore[arg-type, return-value]
    assert not storer.busy
    storer.submit([], [])
    assert storer.busy
    release.set()
    storer.wait()
    assert not storer.busy
    storer.close()


def test_ingestion_embeds_with_one_thread_fewer_while_storing_and_restores_them(
        world: World, collection_a: Collection, monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    import torch

    from knowledge import ingestion
    from knowledge.embeddings import embedder
    from knowledge.ingestion import storage

    ids = [_upload(world, collection_a, f"t{i}.md", data).created[0].pk for i, data in enumerate(_policies(4))]
    model = embedder()
    real_forward = model._forward  # type: ignore[attr-defined]
    threads_seen: list[int] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        threads_seen.append(torch.get_num_threads())
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "_forward", forward)
    # Inside the test's transaction groups are stored on this thread; a store in flight is
    # simulated from the second group on (the first group has nothing stored before it).
    submitted = _submitted_groups(monkeypatch)
    monkeypatch.setattr(storage._Storer, "busy", property(lambda self: bool(submitted)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings.EMBEDDING_LOCAL_BATCH_SIZE = 1  # one forward pass per chunk
        report = ingestion.ingest_documents(ids, group_chunks=2)  # two groups of two one-chunk documents
        assert report.indexed == 4 and submitted == [2, 2]
        # The first group has nothing being stored beside it; the second has the first.
        assert threads_seen == [2, 2, 1, 1]
        assert torch.get_num_threads() == 2  # restored when ingestion ends
    finally:
        torch.set_num_threads(before)


def _drafted(*chunk_counts: int) -> list[Any]:
    from types import SimpleNamespace

    return [SimpleNamespace(drafts=[None] * n, name=i) for i, n in enumerate(chunk_counts)]


def test_the_last_group_is_cut_into_parts_of_shrinking_size_keeping_documents_whole() -> None:
    from knowledge.ingestion.pipeline import TAIL_FRACTION, TAIL_MIN_CHUNKS, tail_parts

    group = _drafted(*([2, 3] * 320))  # 1,600 chunks
    parts = tail_parts(group)
    assert [p.name for part in parts for p in part] == [p.name for p in group]  # in order, each document once
    sizes = [sum(len(p.drafts) for p in part) for part in parts]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) >= 3
    left = 1600
    for size in sizes[:-1]:  # each part closes once it holds the fraction of what was left
        assert TAIL_FRACTION * left <= size < TAIL_FRACTION * left + 3
        left -= size
    assert sizes[-1] == left <= TAIL_MIN_CHUNKS
    # Small groups and single documents stay whole.
    small = _drafted(*([1] * 4 * TAIL_MIN_CHUNKS))
    assert tail_parts(small) == [small]
    one = _drafted(2000)
    assert tail_parts(one) == [one]
    # A long document at the end closes the part it falls in; nothing is left empty.
    mixed = _drafted(200, 100, 900)
    assert [[p.name for p in part] for part in tail_parts(mixed)] == [[0, 1, 2]]


def test_the_last_group_is_embedded_and_stored_in_parts_when_stores_run_on_the_second_thread(
        world: World, collection_a: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    from knowledge import ingestion
    from knowledge.ingestion import pipeline, storage

    ids = [_upload(world, collection_a, f"u{i}.md", data).created[0].pk for i, data in enumerate(_policies(7))]
    submitted = _submitted_groups(monkeypatch)
    monkeypatch.setattr(pipeline, "TAIL_MIN_CHUNKS", 1)  # a group over 4 chunks is cut
    # Inside the test's transaction the storer runs on this thread and the last group stays whole.
    report = ingestion.ingest_documents(ids[:5], group_chunks=100)
    assert report.indexed == 5 and submitted == [5]
    submitted.clear()
    monkeypatch.setattr(storage._Storer, "threaded", property(lambda self: True))
    report = ingestion.ingest_documents(ids[5:] + ids[:5], group_chunks=100)  # 2 new, 5 re-indexed
    # Seven one-chunk documents: 6 (>= 0.75 * 7), then the last one.
    assert report.indexed == 7 and submitted == [6, 1]
    assert Chunk.objects.filter(document_id__in=ids).count() == 7
    assert set(Document.objects.filter(pk__in=ids).values_list("status", "chunk_count")) == {("indexed", 1)}
