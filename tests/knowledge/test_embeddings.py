"""The local embedder computes what sentence-transformers computes, and counts tokens as the model sees them."""

from __future__ import annotations

import numpy as np

from knowledge.embeddings import LocalEmbedder, count_tokens, embedder

TEXTS = [
    "Refunds are accepted within thirty days of purchase.",
    "A",
    "Vacation: twenty-five days a year. " * 3,
    # Longer than the model's 256-token window: both paths must truncate it the same way.
    " ".join(f"clause {i} of the travel policy applies to contractors and employees alike" for i in range(60)),
    "Über die Rückerstattung entscheidet die Buchhaltung.",
]


def _local() -> LocalEmbedder:
    model = embedder()
    assert isinstance(model, LocalEmbedder)
    return model


def test_embed_matches_the_sentence_transformers_pipeline_in_any_input_order() -> None:
    model = _local()
    batch = model.embed(TEXTS)
    reference = model._model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert batch.vectors.shape == (len(TEXTS), 384) and batch.vectors.dtype == np.float32
    # Row i belongs to text i (the batches run in length order and are put back).
    np.testing.assert_allclose(batch.vectors, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, atol=1e-5)


def test_embed_counts_the_tokens_the_model_reads_including_truncation() -> None:
    model = _local()
    batch = model.embed(TEXTS)
    assert batch.tokens == count_tokens(TEXTS)
    # The long text is cut at the window; counting it whole would overstate the cost.
    assert count_tokens(TEXTS[3:4]) == model.max_tokens
    assert model.embed([]).tokens == 0 and model.embed([]).vectors.shape == (0, 384)


def test_embed_query_in_float32_is_the_same_vector_as_embed(settings: object) -> None:
    settings.EMBEDDING_QUERY_DTYPE = "float32"  # type: ignore[attr-defined]
    model = LocalEmbedder()
    assert model.query_dtype == "float32" and model._query_graph is not None  # the traced graph answers
    for text in TEXTS:  # of every length, the truncated one included
        np.testing.assert_allclose(model.embed_query(text), model.embed([text]).vectors[0], atol=2e-5)


def test_without_a_usable_query_graph_queries_run_the_eager_model(settings: object, monkeypatch: object) -> None:
    import torch

    from knowledge import embeddings

    settings.EMBEDDING_QUERY_DTYPE = "float32"  # type: ignore[attr-defined]
    # A graph whose vectors drift from the eager model's is refused...
    monkeypatch.setattr(embeddings, "_GRAPH_MIN_COSINE", 1.5)  # type: ignore[attr-defined]
    drifted = LocalEmbedder()
    assert drifted._query_graph is None
    # ...and so is one the tracer cannot build.
    monkeypatch.undo()  # type: ignore[attr-defined]

    def broken_trace(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)  # type: ignore[attr-defined]
    untraced = LocalEmbedder()
    assert untraced._query_graph is None
    for model in (drifted, untraced):
        np.testing.assert_allclose(model.embed_query(TEXTS[0]), model.embed(TEXTS[:1]).vectors[0], atol=2e-5)


def test_bfloat16_queries_stay_within_cosine_0_9999_of_the_float32_vectors(settings: object) -> None:
    import torch

    settings.EMBEDDING_QUERY_DTYPE = "bfloat16"  # type: ignore[attr-defined]
    model = LocalEmbedder()
    assert next(model._query_transformer.parameters()).dtype == torch.bfloat16
    assert model._query_graph is None  # the traced graph is for float32 weights only
    # Documents keep the float32 weights.
    assert next(model._transformer.parameters()).dtype == torch.float32
    documents = model.embed(TEXTS).vectors
    np.testing.assert_allclose(documents, model._model.encode(TEXTS, normalize_embeddings=True), atol=2e-5)
    for text, reference in zip(TEXTS, documents, strict=True):
        query = model.embed_query(text)
        assert query.dtype == np.float32 and abs(float(np.linalg.norm(query)) - 1.0) < 1e-5
        # Not the float32 vector (the bfloat16 weights are in use), but within the bound.
        assert 0.9999 <= float(query @ reference) < 1.0 - 1e-7


def test_auto_query_dtype_takes_bfloat16_only_where_the_cpu_has_it(monkeypatch: object) -> None:
    import torch

    from knowledge.embeddings import query_dtype

    # oneDNN says yes on plain AVX-512 too (it emulates bfloat16 there, slower than float32):
    # its answer must not matter.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # type: ignore[attr-defined]
    for avx512_bf16, amx, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"),
                                       (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported",  # type: ignore[attr-defined]
                            lambda avx512_bf16=avx512_bf16: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)  # type: ignore[attr-defined]
        assert query_dtype("auto") == expected
    # A torch without the probe: float32.
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # type: ignore[attr-defined]
    assert query_dtype("auto") == "float32"
    # An explicit setting is taken as it is.
    assert query_dtype("float32") == "float32" and query_dtype("bfloat16") == "bfloat16"


def test_small_batches_give_the_same_vectors(settings: object) -> None:
    settings.EMBEDDING_LOCAL_BATCH_SIZE = 2  # type: ignore[attr-defined]
    model = _local()
    reference = model._model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(model.embed(TEXTS).vectors, reference, atol=2e-5)


