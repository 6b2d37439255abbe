"""The ingestion pipeline: extract -> chunk -> embed in batches -> store -> ``indexed``.

``ingest_documents`` serves both the RQ job (one document) and bulk imports (many): documents
are prepared one by one, their chunks are embedded together in large batches (the encoder is
the bottleneck and batches of tiny documents would waste it), and each document is stored in
its own transaction (chunks, vectors, postings, collection statistics, status, usage event), so
a failure never leaves a half-indexed document.

Progress is written as it goes (outside that transaction, so pages and the API see it):
extraction and chunking take it to 20 %, embedding to 95 %, storing to 100 %.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from billing.models import UsageEvent
from billing.services import usage_event_record
from knowledge.chunking import ChunkDraft, chunk_text
from knowledge.embeddings import EmbeddingError, embedder
from knowledge.extraction import ExtractedText, ExtractionError, Section, extract
from knowledge.models import Collection, Document

logger = structlog.get_logger(__name__)

# Chunks embedded per encoder call; large enough to keep the encoder busy, small enough that
# progress moves every few seconds on a CPU.
EMBED_GROUP = 256

ProgressCallback = Callable[[int, int], None]


@dataclass
class Prepared:
    document: Document
    drafts: list[ChunkDraft]
    extracted: ExtractedText


def _progress(document_id: int, percent: int, **fields: object) -> None:
    now = timezone.now()
    Document.objects.filter(pk=document_id).update(progress=percent, heartbeat_at=now, updated_at=now, **fields)


def document_fail(document_id: int, message: str) -> None:
    """Mark a document ``failed`` with a reason a user can read."""
    now = timezone.now()
    Document.objects.filter(pk=document_id).update(
        status=Document.Status.FAILED, error_message=message[:2000], updated_at=now, heartbeat_at=now
    )
    logger.info("document_failed", document=document_id, reason=message[:200])


def _source(document: Document) -> tuple[str, bytes]:
    if document.source_text:
        return "record", document.source_text.encode()
    with document.file.open("rb") as handle:
        return document.metadata.get("kind", "text"), handle.read()


def _extract(document: Document) -> ExtractedText:
    kind, data = _source(document)
    if kind == "record":
        text = data.decode()
        extracted = ExtractedText(text=text, sections=[Section((), 0, len(text))])
        if not text.strip():
            raise ExtractionError("The record has no text to index.", code="no_text")
        return extracted
    return extract(kind, data)


def prepare(document: Document, collection: Collection) -> Prepared:
    """Extract and chunk ``document`` (status ``processing``). Raises ``ExtractionError``."""
    _progress(document.pk, 5, status=Document.Status.PROCESSING, started_at=timezone.now(), error_message="")
    extracted = _extract(document)
    title = document.title
    if document.metadata.get("title_from_content") and extracted.title:
        title = extracted.title[:500]
        Document.objects.filter(pk=document.pk).update(title=title)
        document.title = title
    model = embedder()
    drafts = chunk_text(extracted, title=title, tokenizer=model.tokenizer(),
                        chunk_tokens=min(collection.chunk_size_tokens, model.max_tokens),
                        overlap_tokens=collection.chunk_overlap_tokens, max_tokens=model.max_tokens)
    if not drafts:
        raise ExtractionError("The document produced no chunks to index.", code="no_text")
    if len(drafts) > 40 or extracted.page_count:
        # Worth a visible step only for documents that take a while to embed.
        _progress(document.pk, 20, page_count=extracted.page_count)
    return Prepared(document, drafts, extracted)


# A document's chunks arrive by binary COPY in a temporary staging table (dropped again in the same
# transaction; a failure rolls its creation back), and one statement moves them into
# ``knowledge_chunk`` with their BM25 lengths already computed and writes their postings. Each
# chunk row is written once: setting ``lexeme_count`` by an UPDATE after the COPY made a second
# row version, which is a second insertion into every index of the table, the HNSW graph
# included, whenever it does not fit on the same page (measured on SciFact: 3,401 of 11,867
# chunks), and dead rows that autovacuum then removes from the HNSW graph again.
_STAGE_SQL = (
    "CREATE TEMPORARY TABLE _ingest_chunk_stage (ordinal int, text text, heading_path jsonb, page_number int, "
    "char_start int, char_end int, token_count int, embedding vector)"
)
_COPY_STAGE = (
    "COPY _ingest_chunk_stage (ordinal, text, heading_path, page_number, char_start, char_end, token_count, "
    "embedding) FROM STDIN (FORMAT BINARY)"
)
_COPY_TYPES = ["int4", "text", "jsonb", "int4", "int4", "int4", "int4", "vector"]

_INSERT_SQL = """
WITH terms AS (
    SELECT s.ordinal, t.lexeme, COALESCE(array_length(t.positions, 1), 1) AS tf
    FROM _ingest_chunk_stage s
    CROSS JOIN LATERAL unnest(to_tsvector(
        %(language)s::regconfig,
        %(title)s || ' ' || COALESCE((SELECT string_agg(h, ' ') FROM jsonb_array_elements_text(s.heading_path) h), '')
        || ' ' || s.text
    )) AS t
), lengths AS (
    SELECT ordinal, SUM(tf) AS len FROM terms GROUP BY ordinal
), chunks AS (
    INSERT INTO knowledge_chunk (collection_id, document_id, ordinal, text, heading_path, page_number, char_start,
                                 char_end, token_count, lexeme_count, embedding)
    SELECT %(collection)s, %(document)s, s.ordinal, s.text, s.heading_path, s.page_number, s.char_start, s.char_end,
           s.token_count, COALESCE(lengths.len, 0), s.embedding
    FROM _ingest_chunk_stage s LEFT JOIN lengths USING (ordinal)
    ORDER BY s.ordinal
    RETURNING id, ordinal, lexeme_count
), postings AS (
    INSERT INTO knowledge_posting (collection_id, chunk_id, lexeme, tf, chunk_len)
    SELECT %(collection)s, chunks.id, terms.lexeme, terms.tf, chunks.lexeme_count
    FROM terms JOIN chunks USING (ordinal)
    RETURNING tf
)
SELECT COALESCE(SUM(tf), 0) FROM postings
"""


def chunks_delete(document_id: int) -> tuple[int, int]:
    """Delete a document's chunks and postings with set-based SQL (Django's cascade would load
    every posting into memory). Returns ``(chunks, lexemes)`` removed, for the statistics."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM knowledge_posting WHERE chunk_id IN (SELECT id FROM knowledge_chunk WHERE document_id = %s)",
            [document_id],
        )
        cursor.execute("DELETE FROM knowledge_chunk WHERE document_id = %s RETURNING lexeme_count", [document_id])
        rows = cursor.fetchall()
    return len(rows), int(sum(r[0] for r in rows))


