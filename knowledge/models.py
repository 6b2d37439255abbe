"""Knowledge base, in each tenant's schema: collections, documents, chunks and their indexes.

Two indexes serve retrieval. Dense: ``Chunk.embedding`` with an HNSW index (cosine). Keyword: an
inverted index in ``Posting`` (one row per chunk and stemmed term, with the term frequency),
from which ``knowledge.retrieval`` computes Okapi BM25 with inverse document frequencies and
length normalization, something PostgreSQL's ``ts_rank`` does not do.
"""

from __future__ import annotations

from typing import ClassVar

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from pgvector.django import HnswIndex, VectorField

# PostgreSQL text-search configurations offered for stemming and stop words.
LANGUAGES = [
    ("english", "English"), ("german", "German"), ("french", "French"), ("spanish", "Spanish"),
    ("italian", "Italian"), ("portuguese", "Portuguese"), ("dutch", "Dutch"), ("arabic", "Arabic"),
    ("simple", "Other (no stemming)"),
]


class Collection(models.Model):
    """A set of documents searched together, with its embedding and chunking settings.

    ``chunk_count`` and ``lexeme_total`` are kept in step with the chunks (updated in the same
    transaction as each document's chunks) and give BM25 its N and average chunk length.
    """

    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    embedding_model = models.CharField(max_length=200)
    embedding_dim = models.PositiveIntegerField()
    chunk_size_tokens = models.PositiveIntegerField(default=200)
    chunk_overlap_tokens = models.PositiveIntegerField(default=32)
    language = models.CharField(max_length=20, choices=LANGUAGES, default="english")
    chunk_count = models.BigIntegerField(default=0)
    lexeme_total = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["name"]
        constraints: ClassVar = [
            models.UniqueConstraint(Lower("name"), name="collection_name_ci_unique"),
        ]

    def __str__(self) -> str:
        return self.name


def _upload_path(instance: Document, filename: str) -> str:
    from django.db import connection

    schema = getattr(connection, "schema_name", "public")
    return f"{schema}/kb/{instance.collection_id}/{instance.sha256}/{filename}"


class Document(models.Model):
    """One uploaded file (or one JSONL record) and the state of its ingestion."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PROCESSING = "processing", "Processing"
        INDEXED = "indexed", "Indexed"
        FAILED = "failed", "Failed"

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=500)
    external_id = models.CharField(max_length=200, blank=True)
    file = models.FileField(upload_to=_upload_path, max_length=500, blank=True)
    # Inline sources (a JSONL record) are kept here instead of in a file.
    source_text = models.TextField(blank=True)
    original_filename = models.CharField(max_length=255, blank=True)
    mime_type = models.CharField(max_length=100)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    progress = models.PositiveSmallIntegerField(default=0)
    chunk_count = models.PositiveIntegerField(default=0)
    page_count = models.PositiveIntegerField(null=True, blank=True)
    error_message = models.TextField(blank=True)
    job_id = models.CharField(max_length=64, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    indexed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering: ClassVar = ["-created_at", "-id"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["collection", "sha256"], name="document_collection_sha256_unique"),
            models.UniqueConstraint(fields=["collection", "external_id"], condition=~models.Q(external_id=""),
                                    name="document_collection_external_id_unique"),
        ]
        indexes: ClassVar = [
            models.Index(fields=["status", "heartbeat_at"], name="document_status_heartbeat"),
            models.Index(fields=["collection", "-created_at"], name="document_collection_created"),
        ]

    def __str__(self) -> str:
        return self.title

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.PENDING, self.Status.PROCESSING)


class Chunk(models.Model):
    """A passage of a document, small enough for the embedding model, with where it came from.

    ``char_start``/``char_end`` are offsets in the document's extracted text; ``page_number`` is
    1-based (``None`` for formats without pages); ``heading_path`` lists the enclosing headings,
    outermost first. ``token_count`` counts the embedding model's tokens of ``text``;
    ``lexeme_count`` counts the stemmed terms BM25 sees (title and headings included).
    """

    # Both lookups are served by the indexes in Meta (chunk_collection; the unique
    # (document, ordinal) constraint), so the foreign keys need no index of their own.
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+", db_index=False)
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks", db_index=False)
    ordinal = models.PositiveIntegerField()
    text = models.TextField()
    heading_path = models.JSONField(default=list, blank=True)
    page_number = models.PositiveIntegerField(null=True, blank=True)
    char_start = models.PositiveIntegerField()
    char_end = models.PositiveIntegerField()
    token_count = models.PositiveIntegerField()
    lexeme_count = models.PositiveIntegerField(default=0)
    embedding = VectorField(dimensions=settings.EMBEDDING_DIM)

    class Meta:
        ordering: ClassVar = ["document", "ordinal"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["document", "ordinal"], name="chunk_document_ordinal_unique"),
        ]
        indexes: ClassVar = [
            HnswIndex(name="chunk_embedding_hnsw", fields=["embedding"], m=16, ef_construction=64,
                      opclasses=["vector_cosine_ops"]),
            models.Index(fields=["collection"], name="chunk_collection"),
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.ordinal}"


class Posting(models.Model):
    """Inverted-index entry: ``lexeme`` occurs ``tf`` times in ``chunk`` (of length ``chunk_len``).

    Lexemes come from PostgreSQL's ``to_tsvector`` with the collection's language, so the same
    stemming and stop words apply when documents are indexed and when queries are parsed.
    ``collection_id`` and ``chunk_len`` are copied here so BM25 reads only this table's index.

    The primary key is (chunk, lexeme): a chunk has one posting per term, the key's index serves
    the lookups by chunk (deleting a document's postings; scoring the dense candidates of a
    hybrid search by their query terms), and no surrogate id is numbered and indexed for each of
    the ~60 rows a chunk writes.
    """

    pk = models.CompositePrimaryKey("chunk", "lexeme")
    # ``collection`` is the chunk's own, copied by the statement that writes both (``_INDEX_SQL``):
    # the chunk's foreign key already ties it to an existing collection, so the posting's is
    # declared for the ORM only. Checking it in the database cost 2.0 s of PostgreSQL CPU per
    # SciFact load (684,465 postings, 6.2 s against 4.2 s without it), time the encoder loses.
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+", db_index=False,
                                   db_constraint=False)
    chunk = models.ForeignKey(Chunk, on_delete=models.CASCADE, related_name="+", db_index=False)
    lexeme = models.TextField()
    tf = models.PositiveIntegerField()
    chunk_len = models.PositiveIntegerField()

    class Meta:
        indexes: ClassVar = [
            models.Index(fields=["collection", "lexeme"], include=["chunk", "tf", "chunk_len"],
                         name="posting_collection_lexeme"),
        ]

    def __str__(self) -> str:
        return f"{self.lexeme} in {self.chunk_id}"
