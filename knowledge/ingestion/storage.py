"""Storing embedded documents: the set-based SQL that writes chunks, postings, collection
statistics, status and usage event in one statement per document, and the second thread that
stores a group while the next one is embedded.

``store`` indexes one document in its own transaction (``_INDEX_SQL``, run by ``_execute`` with
binary vectors); ``chunks_delete`` removes a document's chunks before re-indexing; ``_Storer``
runs the stores of a group on a second thread; ``_commit_asynchronously`` lets a connection
commit without waiting for the WAL flush, and ``_analyze_if_grown`` refreshes the planner's
statistics after a large load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from billing.models import UsageEvent
from billing.services import usage_event_values
from knowledge.chunking import ChunkDraft
from knowledge.embeddings import embedder
from knowledge.ingestion.preparation import Prepared
from knowledge.models import Collection, Document

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
                                    currency, user_id, api_key_id, request_id, metadata, created_at)
    SELECT %(u_kind)s, %(u_quantity)s, %(u_unit)s, %(u_model)s, %(u_agent_id)s, %(u_session_id)s, %(u_turn_id)s,
           %(u_unit_price)s, %(u_cost)s, %(u_currency)s, %(u_user_id)s, %(u_api_key_id)s, %(u_request_id)s,
           %(u_metadata)s::jsonb, %(u_created_at)s
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


# A run that added at least ANALYZE_MIN_CHUNKS chunks, and ANALYZE_FRACTION of the chunk table or
# of a collection it wrote to, refreshes the planner's statistics itself: autovacuum's own rule
# (autovacuum_analyze_threshold 50, autovacuum_analyze_scale_factor 0.1), applied at once instead
# of at its next round, and to each collection too, whose rows the planner estimates by its id.
ANALYZE_MIN_CHUNKS = 50
ANALYZE_FRACTION = 0.1


def _grew_enough(before: int, added: int) -> bool:
    """Whether a collection that held ``before`` chunks grew materially by ``added`` (the rule above)."""
    return added >= ANALYZE_FRACTION * (before + added)


def _analyze_if_grown(added_chunks: int, *, collection_grew: bool = False) -> bool:
    """``ANALYZE`` the chunk and posting tables of the current schema when ``added_chunks`` is a
    large part of them, or ``collection_grew`` (the rule above); return whether it did
    (PostgreSQL's manual, "Populating a Database": run ANALYZE afterwards).

    Only the columns searches filter and join on are analyzed (the collection, and the postings'
    lexeme), which spares computing statistics of the embeddings and texts. Until autovacuum
    analyzes them (up to a minute or two later), the planner keeps the statistics from before the
    load and misestimates the new collection's rows (docs/perf/filtered-vector-search.md).
    """
    if added_chunks < ANALYZE_MIN_CHUNKS:
        return False
    with connection.cursor() as cursor:
        if not collection_grew:
            # The table's size as the planner knows it (-1: never analyzed).
            cursor.execute("SELECT reltuples FROM pg_class WHERE oid = 'knowledge_chunk'::regclass")
            known = float(cursor.fetchone()[0])
            if added_chunks < ANALYZE_FRACTION * known:
                return False
        cursor.execute("ANALYZE knowledge_chunk (collection_id), knowledge_posting (collection_id, lexeme)")
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
    def threaded(self) -> bool:
        """Whether groups are stored on the second thread (else on the calling one)."""
        return self._pool is not None

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
