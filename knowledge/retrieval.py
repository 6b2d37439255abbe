"""Retrieval: ``chunk_search`` over one or more collections, by vector, keyword or both.

* ``vector``: cosine similarity of all-MiniLM-L6-v2 embeddings through pgvector's HNSW index,
  with ``hnsw.ef_search`` sized to the request and ``hnsw.iterative_scan`` on, so a filter on
  collections cannot starve the result.
* ``keyword``: Okapi BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and
  Beyond", 2009) over the posting table:
  ``idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avglen))`` with
  ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`` (the non-negative variant used by Lucene),
  N and avglen over the searched collections, OR semantics over the query's stemmed terms.
* ``hybrid``: the union of both candidate lists, every candidate scored by both methods (its
  exact cosine and its BM25 score, not a zero for "absent from the other list"), each score
  normalized over the candidates (z-score by default, or min-max) and blended
  ``alpha * vector + (1 - alpha) * keyword`` (convex combination; Bruch, Gai & Ingber, "An
  Analysis of Fusion Functions for Hybrid Retrieval", TOIS 2023, found it better than reciprocal
  rank fusion). Reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009, k = 60) is
  available as ``fusion="rrf"``. The fused score is a weighted sum of z-scores: higher is better,
  and it is not bounded to [0, 1]. Two round trips: the keyword side (which also returns the
  query terms' IDFs) runs while another thread embeds the query, then one statement finds the
  dense side and completes both scores of every candidate.
* Pseudo-relevance feedback on hybrid's dense side (Rocchio, "Relevance Feedback in Information
  Retrieval", 1971, applied to dense vectors as in Li et al., "Pseudo Relevance Feedback with Deep
  Language Models and Dense Retrievers: Successes and Pitfalls", TOIS 2023): the dense side
  searches with ``q + w * mean(v_1..v_m)``, the query vector plus ``w`` times the mean of its
  ``m`` nearest chunks (``KB_HYBRID_FEEDBACK_CHUNKS`` = 3, ``KB_HYBRID_FEEDBACK_WEIGHT`` = 0.5),
  and its cosines are taken against that vector. The feedback search is a CTE of the same
  statement. On SciFact (documents by best chunk, 200 chunks) it moved train nDCG@10 / recall@100
  from 0.7427 / 0.9588 to 0.7455 / 0.9613 and test from 0.7351 / 0.9627 to 0.7379 / 0.9667.

The defaults (``KB_BM25_K1``, ``KB_BM25_B``, ``KB_HYBRID_ALPHA``, ``KB_HYBRID_NORMALIZATION``,
the feedback's chunks and weight) were chosen on SciFact's *train* queries
(``tests/bench/tune_retrieval.py``, ``--feedback`` for the last two) and are evaluated on its test
queries.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import structlog
from django.conf import settings
from django.db import DatabaseError, connection

from billing.models import UsageEvent
from billing.services import usage_event_record
from config.errors import ValidationFailed
from knowledge.embeddings import Embedder, embedder
from knowledge.models import Collection

logger = structlog.get_logger(__name__)

Mode = Literal["vector", "keyword", "hybrid"]
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
    embed_ms: float = 0.0
    vector_ms: float = 0.0
    keyword_ms: float = 0.0
    fuse_ms: float = 0.0
    total_ms: float = 0.0


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector.tolist()) + "]"


# One posting's BM25 term (formula in the module docstring). k1 and b are cast to float8: Django's
# psycopg cursors bind parameters on the client, so a bare ``0.4`` reaches PostgreSQL as a numeric
# literal, and ``b * chunk_len`` was computed in numeric arithmetic for every posting. Measured on
# SciFact's 300 test queries (keyword side, 100 chunks): p50/p95 10.4/22.0 ms before, 7.4/14.6 after.
_BM25_TERM = ("idf.idf * p.tf * (%(k1)s::float8 + 1)"
              " / (p.tf + %(k1)s::float8 * (1 - %(b)s::float8 + %(b)s::float8 * p.chunk_len / stats.avglen))")

# Shared CTEs: the query's stemmed terms under each collection language, the corpus statistics
# of the searched collections (N chunks, average length), each term's IDF, every matching
# chunk's BM25 score.
_BM25_CTES = """
q AS (
    SELECT DISTINCT unnest(tsvector_to_array(to_tsvector(lang::regconfig, %(query)s))) AS lexeme
    FROM unnest(%(languages)s::text[]) AS lang
), stats AS (
    SELECT GREATEST(SUM(chunk_count), 1)::float8 AS n,
           GREATEST(SUM(lexeme_total)::float8 / GREATEST(SUM(chunk_count), 1), 1) AS avglen
    FROM knowledge_collection WHERE id = ANY(%(collections)s)
), idf AS (
    SELECT p.lexeme, ln(1 + (stats.n - COUNT(*) + 0.5) / (COUNT(*) + 0.5)) AS idf
    FROM knowledge_posting p JOIN q USING (lexeme) CROSS JOIN stats
    WHERE p.collection_id = ANY(%(collections)s)
    GROUP BY p.lexeme, stats.n
), bm25 AS (
    SELECT p.chunk_id, SUM(""" + _BM25_TERM + """) AS score
    FROM knowledge_posting p JOIN idf USING (lexeme) CROSS JOIN stats
    WHERE p.collection_id = ANY(%(collections)s)
    GROUP BY p.chunk_id
)"""

# The keyword side in one round trip: the ``pool`` best chunks by BM25 and the IDF of each query
# term, which the hybrid's second statement reuses to score dense candidates.
_KEYWORD_SQL = "WITH " + _BM25_CTES + """,
top AS (
    SELECT chunk_id, score FROM bm25 ORDER BY score DESC, chunk_id LIMIT %(pool)s
)
SELECT (SELECT COALESCE(array_agg(chunk_id ORDER BY score DESC, chunk_id), '{}') FROM top),
       (SELECT COALESCE(array_agg(score ORDER BY score DESC, chunk_id), '{}') FROM top),
       (SELECT COALESCE(array_agg(lexeme ORDER BY lexeme), '{}') FROM idf),
       (SELECT COALESCE(array_agg(idf ORDER BY lexeme), '{}') FROM idf)
