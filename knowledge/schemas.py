"""API shapes for the knowledge base."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ninja import Field, Schema


class CollectionIn(Schema):
    name: str = Field(max_length=200)
    description: str = ""
    chunk_size_tokens: int = 200
    chunk_overlap_tokens: int = 32
    language: str = "english"


class CollectionPatch(Schema):
    name: str | None = Field(None, max_length=200)
    description: str | None = None
    chunk_size_tokens: int | None = None
    chunk_overlap_tokens: int | None = None
    language: str | None = None


class CollectionOut(Schema):
    id: int
    name: str
    description: str
    embedding_model: str
    embedding_dim: int
    chunk_size_tokens: int
    chunk_overlap_tokens: int
    language: str
    document_count: int
    chunk_count: int
    created_at: dt.datetime
    updated_at: dt.datetime


class CollectionPage(Schema):
    items: list[CollectionOut]
    next_cursor: str | None


class DocumentOut(Schema):
    id: int
    collection_id: int
    title: str
    external_id: str
    original_filename: str
    mime_type: str
    size_bytes: int
    sha256: str
    status: str
    progress: int = Field(description="0-100")
    chunk_count: int
    page_count: int | None
    error_message: str
    warnings: list[str]
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    indexed_at: dt.datetime | None


class DocumentPage(Schema):
    items: list[DocumentOut]
    next_cursor: str | None


class LineError(Schema):
    file: str
    line: int
    error: str


class UploadOut(Schema):
    created: list[DocumentOut]
    updated: list[DocumentOut] = Field(description="JSONL records whose _id existed with other content")
    duplicates: list[DocumentOut] = Field(description="Files already in the collection (same SHA-256)")
    line_errors: list[LineError]


class ChunkOut(Schema):
    id: int
    ordinal: int
    text: str
    heading_path: list[str]
    page_number: int | None
    char_start: int
    char_end: int
    token_count: int


class ChunkPage(Schema):
    items: list[ChunkOut]
    next_cursor: str | None


class SearchIn(Schema):
    query: str = Field(max_length=2000)
    collection_ids: list[int] = Field(min_length=1, max_length=50)
    top_k: int = 10
    mode: str = "hybrid"
    fusion: str = "convex"
    max_chunks_per_document: int | None = Field(
        None, description="At most this many chunks of any one document (1: a ranking of documents by their best "
                          "chunk); absent or null for no limit. Below 1 is a validation error.")


class SearchHitOut(Schema):
    chunk_id: int
    score: float
    vector_score: float | None
    keyword_score: float | None
    vector_rank: int | None
    keyword_rank: int | None
    text: str
    document_id: int
    external_id: str
    title: str
    page_number: int | None
    heading_path: list[str]
    collection_id: int


class SearchOut(Schema):
    query: str
    mode: str
    results: list[SearchHitOut]
    timings_ms: dict[str, Any]
