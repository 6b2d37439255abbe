"""Fusion of hybrid search's two scores: convex combination of normalized scores (z-score or
min-max) or reciprocal rank fusion; sources in the package's docstring.
"""

from __future__ import annotations

from django.conf import settings

from knowledge.retrieval.candidates import Candidate


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