"""

# The query vector is bound once, in a CTE the statements read through a sub-select: it is 384
# numbers of text, and parsing it three times cost about 1.3 ms of a hybrid search's dense
# statement (p50 9.1 -> 7.7 ms on SciFact). The HNSW index scan still serves the ORDER BY (the
# sub-select is evaluated once, before the scan, as an init plan).
_QUERY_VECTOR = "qv AS MATERIALIZED (SELECT %(vector)s::vector AS v)"

_VECTOR_SQL = "WITH " + _QUERY_VECTOR + """
SELECT id, 1 - (embedding <=> (SELECT v FROM qv)) AS cosine FROM knowledge_chunk
WHERE collection_id = ANY(%(collections)s)
ORDER BY embedding <=> (SELECT v FROM qv) LIMIT %(pool)s
"""

# The dense side of a hybrid search, given the keyword side: the ``pool`` nearest chunks, the
# union with the keyword candidates, each candidate's exact cosine, and the BM25 score of the
# dense candidates the keyword side did not return (from their own postings and the keyword
# side's IDFs), so every candidate carries both scores.
# The hybrid's query vector with pseudo-relevance feedback: ``%(vector)s`` is the query vector
# divided by the feedback weight (cosine ignores scale, so ``q / w + mean`` ranks and scores as
# ``q + w * mean``), plus the mean of its ``%(feedback)s`` nearest chunks; with no feedback chunks
# (``LIMIT 0``, or an empty collection) the mean is NULL and the vector is the query's own.
# The nearest chunks are read from a materialized CTE planned for ``pool`` rows, as the dense
# side is: asked for 3 rows, the planner priced an exact sort of the collection below the HNSW
# scan's start-up cost and chose it (28 ms on SciFact's 11,867 chunks, against about 1 ms). The
# CTE is read lazily, so only the feedback's rows are fetched from the index scan.
_FEEDBACK_QUERY_VECTOR = """q0 AS MATERIALIZED (SELECT %(vector)s::vector AS v), nearest AS MATERIALIZED (
    SELECT embedding FROM knowledge_chunk WHERE collection_id = ANY(%(collections)s)
    ORDER BY embedding <=> (SELECT v FROM q0) LIMIT %(pool)s
), feedback AS (
    SELECT embedding FROM nearest LIMIT %(feedback)s
), qv AS MATERIALIZED (
    SELECT COALESCE((SELECT v FROM q0) + (SELECT avg(embedding) FROM feedback), (SELECT v FROM q0)) AS v
)"""

_HYBRID_SQL = "WITH " + _FEEDBACK_QUERY_VECTOR + """, stats AS (
    SELECT GREATEST(SUM(lexeme_total)::float8 / GREATEST(SUM(chunk_count), 1), 1) AS avglen
    FROM knowledge_collection WHERE id = ANY(%(collections)s)
), idf AS (
    SELECT * FROM unnest(%(lexemes)s::text[], %(idfs)s::float8[]) AS t(lexeme, idf)
), sparse AS (
    SELECT * FROM unnest(%(sparse_ids)s::bigint[], %(sparse_scores)s::float8[]) AS s(chunk_id, bm25)
), dense AS (
    SELECT id AS chunk_id FROM knowledge_chunk WHERE collection_id = ANY(%(collections)s)
    ORDER BY embedding <=> (SELECT v FROM qv) LIMIT %(pool)s
), candidates AS (
    SELECT chunk_id, bool_or(from_dense) AS in_dense, bool_or(NOT from_dense) AS in_sparse
    FROM (SELECT chunk_id, true AS from_dense FROM dense UNION ALL SELECT chunk_id, false FROM sparse) AS both_lists
    GROUP BY chunk_id
), dense_bm25 AS (
    SELECT p.chunk_id, SUM(""" + _BM25_TERM + """) AS score
    FROM knowledge_posting p JOIN idf USING (lexeme) CROSS JOIN stats
    WHERE p.chunk_id IN (SELECT chunk_id FROM candidates WHERE NOT in_sparse)
    GROUP BY p.chunk_id
)
SELECT c.chunk_id, 1 - (k.embedding <=> (SELECT v FROM qv)) AS cosine, COALESCE(s.bm25, d.score, 0) AS bm25,
       c.in_dense, c.in_sparse
