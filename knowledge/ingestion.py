"""The ingestion pipeline: extract -> chunk -> embed in batches -> store -> ``indexed``.

``ingest_documents`` serves both the RQ job (one document) and bulk imports (many): documents
are prepared one by one, their chunks are embedded together in large groups (the encoder is
the bottleneck and batches of tiny documents would waste it), and each document is stored in
its own transaction (chunks, vectors, postings, collection statistics, status, usage event), so
a failure never leaves a half-indexed document. A document's chunks are written by one statement
(re-indexing first removes the old ones in the same transaction); a group is stored on a second
thread while the next group is embedded, by one encoder thread fewer until it is stored
(``_EncoderThreads``).

Progress is written as it goes (outside that transaction, so pages and the API see it):
extraction and chunking take it to 20 %, embedding to 95 %, storing to 100 %.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from billing.models import UsageEvent
from billing.services import usage_event_values
from knowledge.chunking import ChunkDraft, chunk_text
from knowledge.embeddings import EmbeddingError, embedder
from knowledge.extraction import ExtractedText, ExtractionError, Section, extract
from knowledge.models import Collection, Document

logger = structlog.get_logger(__name__)

ProgressCallback = Callable[[int, int], None]
ChunkCallback = Callable[[int], None]


@dataclass
class Prepared:
    document: Document
    drafts: list[ChunkDraft]
    extracted: ExtractedText


def _progress(document_ids: list[int], percent: int, **fields: object) -> None:
    """Set the documents' progress (and ``fields``) and mark them alive now, in one statement."""
    now = timezone.now()
    Document.objects.filter(pk__in=document_ids).update(progress=percent, heartbeat_at=now, updated_at=now, **fields)


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


def documents_start(document_ids: list[int]) -> None:
    """Mark documents ``processing`` at 5 %, started and alive now, in one statement.

    ``_ingest`` marks each slice of ``START_SLICE`` documents as it reaches it, not each
    document as it prepares it: one UPDATE per document, each a round trip and a commit, cost
    2.4 ms of the 4.2 ms a SciFact abstract took to prepare, on the thread the encoder waits for
    (measured with cProfile on 550 documents).
    """
    _progress(document_ids, 5, status=Document.Status.PROCESSING, started_at=timezone.now(), error_message="")


# Documents marked ``processing`` together (``documents_start``): a slice of SciFact abstracts is
# prepared in about a second. Slow documents (long PDFs) can take longer than the sweeper's
# ``KB_INGEST_STALE_SECONDS`` for a slice, so the rest of a slice is marked again once its mark
# is ``START_REFRESH_SECONDS`` old.
START_SLICE = 200
START_REFRESH_SECONDS = 30.0


def prepare(document: Document, collection: Collection) -> Prepared:
    """Extract and chunk ``document`` (already marked ``processing`` by ``documents_start``).
    Raises ``ExtractionError``."""
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
        _progress([document.pk], 20, page_count=extracted.page_count)
    return Prepared(document, drafts, extracted)


