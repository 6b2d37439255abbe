"""Search answers do not depend on when you ask: right after an upload, among near-duplicate
collections of the same tenant, every mode returns what exact search returns.

The tenant is new (made inside the test's transaction, so autovacuum never analyzes it) and its
six collections hold the same generated passages with one word changed per collection; each file
is uploaded and indexed on its own, as the console's uploads are. Vectors come from a scripted
embeddings endpoint (a real HTTP server, the process boundary) that sums a fixed random vector
per word, so near-identical texts get near-identical vectors, as a real model gives them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from django.db import connection
from django_tenants.utils import schema_context

from knowledge import embeddings
from knowledge.ingestion import ingest_documents
from knowledge.models import Collection
from knowledge.retrieval import chunk_search
from knowledge.retrieval.candidates import _vector_literal
from knowledge.services import collection_create, document_upload
from tenants.principal import Principal
from tenants.services.provisioning import tenant_create

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

DIM = 384
PASSAGES = 600
COLLECTIONS = 6  # five near-duplicates, then the one under test
PASSAGES_PER_FILE = 12
WORDS = 14


def _word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.lower().encode()).digest()[:8], "big")
    return np.random.default_rng(seed).normal(size=DIM)


def _embed(text: str) -> list[float]:
    vector = np.sum([_word_vector(w) for w in text.split()], axis=0)
    return [float(x) for x in vector / np.linalg.norm(vector)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        return

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = json.dumps({"object": "list", "model": body.get("model"),
                           "data": [{"object": "embedding", "index": i, "embedding": _embed(t)}
                                    for i, t in enumerate(texts)],
                           "usage": {"prompt_tokens": sum(len(t.split()) for t in texts),
                                     "total_tokens": sum(len(t.split()) for t in texts)}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def word_embeddings(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The deployment's embedder is the scripted endpoint (for this test only)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.EMBEDDING_BACKEND = "litellm"
    settings.EMBEDDING_MODEL = "openai/word-sum"
    settings.EMBEDDING_API_BASE = f"http://127.0.0.1:{server.server_address[1]}/v1"
    settings.EMBEDDING_API_KEY = "test"
    monkeypatch.setattr(embeddings, "_embedder", None)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _passages() -> list[list[str]]:
    rng = np.random.default_rng(28)
    syllables = ["ka", "lo", "mi", "ter", "san", "dro", "vel", "pu", "rin", "gos", "tal", "men", "bri", "fo"]
    vocabulary = sorted({"".join(rng.choice(syllables, size=3)) for _ in range(900)})
    return [list(rng.choice(vocabulary, size=WORDS, replace=False)) for _ in range(PASSAGES)]


def _copy(words: list[str], collection: int) -> str:
    """The passage as collection ``collection`` holds it: one word swapped for that collection's."""
    changed = list(words)
    changed[collection % WORDS] = f"variant{collection}"
    return " ".join(changed)


def _exact_vector_ids(collection: Collection, query: str, k: int) -> list[int]:
    """The ``k`` nearest chunks of ``collection`` by cosine, computed over all of its rows."""
    vector = embeddings.embedder().embed_query(query)
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM knowledge_chunk WHERE collection_id = %s "
                       "ORDER BY (embedding <=> %s::vector) + 0, id LIMIT %s",
                       [collection.pk, _vector_literal(vector), k])
        return [row[0] for row in cursor.fetchall()]


def test_a_new_collection_among_near_duplicates_answers_as_exact_search_right_after_its_upload(
        word_embeddings: None) -> None:
    passages = _passages()
    system = Principal.system("t")
    tenant = tenant_create(actor=system, slug=f"dup-{uuid.uuid4().hex[:8]}", name="Near duplicates",
                           owner_email="dup@example.com").tenant
    with schema_context(tenant.schema_name):
        principal = Principal.system("t", tenant=tenant)
        collections = []
        for c in range(COLLECTIONS):
            collection = collection_create(principal=principal, name=f"copy {c}", chunk_size_tokens=32,
                                           chunk_overlap_tokens=0)
            for start in range(0, PASSAGES, PASSAGES_PER_FILE):
                text = "\n\n".join(_copy(p, c) for p in passages[start:start + PASSAGES_PER_FILE])
                created = document_upload(principal=principal, collection=collection, filename=f"part{start}.txt",
                                          data=text.encode(), queue=False).created
                # One file, one ingestion job: what an upload through the console or API runs.
                assert ingest_documents([d.pk for d in created]).indexed == 1
            collection.refresh_from_db()
            collections.append(collection)
        target = collections[-1]
        rng = np.random.default_rng(6)
        queries = [" ".join(rng.choice(passages[i], size=5, replace=False))
                   for i in rng.choice(PASSAGES, size=40, replace=False)]

        recalls: dict[str, list[float]] = {}
        for mode, fusion, top_k in (("vector", "convex", 5), ("vector", "convex", 20), ("keyword", "convex", 10),
                                    ("hybrid", "convex", 10), ("hybrid", "rrf", 10)):
            for query in queries:
                hits = chunk_search(query=query, collections=[target], mode=mode, fusion=fusion, top_k=top_k,
                                    record_usage=False)
                # The same search with every dense candidate list computed exactly.
                with connection.cursor() as cursor:
                    cursor.execute("SET enable_indexscan = off")
                try:
                    exact = chunk_search(query=query, collections=[target], mode=mode, fusion=fusion, top_k=top_k,
                                         record_usage=False)
                finally:
                    with connection.cursor() as cursor:
                        cursor.execute("RESET enable_indexscan")
                if mode == "vector":
                    assert [h.chunk_id for h in exact] == _exact_vector_ids(target, query, top_k)
                truth = {h.chunk_id for h in exact}
                recalls.setdefault(f"{mode}/{fusion}@{top_k}", []).append(
                    len(truth & {h.chunk_id for h in hits}) / len(truth))

    means = {name: float(np.mean(values)) for name, values in recalls.items()}
    assert all(mean >= 0.98 for mean in means.values()), means