FROM candidates c JOIN knowledge_chunk k ON k.id = c.chunk_id
LEFT JOIN sparse s ON s.chunk_id = c.chunk_id LEFT JOIN dense_bm25 d ON d.chunk_id = c.chunk_id
"""


@dataclass(frozen=True)
class Candidate:
    """A chunk either method proposed, with both of its scores."""

    chunk_id: int
    cosine: float
    bm25: float
    in_dense: bool
    in_sparse: bool


@dataclass(frozen=True)
class KeywordSide:
    """The keyword side's result: (chunk id, BM25) best first, and the IDF of each query term."""

    hits: list[tuple[int, float]]
    idf: dict[str, float]


def _params(query: str, collections: list[Collection], pool: int, *, k1: float | None, b: float | None,
            vector: np.ndarray | None = None) -> dict[str, Any]:
    return {
        "query": query, "languages": sorted({c.language for c in collections}),
        "collections": [c.pk for c in collections], "pool": pool,
        "k1": settings.KB_BM25_K1 if k1 is None else k1, "b": settings.KB_BM25_B if b is None else b,
        "vector": _vector_literal(vector) if vector is not None else None,
    }


@contextlib.contextmanager
def _hnsw_settings(cursor: Any, pool: int) -> Iterator[None]:
    """Per-query HNSW settings around a vector query: a candidate list (``ef_search``) of at least
    ``pool`` (``KB_HNSW_EF_SEARCH`` at the least), iterative scans so a collection filter cannot
    leave the result short (pgvector's README, "Iterative Index Scans"), and no sequential scan.

    Without the last one PostgreSQL's cost model prefers reading the whole table and sorting it
    by distance once the LIMIT is a few percent of the rows: on SciFact's 11,867 chunks at a
    LIMIT of 200 it chose that exact scan, 42 ms, over the HNSW index, 8 ms. A selective
    collection filter can still use the collection index. ``ef_search`` and the iterative scan
    stay set for the session (they only concern vector queries, and every vector query sets them
    first), which saves the BEGIN and COMMIT round trips; ``enable_seqscan`` is restored after
    the query, because it concerns every query.
    """
    ef_search = max(settings.KB_HNSW_EF_SEARCH, pool)
    cursor.execute("SELECT set_config('hnsw.ef_search', %s, false), "
                   "set_config('hnsw.iterative_scan', 'relaxed_order', false), "
                   "set_config('enable_seqscan', 'off', false)", [str(ef_search)])
    try:
        yield
    finally:
        # In a transaction the query failed, PostgreSQL has already undone the setting.
        with contextlib.suppress(DatabaseError):
            cursor.execute("RESET enable_seqscan")