# A document without chunks is indexed in one statement, so in one transaction and one round
# trip: lock its row (only while it has no chunks), write its chunks and their postings, add them
# to the collection's statistics, mark the document ``indexed`` and append its usage event.
# Returns whether the document was indexed (0, having written nothing, when it was deleted or
# gained chunks meanwhile). A statement per step, each waiting for its round trip, cost more
# than the writes themselves; re-indexing removes the old chunks first (``store``).
#
# The chunks travel as parallel arrays (vectors as a binary ``vector[]``). Each chunk row is
# written once, with its BM25 length already computed: setting ``lexeme_count`` by an UPDATE
# after the insert made a second row version, which is a second insertion into every index of
# the table, the HNSW graph included, whenever it does not fit on the same page (measured on
# SciFact: 3,401 of 11,867 chunks), and dead rows that autovacuum then removes from the HNSW
# graph again. (A temporary staging table filled by COPY did the same with three more statements
# per document, and creating and dropping it wrote and deleted a dozen catalog rows each time.)
_INDEX_SQL = """
WITH doc AS (
    SELECT id FROM knowledge_document WHERE id = %(document)s AND chunk_count = 0 FOR UPDATE
), stage AS (
    SELECT * FROM unnest(%(ordinals)s::int[], %(texts)s::text[], %(headings)s::text[], %(pages)s::int[],
                         %(starts)s::int[], %(ends)s::int[], %(tokens)s::int[], %(embeddings)b::vector[])
        AS s(ordinal, text, heading_path, page_number, char_start, char_end, token_count, embedding)
), terms AS (
    SELECT s.ordinal, t.lexeme, COALESCE(array_length(t.positions, 1), 1) AS tf
    FROM stage s
    CROSS JOIN LATERAL unnest(to_tsvector(
        %(language)s::regconfig,
        %(title)s || ' '
        || COALESCE((SELECT string_agg(h, ' ') FROM jsonb_array_elements_text(s.heading_path::jsonb) h), '')
        || ' ' || s.text
    )) AS t
), lengths AS (
    SELECT ordinal, SUM(tf) AS len FROM terms GROUP BY ordinal
), chunks AS (
    INSERT INTO knowledge_chunk (collection_id, document_id, ordinal, text, heading_path, page_number, char_start,
                                 char_end, token_count, lexeme_count, embedding)
    SELECT %(collection)s, %(document)s, s.ordinal, s.text, s.heading_path::jsonb, s.page_number, s.char_start,
           s.char_end, s.token_count, COALESCE(lengths.len, 0), s.embedding
    FROM stage s LEFT JOIN lengths USING (ordinal)
    WHERE EXISTS (SELECT 1 FROM doc)
    ORDER BY s.ordinal
    RETURNING id, ordinal, lexeme_count
), postings AS (
    INSERT INTO knowledge_posting (collection_id, chunk_id, lexeme, tf, chunk_len)
    SELECT %(collection)s, chunks.id, terms.lexeme, terms.tf, chunks.lexeme_count
    FROM terms JOIN chunks USING (ordinal)
), written AS (
    SELECT COUNT(*) AS chunks, COALESCE(SUM(lexeme_count), 0) AS lexemes FROM chunks
), statistics AS (
    UPDATE knowledge_collection c
    SET chunk_count = c.chunk_count + w.chunks, lexeme_total = c.lexeme_total + w.lexemes, updated_at = %(now)s
    FROM written w WHERE c.id = %(collection)s AND EXISTS (SELECT 1 FROM doc)
    RETURNING c.id
), indexed AS (
    UPDATE knowledge_document d
    SET status = %(status)s, progress = 100, chunk_count = w.chunks, indexed_at = %(now)s, updated_at = %(now)s,
        heartbeat_at = %(now)s, error_message = '', metadata = d.metadata || %(metadata)s::jsonb
    FROM written w WHERE d.id IN (SELECT id FROM doc)
    RETURNING d.id
), usage AS (
    INSERT INTO billing_usageevent (kind, quantity, unit, model, agent_id, session_id, turn_id, unit_price, cost,
                                    currency, request_id, metadata, created_at)
    SELECT %(u_kind)s, %(u_quantity)s, %(u_unit)s, %(u_model)s, %(u_agent_id)s, %(u_session_id)s, %(u_turn_id)s,
           %(u_unit_price)s, %(u_cost)s, %(u_currency)s, %(u_request_id)s, %(u_metadata)s::jsonb, %(u_created_at)s
    FROM doc
    RETURNING id
)
SELECT (SELECT COUNT(*) FROM indexed)
"""


