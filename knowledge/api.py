"""REST endpoints for the knowledge base (``kb:read`` to read and search, ``kb:write`` to change)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import File, Query, Router, Schema, Status, UploadedFile

from config.api import keyset_page, principal_of
from config.errors import ValidationFailed
from knowledge import selectors, services
from knowledge.models import Chunk, Collection, Document
from knowledge.retrieval import SearchTimings, chunk_search
from knowledge.schemas import (
    ChunkPage,
    CollectionIn,
    CollectionOut,
    CollectionPage,
    CollectionPatch,
    DocumentOut,
    DocumentPage,
    SearchIn,
    SearchOut,
    UploadOut,
)

router = Router(tags=["knowledge"])


class PageParams(Schema):
    limit: int = 50
    cursor: str | None = None


class DocumentFilters(PageParams):
    status: str | None = None


def collection_out(c: Collection) -> dict[str, Any]:
    return {"id": c.pk, "name": c.name, "description": c.description, "embedding_model": c.embedding_model,
            "embedding_dim": c.embedding_dim, "chunk_size_tokens": c.chunk_size_tokens,
            "chunk_overlap_tokens": c.chunk_overlap_tokens, "language": c.language,
            "document_count": getattr(c, "document_count", 0), "chunk_count": c.chunk_count,
            "created_at": c.created_at, "updated_at": c.updated_at}


def document_out(d: Document) -> dict[str, Any]:
    return {"id": d.pk, "collection_id": d.collection_id, "title": d.title, "external_id": d.external_id,
            "original_filename": d.original_filename, "mime_type": d.mime_type, "size_bytes": d.size_bytes,
            "sha256": d.sha256, "status": d.status, "progress": d.progress, "chunk_count": d.chunk_count,
            "page_count": d.page_count, "error_message": d.error_message,
            "warnings": list(d.metadata.get("warnings", [])), "attempts": d.attempts, "created_at": d.created_at,
            "updated_at": d.updated_at, "indexed_at": d.indexed_at}


def chunk_out(c: Chunk) -> dict[str, Any]:
    return {"id": c.pk, "ordinal": c.ordinal, "text": c.text, "heading_path": c.heading_path,
            "page_number": c.page_number, "char_start": c.char_start, "char_end": c.char_end,
            "token_count": c.token_count}


@router.get("/knowledge/collections", response=CollectionPage, summary="Collections")
def collection_list(request: HttpRequest, page: Query[PageParams]) -> dict[str, Any]:
    rows, cursor = keyset_page(selectors.collection_list(principal=principal_of(request)), cursor=page.cursor,
                               limit=page.limit)
    return {"items": [collection_out(c) for c in rows], "next_cursor": cursor}


@router.post("/knowledge/collections", response={201: CollectionOut}, summary="Create a collection")
def collection_create(request: HttpRequest, payload: CollectionIn) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    # The answer reads the collection back, which needs kb:read: refuse before anything is written.
    principal.require("kb:read")
    collection = services.collection_create(principal=principal, **payload.dict())
    return Status(201, collection_out(selectors.collection_get(principal=principal, collection_id=collection.pk)))


@router.get("/knowledge/collections/{collection_id}", response=CollectionOut, summary="One collection")
def collection_get(request: HttpRequest, collection_id: int) -> dict[str, Any]:
    return collection_out(selectors.collection_get(principal=principal_of(request), collection_id=collection_id))


@router.patch("/knowledge/collections/{collection_id}", response=CollectionOut,
              summary="Change a collection (changing chunking or language re-indexes it)")
def collection_update(request: HttpRequest, collection_id: int, payload: CollectionPatch) -> dict[str, Any]:
    principal = principal_of(request)
    collection = selectors.collection_get(principal=principal, collection_id=collection_id)
    services.collection_update(principal=principal, collection=collection, **payload.dict(exclude_unset=True))
    return collection_out(selectors.collection_get(principal=principal, collection_id=collection_id))


@router.delete("/knowledge/collections/{collection_id}", response={204: None},
               summary="Delete a collection with its documents")
def collection_delete(request: HttpRequest, collection_id: int) -> Status[None]:
    principal = principal_of(request)
    collection = selectors.collection_get(principal=principal, collection_id=collection_id)
    services.collection_delete(principal=principal, collection=collection)
    return Status(204, None)


@router.post("/knowledge/collections/{collection_id}/documents", response={200: UploadOut, 201: UploadOut},
             summary="Upload documents (multipart field 'files', several allowed)")
def document_upload(request: HttpRequest, collection_id: int,
                    files: File[list[UploadedFile]]) -> Status[dict[str, Any]]:
    """Upload PDF, DOCX, HTML, Markdown, text or JSONL files. 201 when at least one document was
    created, 200 when every file was already in the collection. A file that is too large (413),
    of an unsupported type (415) or empty (422) fails the whole request and stores nothing."""
    principal = principal_of(request)
    collection = selectors.collection_get(principal=principal, collection_id=collection_id)
    if not files:
        raise ValidationFailed("Send at least one file in the 'files' field.", code="no_files")
    results = []
    from django.db import transaction

    # All or nothing: a rejected file (its name is in the error) stores none of the others.
    with transaction.atomic():
        for upload in files:
            result = services.document_upload(principal=principal, collection=collection,
                                              filename=upload.name or "upload", data=upload.read())
            results.append((upload.name or "upload", result))
    body = {
        "created": [document_out(d) for _, r in results for d in r.created],
        "updated": [document_out(d) for _, r in results for d in r.updated],
        "duplicates": [document_out(d) for _, r in results for d in r.duplicates],
        "line_errors": [{"file": name, **e} for name, r in results for e in r.line_errors],
    }
    return Status(201 if body["created"] else 200, body)


@router.get("/knowledge/collections/{collection_id}/documents", response=DocumentPage,
            summary="Documents of a collection, newest first")
def document_list(request: HttpRequest, collection_id: int, filters: Query[DocumentFilters]) -> dict[str, Any]:
    principal = principal_of(request)
    collection = selectors.collection_get(principal=principal, collection_id=collection_id)
    documents = selectors.document_list(principal=principal, collection=collection, status=filters.status)
    rows, cursor = keyset_page(documents, cursor=filters.cursor, limit=filters.limit)
    return {"items": [document_out(d) for d in rows], "next_cursor": cursor}


@router.get("/knowledge/documents/{document_id}", response=DocumentOut,
            summary="One document, with its indexing status and progress")
def document_get(request: HttpRequest, document_id: int) -> dict[str, Any]:
    return document_out(selectors.document_get(principal=principal_of(request), document_id=document_id))


@router.delete("/knowledge/documents/{document_id}", response={204: None},
               summary="Delete a document, its chunks and its file")
def document_delete(request: HttpRequest, document_id: int) -> Status[None]:
    principal = principal_of(request)
    services.document_delete(principal=principal,
                             document=selectors.document_get(principal=principal, document_id=document_id))
    return Status(204, None)


@router.post("/knowledge/documents/{document_id}/reindex", response={202: DocumentOut},
             summary="Queue a document for indexing again")
def document_reindex(request: HttpRequest, document_id: int) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    document = services.document_reindex(
        principal=principal, document=selectors.document_get(principal=principal, document_id=document_id))
    return Status(202, document_out(document))


@router.get("/knowledge/documents/{document_id}/chunks", response=ChunkPage, summary="A document's chunks")
def chunk_list(request: HttpRequest, document_id: int, page: Query[PageParams]) -> dict[str, Any]:
    principal = principal_of(request)
    document = selectors.document_get(principal=principal, document_id=document_id)
    rows, cursor = keyset_page(selectors.chunk_list(principal=principal, document=document), cursor=page.cursor,
                               limit=page.limit, descending=False)
    return {"items": [chunk_out(c) for c in rows], "next_cursor": cursor}


@router.post("/knowledge/search", response=SearchOut, summary="Search collections (vector, keyword or hybrid)")
def search(request: HttpRequest, payload: SearchIn) -> dict[str, Any]:
    principal = principal_of(request)
    collections = selectors.collections_for_search(principal=principal, collection_ids=payload.collection_ids)
    timings = SearchTimings()
    hits = chunk_search(query=payload.query, collections=collections, top_k=payload.top_k, mode=payload.mode,
                        fusion=payload.fusion, max_chunks_per_document=payload.max_chunks_per_document,
                        timings=timings)
    return {"query": payload.query, "mode": payload.mode, "results": [h.__dict__ for h in hits],
            "timings_ms": {k: round(v, 2) for k, v in timings.__dict__.items()}}
