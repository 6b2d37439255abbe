"""The candidate lists of each retrieval method, in SQL: BM25 over the posting table (the
keyword side, which also returns the query terms' IDFs), the nearest chunks by cosine through
pgvector's HNSW index, and hybrid's second statement, which finds the dense side (with the
pseudo-relevance feedback described in ``knowledge.retrieval``) and completes both scores of
every candidate. Formulas and sources are in the package's docstring.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.db import DatabaseError, connection

from knowledge.models import Collection


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector.tolist()) + "]"


# One posting's BM25 term (formula in the module docstring). k1 and b are cast to float8: Django's
# psycopg cursors bind parameters on the client, so a bare ``0.4`` reaches PostgreSQL as a numeric
# literal, and ``b * chunk_len`` was computed in numeric arithmetic for every posting. Measured on
# SciFact's 300 test queries (keyword side, 100 chunks): p50/p95 10.4/22.0 ms before, 7.4/14.6 after.
_BM25_TERM = ("idf.idf * p.tf * (%(k1)s::float8 + 1)"
              " / (p.tf + %(k1)s::float8 * (1 - %(b)s::float8 + %(b)s::float8 * p.chunk_len / stats.avglen))")

# A term's BM25 IDF (the non-negative variant; module docstring) from its document frequency
# ``{df}``, over the searched collections' ``stats.n`` chunks: one definition for the plain and the
# expanded query.
_BM25_IDF = "ln(1 + (stats.n - {df} + 0.5) / ({df} + 0.5))"

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
    SELECT p.lexeme, """ + _BM25_IDF.format(df="COUNT(*)") + """ AS idf
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

# The keyword side with RM3 pseudo-relevance feedback (formula in the package docstring): the
# ``%(fb_chunks)s`` best chunks by the query's BM25, each weighted by its share of their scores;
# the ``%(fb_terms)s`` terms most likely under them (tf / chunk length, summed over the weighted
# chunks), renormalized; the query's own terms (uniform) interpolated with them; then BM25 again
# with every term's IDF multiplied by its weight. The returned "IDFs" are those weighted IDFs, so
# the hybrid's second statement scores dense candidates by the same expanded query. The posting
# lists of the expanded terms are read through LATERAL subqueries, one index lookup per term:
# joined as a CTE, the planner guessed tens of thousands of terms and sorted the whole posting
# table for a merge join (540 ms on SciFact, against about 10 ms).
_KEYWORD_FEEDBACK_SQL = "WITH " + _BM25_CTES + """,
feedback AS (
    SELECT chunk_id, score / SUM(score) OVER () AS share
    FROM (SELECT chunk_id, score FROM bm25 ORDER BY score DESC, chunk_id LIMIT %(fb_chunks)s) AS best
), relevance AS (
    SELECT p.lexeme, SUM(f.share * p.tf::float8 / GREATEST(p.chunk_len, 1)) AS weight
    FROM feedback f JOIN knowledge_posting p USING (chunk_id)
    GROUP BY p.lexeme ORDER BY weight DESC, p.lexeme LIMIT %(fb_terms)s
), expansion AS (
    SELECT lexeme, weight / SUM(weight) OVER () AS weight FROM relevance
), original AS (
    SELECT lexeme, 1.0::float8 / COUNT(*) OVER () AS weight FROM idf
), weighted AS MATERIALIZED (
    SELECT lexeme, %(query_weight)s::float8 * COALESCE(o.weight, 0)
                   + (1 - %(query_weight)s::float8) * COALESCE(e.weight, 0) AS weight
    FROM original o FULL JOIN expansion e USING (lexeme)
), widf AS MATERIALIZED (
    SELECT w.lexeme, w.weight * """ + _BM25_IDF.format(df="d.df") + """ AS idf
    FROM weighted w CROSS JOIN stats CROSS JOIN LATERAL (
        SELECT COUNT(*) AS df FROM knowledge_posting p
        WHERE p.collection_id = ANY(%(collections)s) AND p.lexeme = w.lexeme
    ) AS d
    WHERE d.df > 0
), rescored AS (
    SELECT p.chunk_id, SUM(""" + _BM25_TERM + """) AS score
    FROM widf AS idf CROSS JOIN stats CROSS JOIN LATERAL (
        SELECT chunk_id, tf, chunk_len FROM knowledge_posting p
        WHERE p.collection_id = ANY(%(collections)s) AND p.lexeme = idf.lexeme
    ) AS p
    GROUP BY p.chunk_id
), top AS (
    SELECT chunk_id, score FROM rescored ORDER BY score DESC, chunk_id LIMIT %(pool)s
)
SELECT (SELECT COALESCE(array_agg(chunk_id ORDER BY score DESC, chunk_id), '{}') FROM top),
       (SELECT COALESCE(array_agg(score ORDER BY score DESC, chunk_id), '{}') FROM top),
       (SELECT COALESCE(array_agg(lexeme ORDER BY lexeme), '{}') FROM widf),
       (SELECT COALESCE(array_agg(idf ORDER BY lexeme), '{}') FROM widf)
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


def _exact_variant(sql: str, searches: int) -> str:
    """``sql`` with its ``searches`` nearest-neighbour ORDER BYs turned into exact ones: ordered by
    the distance plus 0, an expression no index serves, so PostgreSQL computes the distance of
    every row of the searched collections and keeps the nearest (pgvector's README uses the same
    ``+ 0`` to make PostgreSQL sort rather than take the index's order); ties go to the lower id."""
    exact, count = re.subn(r"ORDER BY embedding <=> \(SELECT v FROM (\w+)\) LIMIT",
                           r"ORDER BY (embedding <=> (SELECT v FROM \1)) + 0, id LIMIT", sql)
    assert count == searches, f"expected {searches} vector searches, found {count}"
    return exact