def test_embedder_warm_loads_the_model_on_a_background_thread(settings: object, monkeypatch: object) -> None:
    import threading

    from structlog.testing import capture_logs

    from knowledge import embeddings

    calls: list[str] = []

    def loading() -> LocalEmbedder:
        calls.append(threading.current_thread().name)
        return _local()

    monkeypatch.setattr(embeddings, "embedder", loading)  # type: ignore[attr-defined]
    thread = embeddings.embedder_warm()
    assert thread is not None
    thread.join(60)
    assert calls == ["embedder-preload"] and calls[0] != threading.current_thread().name
    # Off by setting, or with an endpoint backend (nothing to load): no thread.
    settings.EMBEDDING_PRELOAD = False  # type: ignore[attr-defined]
    assert embeddings.embedder_warm() is None
    settings.EMBEDDING_PRELOAD, settings.EMBEDDING_BACKEND = True, "litellm"  # type: ignore[attr-defined]
    assert embeddings.embedder_warm() is None
    # A model that cannot load is logged; the process goes on (the first search raises it).
    settings.EMBEDDING_BACKEND = "local"  # type: ignore[attr-defined]

    def broken() -> LocalEmbedder:
        raise embeddings.EmbeddingError("weights missing")

    monkeypatch.setattr(embeddings, "embedder", broken)  # type: ignore[attr-defined]
    with capture_logs() as logs:
        thread = embeddings.embedder_warm()
        assert thread is not None
        thread.join(60)
    assert [entry["event"] for entry in logs] == ["embedder_preload_failed"]
    assert "weights missing" in logs[0]["error"]


def test_building_the_query_graph_leaves_the_eager_weights_untouched() -> None:
    import torch

    from knowledge.embeddings import _query_graph

    model = _local()
    before = {name: tensor.clone() for name, tensor in model._transformer.state_dict().items()}
    graph = _query_graph(model._transformer, model._model.tokenizer, model.max_tokens)
    assert graph is not None
    after = model._transformer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.dtype == torch.float32 and p.layout == torch.strided for p in model._transformer.parameters())


def test_embed_takes_given_input_ids_instead_of_tokenizing_and_checks_them() -> None:
    import pytest

    model = embedder()
    tokenizer = model.tokenizer()
    ids = tokenizer(TEXTS, add_special_tokens=True, truncation=True, max_length=model.max_tokens)["input_ids"]
    plain = model.embed(TEXTS)
    # Some texts given as ids, the others tokenized here: the same vectors and token counts.
    mixed = model.embed(TEXTS, input_ids=[row if i % 2 else None for i, row in enumerate(ids)])
    np.testing.assert_allclose(mixed.vectors, plain.vectors, atol=1e-6)
    assert mixed.text_tokens.tolist() == plain.text_tokens.tolist()
    # The ids are what is embedded (here: the first text's ids for every text).
    swapped = model.embed(TEXTS, input_ids=[ids[0]] * len(TEXTS))
    np.testing.assert_allclose(swapped.vectors, np.repeat(plain.vectors[:1], len(TEXTS), axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="input_ids for"):
        model.embed(TEXTS, input_ids=[None])
    with pytest.raises(ValueError, match="longer than the model"):
        model.embed(["x"], input_ids=[[101] + [1000] * model.max_tokens + [102]])


def test_concurrent_queries_are_embedded_together_and_each_gets_its_own_vector(monkeypatch: object) -> None:
    import threading

    model = _local()
    alone = {text: model.embed_query(text) for text in TEXTS}
    passes: list[int] = []
    real = model._queries_embed

    def counted(batch: list) -> None:  # type: ignore[type-arg]
        passes.append(len(batch))
        real(batch)

    monkeypatch.setattr(model, "_queries_embed", counted)  # type: ignore[attr-defined]
    texts = TEXTS * 6
    got: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(texts))

    def ask(i: int) -> None:
        start.wait()
        got[i] = model.embed_query(texts[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    with model._lock:  # one pass "runs" while every query arrives: they must wait and batch
        for thread in threads:
            thread.start()
        while len(model._queries) < len(texts):
            threading.Event().wait(0.005)
    for thread in threads:
        thread.join(timeout=60)
    assert passes == [len(texts)]  # one padded pass for all of them, not one each
    for i, text in enumerate(texts):  # each caller its own text's vector, padded or not
        # Within the bound queries already keep (bfloat16 weights, where the CPU has them).
        assert float(np.dot(got[i], alone[text])) >= 0.9999, (text, model.query_dtype)
        others = [t for t in TEXTS if t != text]
        assert all(float(np.dot(got[i], alone[t])) < 0.999 for t in others)


def test_a_failed_pass_raises_in_every_query_it_held(monkeypatch: object) -> None:
    import threading

    import pytest

    model = _local()

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("the model broke")

    monkeypatch.setattr(model, "_forward", broken)  # type: ignore[attr-defined]
    monkeypatch.setattr(model, "_query_graph", None)  # type: ignore[attr-defined]
    errors: list[BaseException] = []

    def ask() -> None:
        with pytest.raises(RuntimeError, match="the model broke") as raised:
            model.embed_query("refunds")
        errors.append(raised.value)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    with model._lock:
        for thread in threads:
            thread.start()
        while len(model._queries) < 4:
            threading.Event().wait(0.005)
    for thread in threads:
        thread.join(timeout=60)
    assert len(errors) == 4 and not model._queries