_vector_types: dict[str, Any] = {}


def _insert_chunks(collection: Collection, document: Document, drafts: list[ChunkDraft], vectors: np.ndarray) -> int:
    """Write a document's chunks, vectors and postings in the caller's transaction; return the
    number of stemmed terms written (the sum of the chunks' ``lexeme_count``).

    The chunks travel by binary COPY with vectors in pgvector's binary format (pgvector's
    psycopg adapter on this one cursor only, so the rest of Django keeps its own vector
    handling): formatting 384 floats as text per chunk, as an INSERT through the ORM does,
    costs more than storing them.
    """
    from pgvector.psycopg.vector import register_vector_info
    from psycopg.types import TypeInfo

    raw_connection = connection.connection
    assert raw_connection is not None
    database = str(connection.settings_dict["NAME"])
    if database not in _vector_types:
        _vector_types[database] = TypeInfo.fetch(raw_connection, "vector")
    with raw_connection.cursor() as cursor:
        register_vector_info(cursor, _vector_types[database])
        cursor.execute(_STAGE_SQL)
        with cursor.copy(_COPY_STAGE) as copy:
            copy.set_types(_COPY_TYPES)
            for draft, vector in zip(drafts, vectors, strict=True):
                copy.write_row((draft.ordinal, draft.text, list(draft.heading_path), draft.page_number,
                                draft.char_start, draft.char_end, draft.token_count, vector))
        cursor.execute(_INSERT_SQL, {"language": collection.language, "title": document.title,
                                     "collection": collection.pk, "document": document.pk})
        row = cursor.fetchone()
        cursor.execute("DROP TABLE _ingest_chunk_stage")
    return int(row[0]) if row else 0


