"""The orchestration of a run: ``ingest_documents`` reads the documents slice by slice (marking
each slice ``processing``), prepares them, embeds them in groups, hands each group to the store
thread, counts the outcome in an ``IngestReport`` and reports progress through its callbacks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import structlog
from django.db import connection
from django.utils import timezone

from knowledge.embeddings import EmbeddingError
from knowledge.extraction import ExtractionError
from knowledge.ingestion.encoding import ChunkCallback, _embed_prepared, _EncoderThreads
from knowledge.ingestion.preparation import Prepared, _progress, document_fail, prepare
from knowledge.ingestion.storage import _analyze_if_grown, _commit_asynchronously, _grew_enough, _Storer, store
from knowledge.models import Collection, Document

# Named after the package, not this module, so records keep the logger name they had before
# the package was split into modules.
logger = structlog.get_logger("knowledge.ingestion")

ProgressCallback = Callable[[int, int], None]


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


@dataclass
class IngestReport:
    """Counts, and wall-clock seconds per stage (prepare = extract + chunk, embed, store);
    ``grown`` maps each collection written to its (chunks before the run, chunks added)."""

    indexed: int = 0
    failed: int = 0
    chunks: int = 0
    prepare_s: float = 0.0
    embed_s: float = 0.0
    store_s: float = 0.0
    grown: dict[int, tuple[int, int]] = field(default_factory=dict)


def ingest_documents(document_ids: Iterable[int], *, on_document: ProgressCallback | None = None,
                     on_chunks: ChunkCallback | None = None, group_chunks: int = 2048) -> IngestReport:
    """Index the given documents of the current schema; return how many succeeded.

    Documents are prepared, then embedded together once ``group_chunks`` chunks are waiting
    (one encoder call: the larger the group, the less its batches pad, see ``_embed_prepared``),
    and stored while the next group is embedded (``_Storer``); the last group, which no later
    embedding would hide, is embedded in shrinking parts (``tail_parts``). Failures of one document (bad
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
    _analyze_if_grown(report.chunks, collection_grew=any(
        _grew_enough(before, added) for before, added in report.grown.values()))
    return report


def _ingest(ids: list[int], report: IngestReport, on_document: ProgressCallback | None,
            on_chunks: ChunkCallback | None, group_chunks: int) -> IngestReport:
    collections: dict[int, Collection] = {}
    pending: list[Prepared] = []
    pending_chunks = 0
    done = 0
    # Counters change on both threads.
    counting = threading.Lock()

    def finish(count: int, *, indexed: int = 0, failed: int = 0, chunks: int = 0, collection: int = 0) -> None:
        nonlocal done
        with counting:
            done += count
            report.indexed += indexed
            report.failed += failed
            report.chunks += chunks
            if chunks:
                before, added = report.grown.get(collection, (collections[collection].chunk_count, 0))
                report.grown[collection] = (before, added + chunks)
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
                finish(1, indexed=1, chunks=len(prepared.drafts), collection=prepared.document.collection_id)
        with counting:
            report.store_s += time.perf_counter() - started

    storer = _Storer(store_group)
    threads = _EncoderThreads()

    def batch_done(chunks: int) -> None:
        threads.update(storer.busy)
        if on_chunks is not None:
            on_chunks(chunks)

    def flush(*, last: bool = False) -> None:
        nonlocal pending, pending_chunks
        if not pending:
            return
        group, pending, pending_chunks = pending, [], 0
        # The last group's store is the only one no embedding overlaps: embed it in shrinking
        # parts, so that only the smallest part's store is left when the encoder is done.
        for part in (tail_parts(group) if last and storer.threaded else [group]):
            embed_and_store(part)

    def embed_and_store(group: list[Prepared]) -> None:
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
        flush(last=True)
    finally:
        threads.update(False)
        storer.close()
    return report


# ``tail_parts``: each part of the last group holds TAIL_FRACTION of the chunks still left, until
# TAIL_MIN_CHUNKS or fewer are. A part is stored while the next one is embedded, which it must
# outlast: storing a chunk costs about a tenth of embedding it on the one encoder thread left
# meanwhile (docs/perf/embedding-and-ingestion.md), so a part a tenth the size of the one before
# still hides its store.
TAIL_FRACTION = 0.75
TAIL_MIN_CHUNKS = 64


def tail_parts(group: list[Prepared]) -> list[list[Prepared]]:
    """``group`` cut, in order and by whole documents, into parts of shrinking chunk counts: each
    closes once it holds ``TAIL_FRACTION`` of the chunks left, and once ``TAIL_MIN_CHUNKS`` or
    fewer are left they make the last part. A group of ``4 * TAIL_MIN_CHUNKS`` chunks or fewer
    stays whole. For 1,600 chunks in documents of 2-3 chunks: about 1,200, 300, 75 and 25.
    """
    left = sum(len(p.drafts) for p in group)
    if left <= 4 * TAIL_MIN_CHUNKS:
        return [group]
    parts: list[list[Prepared]] = [[]]
    taken = 0
    target = TAIL_FRACTION * left
    for prepared in group:
        parts[-1].append(prepared)
        taken += len(prepared.drafts)
        if taken >= target:
            left -= taken
            taken = 0
            target = TAIL_FRACTION * left if left > TAIL_MIN_CHUNKS else float("inf")
            parts.append([])
    return [part for part in parts if part]


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