_EXACT_VECTOR_SQL = _exact_variant(_VECTOR_SQL, 1)
_EXACT_HYBRID_SQL = _exact_variant(_HYBRID_SQL, 2)


def _exact_search(collections: list[Collection]) -> bool:
    """Whether a vector search of ``collections`` is exact: when they hold at most
    ``KB_VECTOR_EXACT_MAX_CHUNKS`` chunks together (their ``chunk_count``), every row is compared
    (docs/perf/filtered-vector-search.md has the measurements behind the default)."""
    return sum(c.chunk_count for c in collections) <= settings.KB_VECTOR_EXACT_MAX_CHUNKS



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
    the query, because it concerns every query. The exact statements (``_exact_search``) run
    under the same settings: without sequential scans they read the collections' rows through
    the collection index.
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
                 b: float | None = None, feedback_chunks: int = 0, feedback_terms: int | None = None,
                 query_weight: float | None = None) -> KeywordSide:
    """The ``pool`` best chunks by BM25 and the query terms' IDFs, in one round trip.

    With ``feedback_chunks`` above 0 the query is first expanded by RM3 pseudo-relevance feedback
    (the package docstring): the ``feedback_terms`` (default ``KB_HYBRID_KEYWORD_FEEDBACK_TERMS``)
    most likely terms of its ``feedback_chunks`` best chunks, interpolated with the query's own
    terms at ``query_weight`` (default ``KB_HYBRID_KEYWORD_FEEDBACK_QUERY_WEIGHT``, 0-1). The
    scores are then BM25 of the weighted expanded query, and ``idf`` maps every term of that
    query to its weight times its IDF. Raises ``ValueError`` for a ``query_weight`` outside 0-1
    or ``feedback_terms`` below 1.
    """
    params = _params(query, collections, pool, k1=k1, b=b)
    sql = _KEYWORD_SQL
    if feedback_chunks > 0:
        terms = settings.KB_HYBRID_KEYWORD_FEEDBACK_TERMS if feedback_terms is None else feedback_terms
        weight = settings.KB_HYBRID_KEYWORD_FEEDBACK_QUERY_WEIGHT if query_weight is None else query_weight
        if not 0 <= weight <= 1:
            raise ValueError(f"query_weight must be between 0 and 1, not {weight}")
        if terms < 1:
            raise ValueError(f"feedback_terms must be 1 or more, not {terms}")
        params.update(fb_chunks=feedback_chunks, fb_terms=terms, query_weight=weight)
        sql = _KEYWORD_FEEDBACK_SQL
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        ids, scores, lexemes, idfs = cursor.fetchone()
    return KeywordSide([(i, float(s)) for i, s in zip(ids, scores, strict=True)],
                       {t: float(v) for t, v in zip(lexemes, idfs, strict=True)})


def keyword_candidates(query: str, collections: list[Collection], pool: int, *, k1: float | None = None,
                       b: float | None = None) -> list[tuple[int, float]]:
    """(chunk id, BM25 score) of the ``pool`` best chunks, best first."""
    return keyword_side(query, collections, pool, k1=k1, b=b).hits


def vector_candidates(vector: np.ndarray, collections: list[Collection], pool: int) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity) of the ``pool`` nearest chunks, best first: exact up to
    ``KB_VECTOR_EXACT_MAX_CHUNKS`` chunks in ``collections`` (``_exact_search``), else through
    the HNSW index."""
    sql = _EXACT_VECTOR_SQL if _exact_search(collections) else _VECTOR_SQL
    with connection.cursor() as cursor, _hnsw_settings(cursor, pool):
        cursor.execute(sql, _params("", collections, pool, k1=None, b=None, vector=vector))
        rows = cursor.fetchall()
    # Iterative scans return nearly sorted rows ("relaxed order"); sort them exactly.
    return sorted(((r[0], float(r[1])) for r in rows), key=lambda r: -r[1])


def hybrid_rescore(vector: np.ndarray, keyword: KeywordSide, collections: list[Collection], pool: int, *,
                   k1: float | None = None, b: float | None = None, feedback: int | None = None,
                   feedback_weight: float | None = None) -> list[Candidate]:
    """The union of ``keyword.hits`` and the ``pool`` nearest chunks, each scored by both methods.

    The dense side (exact or through the index, as in ``vector_candidates``) searches (and scores
    cosines) with the query vector plus ``feedback_weight``
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
    sql = _EXACT_HYBRID_SQL if _exact_search(collections) else _HYBRID_SQL
    with connection.cursor() as cursor, _hnsw_settings(cursor, pool):
        cursor.execute(sql, params)
        return [Candidate(r[0], float(r[1]), float(r[2]), r[3], r[4]) for r in cursor.fetchall()]


def hybrid_candidates(query: str, vector: np.ndarray, collections: list[Collection], pool: int, *,
                      k1: float | None = None, b: float | None = None) -> list[Candidate]:
    """The union of the ``pool`` best chunks by each method, each scored by both."""
    keyword = keyword_side(query, collections, pool, k1=k1, b=b)
    return hybrid_rescore(vector, keyword, collections, pool, k1=k1, b=b)