def keyword_side(query: str, collections: list[Collection], pool: int, *, k1: float | None = None,
                 b: float | None = None) -> KeywordSide:
    """The ``pool`` best chunks by BM25 and the query terms' IDFs, in one round trip."""
    with connection.cursor() as cursor:
        cursor.execute(_KEYWORD_SQL, _params(query, collections, pool, k1=k1, b=b))
        ids, scores, lexemes, idfs = cursor.fetchone()
    return KeywordSide([(i, float(s)) for i, s in zip(ids, scores, strict=True)],
                       {t: float(v) for t, v in zip(lexemes, idfs, strict=True)})


def keyword_candidates(query: str, collections: list[Collection], pool: int, *, k1: float | None = None,
                       b: float | None = None) -> list[tuple[int, float]]:
    """(chunk id, BM25 score) of the ``pool`` best chunks, best first."""
    return keyword_side(query, collections, pool, k1=k1, b=b).hits


def vector_candidates(vector: np.ndarray, collections: list[Collection], pool: int) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity) of the ``pool`` nearest chunks, best first."""
    with connection.cursor() as cursor, _hnsw_settings(cursor, pool):
        cursor.execute(_VECTOR_SQL, _params("", collections, pool, k1=None, b=None, vector=vector))
        rows = cursor.fetchall()
    # Iterative scans return nearly sorted rows ("relaxed order"); sort them exactly.
    return sorted(((r[0], float(r[1])) for r in rows), key=lambda r: -r[1])


def hybrid_rescore(vector: np.ndarray, keyword: KeywordSide, collections: list[Collection], pool: int, *,
                   k1: float | None = None, b: float | None = None, feedback: int | None = None,
                   feedback_weight: float | None = None) -> list[Candidate]:
    """The union of ``keyword.hits`` and the ``pool`` nearest chunks, each scored by both methods.

    The dense side searches (and scores cosines) with the query vector plus ``feedback_weight``
    times the mean of its ``feedback`` nearest chunks (defaults ``KB_HYBRID_FEEDBACK_CHUNKS`` and
    ``KB_HYBRID_FEEDBACK_WEIGHT``; ``feedback=0`` or a weight of 0 searches with ``vector`` alone).
    """
    feedback = settings.KB_HYBRID_FEEDBACK_CHUNKS if feedback is None else feedback
    weight = settings.KB_HYBRID_FEEDBACK_WEIGHT if feedback_weight is None else feedback_weight
    if weight <= 0:
        feedback, weight = 0, 1.0
    params = _params("", collections, pool, k1=k1, b=b, vector=vector / weight)
    params["feedback"] = feedback
    params.update(lexemes=list(keyword.idf), idfs=list(keyword.idf.values()),
                  sparse_ids=[i for i, _ in keyword.hits], sparse_scores=[s for _, s in keyword.hits])
    with connection.cursor() as cursor, _hnsw_settings(cursor, pool):
        cursor.execute(_HYBRID_SQL, params)
        return [Candidate(r[0], float(r[1]), float(r[2]), r[3], r[4]) for r in cursor.fetchall()]


def hybrid_candidates(query: str, vector: np.ndarray, collections: list[Collection], pool: int, *,
                      k1: float | None = None, b: float | None = None) -> list[Candidate]:
    """The union of the ``pool`` best chunks by each method, each scored by both."""
    keyword = keyword_side(query, collections, pool, k1=k1, b=b)
    return hybrid_rescore(vector, keyword, collections, pool, k1=k1, b=b)


def _zscore(values: dict[int, float]) -> dict[int, float]:
    if not values:
        return {}
    mean = sum(values.values()) / len(values)
    spread = (sum((v - mean) ** 2 for v in values.values()) / len(values)) ** 0.5 or 1.0
    return {k: (v - mean) / spread for k, v in values.items()}


def fuse(candidates: list[Candidate], *, fusion: str = "convex", alpha: float | None = None,
         normalization: str | None = None, rrf_k: int = 60) -> list[tuple[Candidate, float, int | None, int | None]]:
    """Rank ``candidates``; returns (candidate, fused score, vector rank, keyword rank), best
    first. Ranks count only the candidates that method proposed (``None`` for the others).

    Convex fusion normalizes each score over the candidates, by ``zscore`` (mean 0, standard
    deviation 1) or ``minmax`` (to [0, 1]), then blends ``alpha * vector + (1 - alpha) * keyword``.
    """
    alpha = settings.KB_HYBRID_ALPHA if alpha is None else alpha
    normalize = _zscore if (normalization or settings.KB_HYBRID_NORMALIZATION) == "zscore" else _minmax
    dense = sorted((c for c in candidates if c.in_dense), key=lambda c: -c.cosine)
    sparse = sorted((c for c in candidates if c.in_sparse), key=lambda c: -c.bm25)
    dense_rank = {c.chunk_id: r for r, c in enumerate(dense, start=1)}
    sparse_rank = {c.chunk_id: r for r, c in enumerate(sparse, start=1)}
    if fusion == "rrf":
        scores = {c.chunk_id: (1 / (rrf_k + dense_rank[c.chunk_id]) if c.chunk_id in dense_rank else 0.0)
                  + (1 / (rrf_k + sparse_rank[c.chunk_id]) if c.chunk_id in sparse_rank else 0.0)
                  for c in candidates}
    else:
        cos = normalize({c.chunk_id: c.cosine for c in candidates})
        bm = normalize({c.chunk_id: c.bm25 for c in candidates})
        scores = {c.chunk_id: alpha * cos[c.chunk_id] + (1 - alpha) * bm[c.chunk_id] for c in candidates}
    ranked = sorted(candidates, key=lambda c: (-scores[c.chunk_id], c.chunk_id))
    return [(c, scores[c.chunk_id], dense_rank.get(c.chunk_id), sparse_rank.get(c.chunk_id)) for c in ranked]


def _minmax(values: dict[int, float]) -> dict[int, float]:
    if not values:
        return {}
    low, high = min(values.values()), max(values.values())
    span = high - low
    return {k: ((v - low) / span if span > 0 else 1.0) for k, v in values.items()}


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
    parent has no threads in the child)."""
    pid = os.getpid()
    pool = _encoders.get(pid)
    if pool is None:
        _encoders.clear()
        pool = _encoders[pid] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="query-embed",
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
    t0 = time.perf_counter()
    if query_vector is None:
        embedding = _query_encoder().submit(_timed, model.embed_query, query)
        keyword = keyword_side(query, collections, pool)
        timings.keyword_ms += (time.perf_counter() - t0) * 1000
        query_vector, embed_ms = embedding.result()
        timings.embed_ms += embed_ms
    else:  # a collapsed search's wider second pass: the query is embedded already
        keyword = keyword_side(query, collections, pool)
        timings.keyword_ms += (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    # The feedback was tuned for convex fusion; with RRF it cost nDCG@10 on SciFact's test
    # queries (0.722 -> 0.707), so RRF keeps the plain query vector.
    proposed = hybrid_rescore(query_vector, keyword, collections, pool, feedback=0 if fusion == "rrf" else None)
    timings.vector_ms += (time.perf_counter() - t0) * 1000
    hits = [SearchHit(chunk_id=c.chunk_id, score=score, vector_score=c.cosine, keyword_score=c.bm25,
                      vector_rank=vr, keyword_rank=kr)
            for c, score, vr, kr in fuse(proposed, fusion=fusion, alpha=alpha)[:limit]]
    full = len(keyword.hits) >= pool or sum(c.in_dense for c in proposed) >= pool
    return hits, full, query_vector