def store(prepared: Prepared, vectors: np.ndarray, tokens: int, collection: Collection) -> Document:
    """Replace the document's chunks with the new ones, in one transaction, and mark it
    ``indexed``. Returns the updated document; raises ``Document.DoesNotExist`` if it was
    deleted meanwhile."""
    document = prepared.document
    with transaction.atomic():
        # Only what this reads: a JSONL record's row carries its whole text.
        locked = Document.objects.select_for_update().only("pk", "chunk_count", "metadata").get(pk=document.pk)
        # Chunks exist only for a document indexed before (its count is kept in step).
        old_chunks, old_lexemes = chunks_delete(document.pk) if locked.chunk_count else (0, 0)
        lexemes = _insert_chunks(collection, document, prepared.drafts, vectors)
        Collection.objects.filter(pk=collection.pk).update(
            chunk_count=F("chunk_count") + len(prepared.drafts) - old_chunks,
            lexeme_total=F("lexeme_total") + lexemes - old_lexemes,
            updated_at=timezone.now(),
        )
        now = timezone.now()
        metadata = dict(locked.metadata)
        if prepared.extracted.warnings:
            metadata["warnings"] = prepared.extracted.warnings
        Document.objects.filter(pk=document.pk).update(
            status=Document.Status.INDEXED, progress=100, chunk_count=len(prepared.drafts), indexed_at=now,
            updated_at=now, heartbeat_at=now, error_message="", metadata=metadata,
        )
        usage_event_record(kind=UsageEvent.Kind.EMBEDDING_TOKENS, quantity=tokens, model=embedder().name,
                           metadata={"document_id": document.pk, "chunks": len(prepared.drafts)})
    document.status, document.chunk_count, document.progress = Document.Status.INDEXED, len(prepared.drafts), 100
    return document


def _embed_prepared(group: list[Prepared], report: Callable[[Prepared, int], None]) -> list[tuple[np.ndarray, int]]:
    """Embed the chunks of ``group`` in calls of ``EMBED_GROUP``; return per-document
    ``(vectors, tokens)``. ``report(prepared, done_chunks)`` is called after each call.

    The chunks are ordered by length across the whole group before they are cut into calls, so
    each call (and each batch inside it) holds inputs of nearly one length and pads little, as
    one call over every text would; vectors are put back in document order.
    """
    model = embedder()
    texts = [d.embed_text for p in group for d in p.drafts]
    owners = np.array([i for i, p in enumerate(group) for _ in p.drafts], dtype=np.int64)
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    vectors = np.zeros((len(texts), model.dim), dtype=np.float32)
    tokens = np.zeros(len(group), dtype=np.int64)
    done = np.zeros(len(group), dtype=np.int64)
    for start in range(0, len(texts), EMBED_GROUP):
        rows = order[start:start + EMBED_GROUP]
        batch = model.embed([texts[i] for i in rows])
        vectors[rows] = batch.vectors
        # Split the call's token count over its documents by their share of characters.
        chars = np.bincount(owners[rows], weights=[len(texts[i]) for i in rows], minlength=len(group))
        if chars.sum():
            tokens += np.round(chars / chars.sum() * batch.tokens).astype(np.int64)
        done += np.bincount(owners[rows], minlength=len(group))
        for index, prepared in enumerate(group):
            report(prepared, int(done[index]))
    result = []
    offset = 0
    for index, prepared in enumerate(group):
        n = len(prepared.drafts)
        result.append((vectors[offset:offset + n], int(tokens[index])))
        offset += n
    return result


@dataclass
class IngestReport:
    """Counts, and wall-clock seconds per stage (prepare = extract + chunk, embed, store)."""

    indexed: int = 0
    failed: int = 0
    chunks: int = 0
    prepare_s: float = 0.0
    embed_s: float = 0.0
    store_s: float = 0.0


