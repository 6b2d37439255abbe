"""``chunk_search``: validation, the mode's ranking (query embedding in parallel with the keyword
side for hybrid), collapsing on the document, hydration of the hits and the usage event.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.db import connection

from billing.models import UsageEvent
from billing.services import usage_event_record
from config import telemetry
from config.errors import ValidationFailed
from knowledge.embeddings import Embedder, embedder
from knowledge.models import Collection
from knowledge.retrieval.candidates import hybrid_rescore, keyword_candidates, keyword_side, vector_candidates
from knowledge.retrieval.fusion import fuse

MODES = ("vector", "keyword", "hybrid")
MAX_TOP_K = 200
MAX_QUERY_CHARS = 2000


@dataclass
class SearchHit:
    """One retrieved chunk with its source and the scores that ranked it.

    ``score`` is what the mode ranks by (cosine, BM25 or the fused score, unbounded);
    ``vector_score`` (cosine similarity; in hybrid mode to the query vector expanded by the
    dense side's feedback) and ``keyword_score`` (BM25) are given whenever they
    were computed, with their ranks among the candidates (1 = best).
    """

    chunk_id: int
    score: float
    vector_score: float | None = None
    keyword_score: float | None = None
    vector_rank: int | None = None
    keyword_rank: int | None = None
    document_id: int = 0
    external_id: str = ""
    title: str = ""
    text: str = ""
    page_number: int | None = None
    heading_path: list[str] = field(default_factory=list)
    ordinal: int = 0
    collection_id: int = 0


@dataclass
class SearchTimings:
    """Wall-clock milliseconds of one ``chunk_search`` per stage (embedding the query, the vector
    and keyword statements, fusion with hydration) and in total; a collapsed search's wider
    passes add to them. In hybrid mode the query is embedded while the keyword statement runs,
    so the stages can add up to more than ``total_ms``."""

    embed_ms: float = 0.0
    vector_ms: float = 0.0
    keyword_ms: float = 0.0
    fuse_ms: float = 0.0
    total_ms: float = 0.0



def _hydrate(hits: list[SearchHit]) -> list[SearchHit]:
    if not hits:
        return hits
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.id, c.document_id, d.external_id, d.title, c.text, c.page_number, c.heading_path, c.ordinal, "
            "c.collection_id FROM knowledge_chunk c JOIN knowledge_document d ON d.id = c.document_id "
            "WHERE c.id = ANY(%s)",
            [[h.chunk_id for h in hits]],
        )
        rows = {r[0]: r for r in cursor.fetchall()}
    hydrated = []
    for hit in hits:
        row = rows.get(hit.chunk_id)
        if row is None:  # deleted between the ranking and this read
            continue
        hit.document_id, hit.external_id, hit.title, hit.text, hit.page_number = row[1], row[2], row[3], row[4], row[5]
        heading = row[6]
        if isinstance(heading, str):  # Django's psycopg adapter hands jsonb back as text on raw cursors
            heading = json.loads(heading)
        hit.heading_path = heading if isinstance(heading, list) else []
        hit.ordinal, hit.collection_id = row[7], row[8]
        hydrated.append(hit)
    return hydrated


_encoders: dict[int, ThreadPoolExecutor] = {}
QUERY_ENCODER_THREADS = 32


def _one_torch_thread() -> None:
    # While the query is embedded, PostgreSQL computes the keyword side on the other core: the
    # encoder gets one core, not both (torch's intra-op thread count is per calling thread).
    try:
        import torch
    except ImportError:  # the litellm backend runs without torch
        return
    torch.set_num_threads(1)


def _query_encoder() -> ThreadPoolExecutor:
    """This process's pool for query embeddings (made after a fork: a pool inherited from the
    parent has no threads in the child). Wide enough that the queries of concurrent turns all
    reach the embedder, which embeds the ones waiting together (``LocalEmbedder.embed_query``);
    the threads mostly wait."""
    pid = os.getpid()
    pool = _encoders.get(pid)
    if pool is None:
        _encoders.clear()
        pool = _encoders[pid] = ThreadPoolExecutor(max_workers=QUERY_ENCODER_THREADS, thread_name_prefix="query-embed",
                                                   initializer=_one_torch_thread)
    return pool


def _timed(function: Callable[[str], np.ndarray], text: str) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    return function(text), (time.perf_counter() - started) * 1000


def _document_ids(chunk_ids: list[int], known: dict[int, int]) -> dict[int, int]:
    """``known`` (chunk id -> document id) completed for ``chunk_ids``, in one round trip for
    the chunks it lacks (a collapsed search's wider pass repeats most of the previous one's)."""
    missing = [i for i in chunk_ids if i not in known]
    if missing:
        with connection.cursor() as cursor:
            cursor.execute("SELECT id, document_id FROM knowledge_chunk WHERE id = ANY(%s)", [missing])
            known.update(cursor.fetchall())
    return known


def collapse_by_document(hits: list[SearchHit], document_of: dict[int, int], limit: int) -> list[SearchHit]:
    """``hits`` (best first) with at most ``limit`` chunks of any one document, order kept.

    Field collapsing on the document, as Elasticsearch's ``collapse`` and Solr's
    ``CollapsingQParser`` do for a field: a document's best chunks stand for it and its weaker
    ones give their places to other documents. Hits whose chunk is missing from ``document_of``
    (deleted meanwhile) are dropped.
    """
    taken: dict[int, int] = {}
    kept = []
    for hit in hits:
        document = document_of.get(hit.chunk_id)
        if document is None or taken.get(document, 0) >= limit:
            continue
        taken[document] = taken.get(document, 0) + 1
        kept.append(hit)
    return kept


# A collapsed search doubles its candidate lists until it has ``top_k`` results or a list comes
# back short; pgvector's ``hnsw.ef_search`` stops at 1000, and so does the pool.
MAX_POOL = 1000


@telemetry.traced("retrieval.search",
                  attributes=lambda _, kw: {"portal.retrieval.top_k": kw.get("top_k", 10),
                                            "portal.retrieval.mode": kw.get("mode", "hybrid"),
                                            "portal.retrieval.collections": len(kw.get("collections") or [])},
                  result_attributes=lambda hits: {"portal.retrieval.results": len(hits)})
def chunk_search(
    *,
    query: str,
    collections: list[Collection],
    top_k: int = 10,
    mode: str = "hybrid",
    fusion: str = "convex",
    alpha: float | None = None,
    candidates: int | None = None,
    max_chunks_per_document: int | None = None,
    record_usage: bool = True,
    timings: SearchTimings | None = None,
    agent_id: int | None = None,
    session_id: int | None = None,
    turn_id: int | None = None,
) -> list[SearchHit]:
    """The ``top_k`` chunks of ``collections`` most relevant to ``query``, best first.

    ``mode`` is ``vector``, ``keyword`` or ``hybrid``; ``fusion`` (hybrid only) is ``convex``
    (weight ``alpha`` on the vector side, default ``KB_HYBRID_ALPHA``) or ``rrf``. Each side
    contributes ``candidates`` chunks (default ``max(top_k, KB_HYBRID_CANDIDATES)``) before fusion;
    with convex fusion the dense side searches with pseudo-relevance feedback (``hybrid_rescore``).

    ``max_chunks_per_document`` (1 or more; ``None`` for no limit) collapses the result on the
    document (``collapse_by_document``): with 1 it is a ranking of documents by their best chunk
    (MaxP), ``top_k`` documents long where the collections hold that many. A collapsed search
    fetches at least ``2 * top_k`` candidates per method (SciFact's abstracts have 2.3 chunks on
    average) and doubles that, up to ``MAX_POOL``, while collapsing leaves fewer than ``top_k``.

    Collections must belong to the current tenant (they are rows of its schema). Records one
    ``kb.query`` usage event (referencing ``agent_id``/``session_id``/``turn_id`` when a chat turn
    searched). Raises ``ValidationFailed`` for an empty or overlong query, a bad
    mode, fusion, ``top_k`` outside 1-200 or ``max_chunks_per_document`` below 1, or collections
    embedded with another model.
    """
    started = time.perf_counter()
    timings = timings if timings is not None else SearchTimings()
    query = (query or "").strip()
    if not query:
        raise ValidationFailed("The query is empty.", code="empty_query")
    if len(query) > MAX_QUERY_CHARS:
        raise ValidationFailed(f"The query is longer than {MAX_QUERY_CHARS} characters.", code="query_too_long")
    if mode not in MODES:
        raise ValidationFailed(f"Unknown mode '{mode}'; use one of {', '.join(MODES)}.", code="invalid_mode")
    if fusion not in ("convex", "rrf"):
        raise ValidationFailed("fusion must be 'convex' or 'rrf'.", code="invalid_fusion")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValidationFailed(f"top_k must be between 1 and {MAX_TOP_K}.", code="invalid_top_k")
    if max_chunks_per_document is not None and max_chunks_per_document < 1:
        raise ValidationFailed("max_chunks_per_document must be 1 or more (or absent for no limit).",
                               code="invalid_max_chunks_per_document")
    if not collections:
        raise ValidationFailed("Choose at least one collection.", code="no_collections")
    model = embedder()
    foreign = [c.name for c in collections if c.embedding_model != model.name or c.embedding_dim != model.dim]
    if foreign and mode != "keyword":
        raise ValidationFailed(f"Collections {foreign} were embedded with another model; re-index them.",
                               code="embedding_mismatch")
    collection_ids = [c.pk for c in collections]
    pool = max(top_k, candidates or settings.KB_HYBRID_CANDIDATES) if mode == "hybrid" else top_k
    if max_chunks_per_document is not None:
        pool = min(max(pool, 2 * top_k), MAX_POOL)

    query_vector: np.ndarray | None = None
    document_of: dict[int, int] = {}
    while True:
        hits, full, query_vector = _ranked(model, query, query_vector, collections, pool, mode=mode, fusion=fusion,
                                           alpha=alpha, timings=timings,
                                           limit=top_k if max_chunks_per_document is None else None)
        if max_chunks_per_document is None:
            break
        hits = collapse_by_document(hits, _document_ids([h.chunk_id for h in hits], document_of),
                                    max_chunks_per_document)
        if len(hits) >= top_k or not full or pool >= MAX_POOL:
            break
        pool = min(pool * 2, MAX_POOL)
    t0 = time.perf_counter()
    hits = _hydrate(hits[:top_k])
    timings.fuse_ms += (time.perf_counter() - t0) * 1000
    timings.total_ms = (time.perf_counter() - started) * 1000
    if record_usage:
        usage_event_record(kind=UsageEvent.Kind.KB_QUERY, quantity=1, model=model.name if mode != "keyword" else "",
                           agent_id=agent_id, session_id=session_id, turn_id=turn_id,
                           metadata={"mode": mode, "collections": collection_ids, "top_k": top_k,
                                     "max_chunks_per_document": max_chunks_per_document, "results": len(hits)})
    return hits


def _ranked(model: Embedder, query: str, query_vector: np.ndarray | None, collections: list[Collection], pool: int, *,
            mode: str, fusion: str, alpha: float | None, timings: SearchTimings,
            limit: int | None) -> tuple[list[SearchHit], bool, np.ndarray | None]:
    """The mode's ranking of up to ``pool`` candidates per method (the first ``limit``, or all;
    not yet hydrated), whether a method returned all ``pool`` it was asked for (so more exist),
    and the query vector (embedded here unless given, ``None`` for keyword mode). Timings add up
    over calls."""
    if mode == "vector":
        if query_vector is None:
            t0 = time.perf_counter()
            query_vector = model.embed_query(query)
            timings.embed_ms += (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        dense = vector_candidates(query_vector, collections, pool)
        timings.vector_ms += (time.perf_counter() - t0) * 1000
        hits = [SearchHit(chunk_id=i, score=s, vector_score=s, vector_rank=r)
                for r, (i, s) in enumerate(dense, start=1)]
        return hits, len(dense) >= pool, query_vector
    if mode == "keyword":
        t0 = time.perf_counter()
        sparse = keyword_candidates(query, collections, pool)
        timings.keyword_ms += (time.perf_counter() - t0) * 1000
        hits = [SearchHit(chunk_id=i, score=s, keyword_score=s, keyword_rank=r)
                for r, (i, s) in enumerate(sparse, start=1)]
        return hits, len(sparse) >= pool, None
    # The query is embedded on another thread (the encoder releases the GIL) while this one runs
    # the keyword side on its database connection; then one statement adds the dense side.
    # Both sides' pseudo-relevance feedback was tuned for convex fusion; RRF searches without
    # either (with the dense side's, RRF's test nDCG@10 on SciFact fell from 0.722 to 0.707).
    keyword_feedback = 0 if fusion == "rrf" else settings.KB_HYBRID_KEYWORD_FEEDBACK_CHUNKS
    t0 = time.perf_counter()
    if query_vector is None:
        embedding = _query_encoder().submit(_timed, model.embed_query, query)
        keyword = keyword_side(query, collections, pool, feedback_chunks=keyword_feedback)
        timings.keyword_ms += (time.perf_counter() - t0) * 1000
        query_vector, embed_ms = embedding.result()
        timings.embed_ms += embed_ms
    else:  # a collapsed search's wider second pass: the query is embedded already
        keyword = keyword_side(query, collections, pool, feedback_chunks=keyword_feedback)
        timings.keyword_ms += (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    proposed = hybrid_rescore(query_vector, keyword, collections, pool, feedback=0 if fusion == "rrf" else None)
    timings.vector_ms += (time.perf_counter() - t0) * 1000
    hits = [SearchHit(chunk_id=c.chunk_id, score=score, vector_score=c.cosine, keyword_score=c.bm25,
                      vector_rank=vr, keyword_rank=kr)
            for c, score, vr, kr in fuse(proposed, fusion=fusion, alpha=alpha)[:limit]]
    full = len(keyword.hits) >= pool or sum(c.in_dense for c in proposed) >= pool
    return hits, full, query_vector
