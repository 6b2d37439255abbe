"""Embedding prepared documents: one encoder call per group of documents, and the local
encoder's thread count while a group is being stored on the second thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from django.conf import settings

from knowledge.embeddings import embedder
from knowledge.ingestion.preparation import Prepared

ChunkCallback = Callable[[int], None]


def _embed_prepared(group: list[Prepared], report: Callable[[Prepared, int], None],
                    on_chunks: ChunkCallback | None = None) -> list[tuple[np.ndarray, int]]:
    """Embed the chunks of ``group`` in one encoder call (with the chunker's token ids where it
    has them, ``ChunkDraft.input_ids``); return per-document ``(vectors, tokens)``.
    ``report(prepared, done_chunks)`` is called after each encoder batch for the documents that
    batch advanced, and ``on_chunks(n)`` with the batch's number of chunks.

    One call over the whole group lets the encoder sort every chunk of it by token count, so its
    batches pad little. Padding on SciFact's 11,867 chunks (2,125,678 tokens) in forward passes of
    64: one call over all of them 0.3 %, one call per group of 2,048 chunks 1.8 %, of 1,024 3.4 %;
    calls of 256 chunks cut from groups of 1,024 (before) 8.5 %. In passes of 16
    (``EMBEDDING_LOCAL_BATCH_SIZE``): 0.07 % over all of them, 0.4 % per group of 2,048.
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

    # The chunker's own tokens, where it has them: the local encoder need not tokenize again.
    batch = model.embed(texts, on_batch=on_batch, input_ids=[d.input_ids for p in group for d in p.drafts])
    tokens = np.bincount(owners, weights=batch.text_tokens, minlength=len(group)).astype(np.int64)
    result = []
    offset = 0
    for index, prepared in enumerate(group):
        n = len(prepared.drafts)
        result.append((batch.vectors[offset:offset + n], int(tokens[index])))
        offset += n
    return result


class _EncoderThreads:
    """The local encoder's intra-op threads on the ingesting thread: one fewer while a group is
    being stored on the second thread, all of them again once it is stored.

    The store is PostgreSQL's work (HNSW insertions, postings and their indexes), so while it
    runs one core is busy; torch's threads synchronize at every operator, and one of two on the
    shared core holds back the other. The thread count is per calling thread in torch, so this
    touches no other thread's encoder (query embedding). Applies to the ``local`` backend only;
    an endpoint's threads are not ours. Measurements: docs/perf/embedding-and-ingestion.md.
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
