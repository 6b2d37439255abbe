"""Retrieval: ``chunk_search`` over one or more collections, by vector, keyword or both.

* ``vector``: cosine similarity of all-MiniLM-L6-v2 embeddings. Collections holding at most
  ``KB_VECTOR_EXACT_MAX_CHUNKS`` chunks together are searched exactly (every chunk compared), so
  the answer depends neither on the planner's statistics nor on the tenant's other collections;
  larger ones through pgvector's HNSW index, with ``hnsw.ef_search`` sized to the request and
  ``hnsw.iterative_scan`` on, so a filter on collections cannot starve the result (the index
  walks every collection's graph, so its filtered answers are approximate:
  docs/perf/filtered-vector-search.md). Hybrid's dense side follows the same rule.
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
* Pseudo-relevance feedback on hybrid's keyword side: RM3 (Lavrenko & Croft, "Relevance-Based
  Language Models", SIGIR 2001, interpolated with the query as in Abdul-Jaleel et al., "UMass at
  TREC 2004", with Anserini's weighting of feedback documents by their retrieval scores). The
  ``d`` best chunks by the query's BM25 get weights ``s_i / sum(s)`` (their scores' shares); a
  term's relevance is ``P(w|R) = sum_i share_i * tf(w, c_i) / len(c_i)``; the ``t`` likeliest
  terms, renormalized to sum 1, are interpolated with the query's own terms (uniform, ``1/|q|``)
  as ``l * P(w|q) + (1 - l) * P(w|R)``; the keyword side is then BM25 of that weighted query,
  ``sum_w weight(w) * idf(w) * tf * (k1 + 1) / (...)``, and the dense candidates are scored by the
  same weighted terms (``KB_HYBRID_KEYWORD_FEEDBACK_CHUNKS`` d = 7, ``..._TERMS`` t = 15,
  ``..._QUERY_WEIGHT`` l = 0.8). One statement. It widens recall more than it ranks: on SciFact
  train nDCG@10 / recall@100 went from 0.7454 / 0.9613 to 0.7473 / 0.9644 and test from 0.7381 /
  0.9667 to 0.7332 / 0.9767. ``keyword`` mode stays plain BM25 of the query's own terms, and RRF
  searches without either feedback (both were tuned for convex fusion).

The defaults (``KB_BM25_K1``, ``KB_BM25_B``, ``KB_HYBRID_ALPHA``, ``KB_HYBRID_NORMALIZATION``,
both feedbacks' settings) were chosen on SciFact's *train* queries (``tests/bench/tune_retrieval.py``,
``--feedback`` and ``--keyword-feedback`` for the feedbacks) and are evaluated on its test queries.

The package's modules: ``candidates`` (each method's candidate list in SQL), ``fusion`` (the
fused ranking) and ``search`` (``chunk_search``). The names other apps use are re-exported here;
the private ones (and the tests' patch points) live in their modules.
"""

from knowledge.retrieval.candidates import (
    Candidate,
    KeywordSide,
    hybrid_candidates,
    hybrid_rescore,
    keyword_candidates,
    keyword_side,
    vector_candidates,
)
from knowledge.retrieval.fusion import fuse
from knowledge.retrieval.search import (
    MAX_POOL,
    MAX_QUERY_CHARS,
    MAX_TOP_K,
    MODES,
    SearchHit,
    SearchTimings,
    chunk_search,
    collapse_by_document,
)

__all__ = [
    "MAX_POOL",
    "MAX_QUERY_CHARS",
    "MAX_TOP_K",
    "MODES",
    "Candidate",
    "KeywordSide",
    "SearchHit",
    "SearchTimings",
    "chunk_search",
    "collapse_by_document",
    "fuse",
    "hybrid_candidates",
    "hybrid_rescore",
    "keyword_candidates",
    "keyword_side",
    "vector_candidates",
]