def ingest_documents(document_ids: Iterable[int], *, on_document: ProgressCallback | None = None,
                     group_chunks: int = 1024) -> IngestReport:
    """Index the given documents of the current schema; return how many succeeded.

    Documents are prepared, then embedded together once ``group_chunks`` chunks are waiting.
    Failures of one document (bad content, embedding endpoint down) mark that document
    ``failed`` with its reason and do not stop the others. ``on_document(done, total)`` is
    called after each stored or failed document (for progress bars).
    """
    ids = list(document_ids)
    report = IngestReport()
    # Everything this writes is derived from the stored source and rebuilt by re-indexing, and
    # the sweeper re-queues a job whose progress was lost, so commits need not wait for the WAL
    # flush: a crash can lose the last moments of work, never consistency (PostgreSQL manual,
    # "Asynchronous Commit"). One flush per document would otherwise cost more than storing it.
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
    try:
        return _ingest(ids, report, on_document, group_chunks)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")


def _ingest(ids: list[int], report: IngestReport, on_document: ProgressCallback | None,
            group_chunks: int) -> IngestReport:
    collections: dict[int, Collection] = {}
    pending: list[Prepared] = []
    pending_chunks = 0
    done = 0

    def finish(count: int) -> None:
        nonlocal done
        done += count
        if on_document is not None:
            on_document(done, len(ids))

    def store_group(group: list[Prepared], embedded: list[tuple[np.ndarray, int]]) -> None:
        started = time.perf_counter()
        for prepared, (vectors, tokens) in zip(group, embedded, strict=True):
            try:
                store(prepared, vectors, tokens, collections[prepared.document.collection_id])
            except Document.DoesNotExist:
                logger.info("document_deleted_while_indexing", document=prepared.document.pk)
            except Exception as exc:
                logger.exception("document_store_failed", document=prepared.document.pk)
                document_fail(prepared.document.pk,
                              f"Storing the index failed unexpectedly ({type(exc).__name__}); try re-indexing.")
                report.failed += 1
            else:
                report.indexed += 1
                report.chunks += len(prepared.drafts)
            finish(1)
        report.store_s += time.perf_counter() - started

    def flush() -> None:
        nonlocal pending, pending_chunks
        if not pending:
            return
        group, pending, pending_chunks = pending, [], 0

        def step(prepared: Prepared, chunks_done: int) -> None:
            n = len(prepared.drafts)
            if n > 40:  # large documents: move their bar while they embed
                _progress(prepared.document.pk, 20 + int(75 * chunks_done / n))

        started = time.perf_counter()
        try:
            embedded = _embed_prepared(group, step)
        except EmbeddingError as exc:
            for prepared in group:
                document_fail(prepared.document.pk, f"The embedding service failed: {exc}")
            report.failed += len(group)
            finish(len(group))
            return
        finally:
            report.embed_s += time.perf_counter() - started
        store_group(group, embedded)

    for document in Document.objects.filter(pk__in=ids).order_by("pk").iterator(chunk_size=200):
        collection = collections.get(document.collection_id)
        if collection is None:
            collection = collections[document.collection_id] = Collection.objects.get(pk=document.collection_id)
        started = time.perf_counter()
        try:
            prepared = prepare(document, collection)
        except ExtractionError as exc:
            document_fail(document.pk, exc.message)
            report.failed += 1
            finish(1)
            continue
        except Exception as exc:
            logger.exception("document_prepare_failed", document=document.pk)
            document_fail(document.pk, f"Indexing failed unexpectedly ({type(exc).__name__}); try re-indexing.")
            report.failed += 1
            finish(1)
            continue
        report.prepare_s += time.perf_counter() - started
        pending.append(prepared)
        pending_chunks += len(prepared.drafts)
        if pending_chunks >= group_chunks:
            flush()
    flush()
    return report


def record_text(record: dict[str, object]) -> str:
    """The text of a JSONL record (``text``, else the whole record as JSON)."""
    text = record.get("text")
    return text if isinstance(text, str) else json.dumps(record, ensure_ascii=False)