def chunks_delete(document: Document) -> int:
    """Delete a document's chunks and postings with set-based SQL (Django's cascade would load
    every posting into memory), take them out of its collection's statistics (the N and average
    length of BM25) and set its ``chunk_count`` to 0. Returns the number of chunks removed. Run
    it in the transaction that holds the document's row lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM knowledge_posting WHERE chunk_id IN (SELECT id FROM knowledge_chunk WHERE document_id = %s)",
            [document.pk],
        )
        cursor.execute("DELETE FROM knowledge_chunk WHERE document_id = %s RETURNING lexeme_count", [document.pk])
        rows = cursor.fetchall()
    chunks, lexemes = len(rows), int(sum(r[0] for r in rows))
    Collection.objects.filter(pk=document.collection_id).update(
        chunk_count=F("chunk_count") - chunks, lexeme_total=F("lexeme_total") - lexemes, updated_at=timezone.now())
    Document.objects.filter(pk=document.pk).update(chunk_count=0)
    return chunks


_vector_types: dict[str, Any] = {}


def _chunk_params(collection: Collection, document: Document, drafts: list[ChunkDraft],
                  vectors: np.ndarray) -> dict[str, Any]:
    return {
        "ordinals": [d.ordinal for d in drafts], "texts": [d.text for d in drafts],
        "headings": [json.dumps(list(d.heading_path), ensure_ascii=False) for d in drafts],
        "pages": [d.page_number for d in drafts], "starts": [d.char_start for d in drafts],
        "ends": [d.char_end for d in drafts], "tokens": [d.token_count for d in drafts],
        "embeddings": list(np.ascontiguousarray(vectors, dtype=np.float32)),
        "language": collection.language, "title": document.title,
        "collection": collection.pk, "document": document.pk,
    }


def _execute(sql: str, params: dict[str, Any]) -> Any:
    """Run ``sql`` on Django's connection with a server-side binding psycopg cursor and
    pgvector's binary adapter; return its first row.

    Django's own cursors bind parameters into the SQL text, which would format every vector as
    384 decimal numbers; here the arrays travel as parameters and vectors in binary (pgvector's
    adapter on this one cursor only, so the rest of Django keeps its own vector handling).
    """
    import psycopg
    from pgvector.psycopg.vector import register_vector_info
    from psycopg.types import TypeInfo

    # A Django cursor first: django-tenants points the connection's search_path at the current
    # tenant's schema when it hands one out, and a bare psycopg cursor would skip that.
    with connection.cursor():
        raw_connection = connection.connection
        assert raw_connection is not None
        database = str(connection.settings_dict["NAME"])
        if database not in _vector_types:
            _vector_types[database] = TypeInfo.fetch(raw_connection, "vector")
        with psycopg.Cursor(raw_connection) as cursor:
            register_vector_info(cursor, _vector_types[database])  # type: ignore[arg-type]  # any adapt context
            cursor.execute(sql, params)
            return cursor.fetchone()


def _index_new(prepared: Prepared, vectors: np.ndarray, tokens: int, collection: Collection) -> bool:
    """Index a document that has no chunks in one statement (``_INDEX_SQL``); return False,
    having written nothing, when the document is gone or has chunks by now."""
    document = prepared.document
    params = _chunk_params(collection, document, prepared.drafts, vectors)
    usage = usage_event_values(kind=UsageEvent.Kind.EMBEDDING_TOKENS, quantity=tokens, model=embedder().name,
                               metadata={"document_id": document.pk, "chunks": len(prepared.drafts)})
    params.update({f"u_{k}": v for k, v in usage.items()})
    params["u_metadata"] = json.dumps(usage["metadata"])
    params.update(now=timezone.now(), status=Document.Status.INDEXED,
                  metadata=json.dumps({"warnings": prepared.extracted.warnings} if prepared.extracted.warnings else {}))
    if connection.in_atomic_block:
        with transaction.atomic():  # a savepoint: a failure must not abort the caller's transaction
            row = _execute(_INDEX_SQL, params)
    else:
        # Autocommit: the statement is its own transaction.
        row = _execute(_INDEX_SQL, params)
    return bool(row and row[0])


def store(prepared: Prepared, vectors: np.ndarray, tokens: int, collection: Collection) -> Document:
    """Replace the document's chunks with the new ones, in one transaction, and mark it
    ``indexed``. Returns the updated document; raises ``Document.DoesNotExist`` if it was
    deleted meanwhile.

    A document without chunks (the common case) takes one statement (``_INDEX_SQL``). A
    document indexed before (re-indexing, or a second copy of a job that got there first) has
    its old chunks removed from the index and the statistics first, in the same transaction,
    and then takes the same statement.
    """
    document = prepared.document
    if document.chunk_count or not _index_new(prepared, vectors, tokens, collection):
        with transaction.atomic():
            # Only what this reads: a JSONL record's row carries its whole text.
            locked = Document.objects.select_for_update().only("pk", "collection_id", "chunk_count").get(
                pk=document.pk)
            if locked.chunk_count:
                chunks_delete(locked)
            if not _index_new(prepared, vectors, tokens, collection):  # the row is locked without chunks
                raise RuntimeError(f"document {document.pk} could not be indexed after its chunks were removed")
    document.status, document.chunk_count, document.progress = Document.Status.INDEXED, len(prepared.drafts), 100
    return document


def _embed_prepared(group: list[Prepared], report: Callable[[Prepared, int], None],
                    on_chunks: ChunkCallback | None = None) -> list[tuple[np.ndarray, int]]:
    """Embed the chunks of ``group`` in one encoder call; return per-document ``(vectors,
    tokens)``. ``report(prepared, done_chunks)`` is called after each encoder batch for the
    documents that batch advanced, and ``on_chunks(n)`` with the batch's number of chunks.

    One call over the whole group lets the encoder sort every chunk of it by token count, so its
    batches pad little. Padding on SciFact's 11,867 chunks (2,125,678 tokens): one call over all
    of them 0.3 %, one call per group of 2,048 chunks 1.8 %, of 1,024 3.4 %; calls of 256 chunks
    cut from groups of 1,024 (before) 8.5 %.
    """
    model = embedder()
    texts = [d.embed_text for p in group for d in p.drafts]
    owners = np.array([i for i, p in enumerate(group) for _ in p.drafts], dtype=np.int64)
    done = np.zeros(len(group), dtype=np.int64)

    def on_batch(rows: np.ndarray) -> None:
        advanced = np.bincount(owners[rows], minlength=len(group))
        done[:] += advanced
        for index in np.flatnonzero(advanced):
            report(group[index], int(done[index]))
        if on_chunks is not None:
            on_chunks(len(rows))

    batch = model.embed(texts, on_batch=on_batch)
    tokens = np.bincount(owners, weights=batch.text_tokens, minlength=len(group)).astype(np.int64)
    result = []
    offset = 0
    for index, prepared in enumerate(group):
        n = len(prepared.drafts)
        result.append((batch.vectors[offset:offset + n], int(tokens[index])))
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
                     on_chunks: ChunkCallback | None = None, group_chunks: int = 2048) -> IngestReport:
    """Index the given documents of the current schema; return how many succeeded.

    Documents are prepared, then embedded together once ``group_chunks`` chunks are waiting
    (one encoder call: the larger the group, the less its batches pad, see ``_embed_prepared``),
    and stored while the next group is embedded (``_Storer``). Failures of one document (bad
    content, embedding endpoint down) mark that document ``failed`` with its reason and do not
    stop the others. ``on_document(done, total)`` is called after each stored or failed
    document (for progress bars), from the thread that stored it; ``on_chunks(n)`` after each
    encoder batch, with its number of chunks, from the calling thread (a document is only done
    once its whole group is embedded and stored, which for a group of 2,048 chunks takes about a
    minute on two cores: this is the finer-grained progress).
    """
    ids = list(document_ids)
    report = IngestReport()
    _commit_asynchronously()
    try:
        _ingest(ids, report, on_document, on_chunks, group_chunks)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")
    _analyze_if_grown(report.chunks)
    return report


# A run that added at least ANALYZE_MIN_CHUNKS chunks and ANALYZE_FRACTION of the chunk table
# refreshes the planner's statistics itself: autovacuum's own rule (autovacuum_analyze_threshold
# 50, autovacuum_analyze_scale_factor 0.1), applied at once instead of at its next round.
ANALYZE_MIN_CHUNKS = 50
ANALYZE_FRACTION = 0.1


def _analyze_if_grown(added_chunks: int) -> bool:
    """``ANALYZE`` the chunk and posting tables of the current schema when ``added_chunks`` is a
    large part of them (the rule above); return whether it did (PostgreSQL's manual, "Populating
    a Database": run ANALYZE afterwards).

    Until autovacuum analyzes them (up to a minute or two later), the planner keeps the
    statistics from before the load: measured after importing 200 SciFact abstracts into the
    demo tenant, it estimated 1 posting row for the new collection, merge-joined all 26,354 of
    them, and a hybrid search's keyword statement took 45-75 ms; after the analyze, 3.2 ms.
    """
    if added_chunks < ANALYZE_MIN_CHUNKS:
        return False
    with connection.cursor() as cursor:
        # The table's size as the planner knows it (-1: never analyzed).
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = 'knowledge_chunk'::regclass")
        known = float(cursor.fetchone()[0])
        if added_chunks < ANALYZE_FRACTION * known:
            return False
        cursor.execute("ANALYZE knowledge_chunk, knowledge_posting")
    return True


def _commit_asynchronously() -> None:
    """Let this thread's connection commit without waiting for the WAL flush.

    Everything ingestion writes is derived from the stored source and rebuilt by re-indexing, and
    the sweeper re-queues a job whose progress was lost, so a crash can lose the last moments of
    work, never consistency (PostgreSQL manual, "Asynchronous Commit"). One flush per document
    would otherwise cost more than storing it.
    """
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")


class _Storer:
    """Stores embedded groups, on a second thread with its own database connection when the
    caller is not inside a transaction (another connection could not see its uncommitted rows),
    so that group N is written while group N + 1 is embedded (the encoder's threads release the
    GIL, and PostgreSQL does most of the storing in its own process). At most one group is
    in flight; ``submit`` waits for the previous one. Inside a transaction, groups are stored
    on the calling thread, as before."""

    def __init__(self, store_group: Callable[[list[Prepared], list[tuple[np.ndarray, int]]], None], *,
                 threaded: bool | None = None) -> None:
        """``threaded``: store on a second thread (default: when not inside a transaction)."""
        self._store_group = store_group
        self._schema = getattr(connection, "schema_name", "public")
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: Future[None] | None = None
        if (not connection.in_atomic_block) if threaded is None else threaded:
            # The thread's connection is its own, closed in ``close``: set it up once.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-store",
                                            initializer=_commit_asynchronously)

    def _run(self, group: list[Prepared], embedded: list[tuple[np.ndarray, int]]) -> None:
        from django_tenants.utils import schema_context

        with schema_context(self._schema):
            self._store_group(group, embedded)

    def submit(self, group: list[Prepared], embedded: list[tuple[np.ndarray, int]]) -> None:
        if self._pool is None:
            self._store_group(group, embedded)
            return
        self.wait()
        self._inflight = self._pool.submit(self._run, group, embedded)

    @property
    def busy(self) -> bool:
        """Whether a group is being stored on the second thread right now."""
        return self._inflight is not None and not self._inflight.done()

    def wait(self) -> None:
        """Wait for the group in flight; re-raises what its thread raised."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def close(self) -> None:
        """Wait for the last group, then close the thread's connection and the thread."""
        if self._pool is None:
            return
        try:
            self.wait()
        finally:
            # ``connection`` is per thread: it must be looked up on the store thread.
            self._pool.submit(lambda: connection.close()).result()
            self._pool.shutdown()


class _EncoderThreads:
    """The local encoder's intra-op threads on the ingesting thread: one fewer while a group is
    being stored on the second thread, all of them again once it is stored.

    The store is PostgreSQL's work (HNSW insertions, postings and their indexes: about 20 s of
    CPU for SciFact's 11,867 chunks, measured with the same rows inserted by INSERT ... SELECT),
    so while it runs one core is busy; torch's threads synchronize at every operator, and one of
    two on the shared core holds back the other. Measured on an AMD EPYC with 2 cores, the first
    2,600 SciFact abstracts (5,968 chunks, groups of 2,048), two rounds: wall time 206.1 and
    205.7 s with both encoder threads throughout, 199.0 and 198.9 s giving one up while storing
    (96.4 % of the raw encoder's 191.7 s on the same texts in that run, against 92.9 % before),
    218.6 s storing on the calling thread (no overlap). Without the postings' foreign keys the
    store took 13.9 s instead of 18.2 s but the wall time stayed 199.2 s: the store is hidden
    behind the encoder, so they stay. The thread count is per calling thread in torch, so this
    touches no other thread's encoder (query embedding). Applies to the ``local`` backend only;
    an endpoint's threads are not ours.
    """

    def __init__(self) -> None:
        self._torch: Any = None
        if settings.EMBEDDING_BACKEND == "local":
            import torch

            self._torch = torch
        self.full = self._torch.get_num_threads() if self._torch is not None else 1
        self._current = self.full

    def update(self, storing: bool) -> None:
        """Use ``full - 1`` threads (at least 1) while ``storing``, ``full`` otherwise."""
        if self._torch is None:
            return
        wanted = max(1, self.full - 1) if storing else self.full
        if wanted != self._current:
            self._torch.set_num_threads(wanted)
            self._current = wanted


def _ingest(ids: list[int], report: IngestReport, on_document: ProgressCallback | None,
            on_chunks: ChunkCallback | None, group_chunks: int) -> IngestReport:
    collections: dict[int, Collection] = {}
    pending: list[Prepared] = []
    pending_chunks = 0
    done = 0
    # Counters change on both threads.
    counting = threading.Lock()

    def finish(count: int, *, indexed: int = 0, failed: int = 0, chunks: int = 0) -> None:
        nonlocal done
        with counting:
            done += count
            report.indexed += indexed
            report.failed += failed
            report.chunks += chunks
            if on_document is not None:
                on_document(done, len(ids))

    def store_group(group: list[Prepared], embedded: list[tuple[np.ndarray, int]]) -> None:
        started = time.perf_counter()
        for prepared, (vectors, tokens) in zip(group, embedded, strict=True):
            try:
                store(prepared, vectors, tokens, collections[prepared.document.collection_id])
            except Document.DoesNotExist:
                logger.info("document_deleted_while_indexing", document=prepared.document.pk)
                finish(1)
            except Exception as exc:
                logger.exception("document_store_failed", document=prepared.document.pk)
                document_fail(prepared.document.pk,
                              f"Storing the index failed unexpectedly ({type(exc).__name__}); try re-indexing.")
                finish(1, failed=1)
            else:
                finish(1, indexed=1, chunks=len(prepared.drafts))
        with counting:
            report.store_s += time.perf_counter() - started

    storer = _Storer(store_group)
    threads = _EncoderThreads()

    def batch_done(chunks: int) -> None:
        threads.update(storer.busy)
        if on_chunks is not None:
            on_chunks(chunks)

    def flush() -> None:
        nonlocal pending, pending_chunks
        if not pending:
            return
        group, pending, pending_chunks = pending, [], 0

        def step(prepared: Prepared, chunks_done: int) -> None:
            n = len(prepared.drafts)
            if n > 40:  # large documents: move their bar while they embed
                _progress([prepared.document.pk], 20 + int(75 * chunks_done / n))

        started = time.perf_counter()
        threads.update(storer.busy)
        try:
            embedded = _embed_prepared(group, step, batch_done)
        except EmbeddingError as exc:
            for prepared in group:
                document_fail(prepared.document.pk, f"The embedding service failed: {exc}")
            finish(len(group), failed=len(group))
            return
        finally:
            with counting:
                report.embed_s += time.perf_counter() - started
        storer.submit(group, embedded)

    try:
        for document in _documents(ids):
            collection = collections.get(document.collection_id)
            if collection is None:
                collection = collections[document.collection_id] = Collection.objects.get(pk=document.collection_id)
            started = time.perf_counter()
            try:
                prepared = prepare(document, collection)
            except ExtractionError as exc:
                document_fail(document.pk, exc.message)
                finish(1, failed=1)
                continue
            except Exception as exc:
                logger.exception("document_prepare_failed", document=document.pk)
                document_fail(document.pk, f"Indexing failed unexpectedly ({type(exc).__name__}); try re-indexing.")
                finish(1, failed=1)
                continue
            report.prepare_s += time.perf_counter() - started
            pending.append(prepared)
            pending_chunks += len(prepared.drafts)
            if pending_chunks >= group_chunks:
                flush()
        flush()
    finally:
        threads.update(False)
        storer.close()
    return report


def _documents(ids: list[int]) -> Iterator[Document]:
    """The documents of ``ids`` that still exist, in id order, each slice of ``START_SLICE``
    marked ``processing`` (``documents_start``) before it is read, and what is left of it
    marked again when the mark is older than ``START_REFRESH_SECONDS``."""
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), START_SLICE):
        batch = ordered[start:start + START_SLICE]
        documents_start(batch)
        marked = time.monotonic()
        for document in Document.objects.filter(pk__in=batch).order_by("pk"):
            if time.monotonic() - marked > START_REFRESH_SECONDS:
                documents_start([pk for pk in batch if pk >= document.pk])
                marked = time.monotonic()
            yield document


def record_text(record: dict[str, object]) -> str:
    """The text of a JSONL record (``text``, else the whole record as JSON)."""
    text = record.get("text")
    return text if isinstance(text, str) else json.dumps(record, ensure_ascii=False)
