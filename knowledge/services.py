"""Writes on the knowledge base: collections, uploads, deletion, re-indexing."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import structlog
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from compliance.services import audit_event_create
from config.errors import Conflict, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from config.text import require_storable, strip_unstorable, unstorable_path
from knowledge.extraction import UnsupportedFile, detect_kind
from knowledge.extraction.detect import MIME_TYPES
from knowledge.ingestion import chunks_delete, record_text
from knowledge.jobs import enqueue_ingest
from knowledge.models import LANGUAGES, Collection, Document
from tenants.principal import Principal
from tenants.services.limits import plan_limit_check

logger = structlog.get_logger(__name__)

MIN_CHUNK_TOKENS = 32
# A JSONL import may hold this many records (SciFact has 5,183; BEIR's largest sets far more
# belong in kb_import from disk, which has no such limit).
MAX_JSONL_RECORDS = 100_000


def _validate_chunking(chunk_size: int, overlap: int) -> None:
    limit = settings.EMBEDDING_MAX_TOKENS
    if not MIN_CHUNK_TOKENS <= chunk_size <= limit:
        raise ValidationFailed(f"Chunk size must be between {MIN_CHUNK_TOKENS} and {limit} tokens "
                               f"(the embedding model's input limit).", code="invalid_chunk_size")
    if overlap < 0 or overlap * 2 >= chunk_size:
        raise ValidationFailed("Chunk overlap must be at least 0 and less than half the chunk size.",
                               code="invalid_chunk_overlap")


def _validate_name(name: str) -> str:
    require_storable(name, field="name")
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise ValidationFailed("A collection name is 1-200 characters.", code="invalid_name")
    return name


@transaction.atomic
def collection_create(*, principal: Principal, name: str, description: str = "", chunk_size_tokens: int = 200,
                      chunk_overlap_tokens: int = 32, language: str = "english") -> Collection:
    """Create a collection using the deployment's embedding model.

    Raises ``ValidationFailed`` for bad settings and ``Conflict`` for a duplicate name
    (case-insensitive); ``Forbidden`` without ``kb:write``.
    """
    principal.require("kb:write")
    name = _validate_name(name)
    require_storable(description, field="description")
    _validate_chunking(chunk_size_tokens, chunk_overlap_tokens)
    if language not in dict(LANGUAGES):
        raise ValidationFailed(f"Unknown language '{language}'.", code="invalid_language")
    if Collection.objects.filter(name__iexact=name).exists():
        raise Conflict(f"A collection named '{name}' exists.", code="duplicate_name")
    collection = Collection.objects.create(
        name=name, description=description[:5000], embedding_model=settings.EMBEDDING_MODEL,
        embedding_dim=settings.EMBEDDING_DIM, chunk_size_tokens=chunk_size_tokens,
        chunk_overlap_tokens=chunk_overlap_tokens, language=language,
    )
    audit_event_create(actor=principal, action="collection.created", target_type="collection",
                       target_id=collection.pk, payload={"name": name, "chunk_size_tokens": chunk_size_tokens,
                                                         "chunk_overlap_tokens": chunk_overlap_tokens,
                                                         "language": language})
    return collection


@transaction.atomic
def collection_update(*, principal: Principal, collection: Collection, name: str | None = None,
                      description: str | None = None, chunk_size_tokens: int | None = None,
                      chunk_overlap_tokens: int | None = None, language: str | None = None) -> Collection:
    """Change a collection. Changing chunking or language re-indexes every document (queued)."""
    principal.require("kb:write")
    require_storable(name, field="name")
    require_storable(description, field="description")
    collection = Collection.objects.select_for_update().get(pk=collection.pk)
    changes: dict[str, Any] = {}
    if name is not None and name.strip() != collection.name:
        name = _validate_name(name)
        if Collection.objects.filter(name__iexact=name).exclude(pk=collection.pk).exists():
            raise Conflict(f"A collection named '{name}' exists.", code="duplicate_name")
        changes["name"] = name
    if description is not None and description != collection.description:
        changes["description"] = description[:5000]
    size = chunk_size_tokens if chunk_size_tokens is not None else collection.chunk_size_tokens
    overlap = chunk_overlap_tokens if chunk_overlap_tokens is not None else collection.chunk_overlap_tokens
    _validate_chunking(size, overlap)
    if size != collection.chunk_size_tokens:
        changes["chunk_size_tokens"] = size
    if overlap != collection.chunk_overlap_tokens:
        changes["chunk_overlap_tokens"] = overlap
    if language is not None and language != collection.language:
        if language not in dict(LANGUAGES):
            raise ValidationFailed(f"Unknown language '{language}'.", code="invalid_language")
        changes["language"] = language
    if not changes:
        return collection
    for key, value in changes.items():
        setattr(collection, key, value)
    collection.updated_at = timezone.now()
    collection.save()
    reindex = bool({"chunk_size_tokens", "chunk_overlap_tokens", "language"} & changes.keys())
    queued: list[int] = []
    if reindex:
        documents = Document.objects.filter(collection=collection).exclude(status=Document.Status.PROCESSING)
        queued = list(documents.values_list("pk", flat=True))
        documents.update(status=Document.Status.PENDING, progress=0, error_message="", updated_at=timezone.now())
        enqueue_ingest(queued)
    audit_event_create(actor=principal, action="collection.changed", target_type="collection",
                       target_id=collection.pk, payload={**changes, "reindexed_documents": len(queued)})
    return collection


@transaction.atomic
def collection_delete(*, principal: Principal, collection: Collection) -> None:
    """Delete a collection with its documents, chunks and files."""
    principal.require("kb:write")
    files = [str(d.file.name) for d in Document.objects.filter(collection=collection).exclude(file="")]
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM knowledge_posting WHERE collection_id = %s", [collection.pk])
        cursor.execute("DELETE FROM knowledge_chunk WHERE collection_id = %s", [collection.pk])
    documents = Document.objects.filter(collection=collection).count()
    Document.objects.filter(collection=collection).delete()
    audit_event_create(actor=principal, action="collection.deleted", target_type="collection",
                       target_id=collection.pk, payload={"name": collection.name, "documents": documents})
    collection.delete()
    transaction.on_commit(lambda: _delete_files(files))


def _delete_files(names: list[str]) -> None:
    from django.core.files.storage import default_storage

    for name in names:
        try:
            default_storage.delete(name)
        except OSError:
            logger.warning("file_delete_failed", file=name)


@dataclass
class UploadResult:
    """What an upload did: documents created (queued), existing duplicates returned, and, for
    JSONL, the lines that could not be used with their 1-based line numbers."""

    created: list[Document] = field(default_factory=list)
    duplicates: list[Document] = field(default_factory=list)
    updated: list[Document] = field(default_factory=list)
    line_errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def documents(self) -> list[Document]:
        return self.created + self.updated + self.duplicates


# Control characters (C0, DEL, C1) have no place in a filename shown in pages and logs.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
# The longest extension kept when a long name is shortened (".markdown" fits; longer ones are not
# extensions we detect by).
_MAX_SUFFIX_CHARS = 16
# The stored file's name, in UTF-8 bytes: filesystems allow 255 per path component (NAME_MAX), and
# the storage may append "_<7 random chars>" to make a name unique.
_STORED_NAME_MAX_BYTES = 200


def _shorten(name: str, *, max_chars: int, max_bytes: int | None = None) -> str:
    """``name`` cut to ``max_chars`` characters (and ``max_bytes`` UTF-8 bytes), keeping its
    extension so that the type detected from the name does not change."""
    suffix = PurePath(name).suffix
    if len(suffix) > _MAX_SUFFIX_CHARS:
        suffix = ""
    stem = name[: len(name) - len(suffix)][: max(max_chars - len(suffix), 0)]
    if max_bytes is not None:
        budget = max(max_bytes - len(suffix.encode()), 0)
        stem = stem.encode()[:budget].decode("utf-8", "ignore")  # never half a character
    return stem + suffix if stem.strip(". ") else "upload" + suffix


def upload_filename_clean(filename: str | None) -> str:
    """The name an upload is kept under: its last path component without control characters, NUL
    or unpaired surrogates, shortened to 255 characters keeping the extension (``"upload"`` if
    nothing is left). Overlong names are shortened rather than refused: the name is a label, the
    content decides what the file is."""
    name = _CONTROL_RE.sub("", strip_unstorable(filename or "")).replace("\\", "/")
    name = PurePath(name).name.strip()
    return _shorten(name, max_chars=255) if name else "upload"


def storage_used_bytes() -> int:
    """Bytes of every document of the current tenant (files and JSONL records): what
    ``Plan.max_storage_mb`` limits."""
    return int(Document.objects.aggregate(total=Sum("size_bytes"))["total"] or 0)


def _check_upload(filename: str, data: bytes) -> str:
    limit = settings.KB_MAX_UPLOAD_MB * 1024 * 1024
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{filename} is {len(data) / 1048576:.1f} MB; the limit is {settings.KB_MAX_UPLOAD_MB} MB.",
            details={"limit_bytes": limit},
        )
    if not data.strip():
        raise ValidationFailed(f"{filename} is empty.", code="empty_file")
    try:
        return detect_kind(filename, data)
    except UnsupportedFile as exc:
        raise UnsupportedMediaType(exc.message, code=exc.code) from exc


@transaction.atomic
def document_upload(*, principal: Principal, collection: Collection, filename: str, data: bytes,
                    title: str | None = None, queue: bool = True) -> UploadResult:
    """Store an upload and queue its ingestion.

    A file whose SHA-256 already exists in the collection is not stored again: the existing
    document is returned in ``duplicates``. A JSONL file becomes one document per record.
    Raises ``PayloadTooLarge`` past ``KB_MAX_UPLOAD_MB``, ``UnsupportedMediaType`` for formats
    we do not ingest or names that lie about the content, ``ValidationFailed`` for empty files,
    ``Conflict`` (``plan_limit``) when the tenant's documents would exceed the plan's
    ``max_storage_mb``; ``Forbidden`` without ``kb:write``. The filename is tidied and shortened
    (``upload_filename_clean``). With ``queue=False`` nothing is queued: the caller indexes
    (``kb_import`` does, in-process).
    """
    principal.require("kb:write")
    require_storable(title, field="title")
    filename = upload_filename_clean(filename)
    kind = _check_upload(filename, data)
    if kind == "jsonl":
        return _jsonl_upload(principal=principal, collection=collection, filename=filename, data=data, queue=queue)
    digest = hashlib.sha256(data).hexdigest()
    existing = Document.objects.filter(collection=collection, sha256=digest).first()
    if existing is not None:
        return UploadResult(duplicates=[existing])
    # The lock it takes is held until the upload commits, so concurrent uploads cannot both fit.
    plan_limit_check(limit="max_storage_mb", used=storage_used_bytes, adding=len(data))
    document = Document(
        collection=collection, title=(title or PurePath(filename).stem or filename)[:500],
        original_filename=filename, mime_type=MIME_TYPES[kind], size_bytes=len(data), sha256=digest,
        metadata={"kind": kind, "title_from_content": not title},
    )
    document.file.save(_shorten(filename, max_chars=255, max_bytes=_STORED_NAME_MAX_BYTES), ContentFile(data),
                       save=False)
    try:
        with transaction.atomic():
            document.save()
    except IntegrityError:
        # A concurrent upload of the same bytes won the race: answer like a duplicate.
        document.file.delete(save=False)
        return UploadResult(duplicates=[Document.objects.get(collection=collection, sha256=digest)])
    audit_event_create(actor=principal, action="document.uploaded", target_type="document", target_id=document.pk,
                       payload={"collection": collection.pk, "filename": filename, "kind": kind,
                                "size_bytes": len(data), "sha256": digest})
    if queue:
        enqueue_ingest([document.pk])
    return UploadResult(created=[document])


def _jsonl_upload(*, principal: Principal, collection: Collection, filename: str, data: bytes,
                  queue: bool) -> UploadResult:
    """One document per ``{"_id", "title", "text"}`` line; a record with a known ``_id`` and new
    content replaces that document's content (and is re-indexed)."""
    from knowledge.extraction.text import decode

    result = UploadResult()
    records: list[tuple[int, str, str, str, str]] = []  # line, _id, title, text, sha256
    seen: set[str] = set()
    for number, line in enumerate(decode(data).splitlines(), start=1):
        if not line.strip():
            continue
        if len(records) >= MAX_JSONL_RECORDS:
            result.line_errors.append({"line": number, "error": f"more than {MAX_JSONL_RECORDS} records; "
                                                                "the rest were not read"})
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            result.line_errors.append({"line": number, "error": f"not valid JSON ({exc.msg})"})
            continue
        if not isinstance(record, dict):
            result.line_errors.append({"line": number, "error": "not a JSON object"})
            continue
        external_id = record.get("_id")
        if not isinstance(external_id, str | int) or isinstance(external_id, bool) or str(external_id).strip() == "":
            result.line_errors.append({"line": number, "error": "missing \"_id\" (a string or integer)"})
            continue
        text = record_text(record)
        if not isinstance(record.get("text"), str) or not text.strip():
            result.line_errors.append({"line": number, "error": "missing \"text\" (a non-empty string)"})
            continue
        if unstorable_path([external_id, record.get("title"), text]) is not None:
            result.line_errors.append({"line": number, "error": "a NUL character or an unpaired surrogate in "
                                                                "\"_id\", \"title\" or \"text\""})
            continue
        external_id = str(external_id).strip()[:200]
        if external_id in seen:
            result.line_errors.append({"line": number, "error": f"duplicate _id {external_id!r} in this file"})
            continue
        seen.add(external_id)
        title = str(record.get("title") or "").strip()[:500] or external_id
        digest = hashlib.sha256(json.dumps({"title": title, "text": text}, sort_keys=True).encode()).hexdigest()
        records.append((number, external_id, title, text, digest))

    # Lock before replacing records: their new sizes count against the plan's storage below.
    plan_limit_check(limit="max_storage_mb", used=storage_used_bytes, adding=0)
    by_external = {d.external_id: d for d in Document.objects.filter(
        collection=collection, external_id__in=[r[1] for r in records])}
    by_digest = {d.sha256: d for d in Document.objects.filter(
        collection=collection, sha256__in=[r[4] for r in records])}
    new: list[Document] = []
    now = timezone.now()
    for _number, external_id, title, text, digest in records:
        known = by_external.get(external_id) or by_digest.get(digest)
        if known is not None and known.sha256 == digest:
            result.duplicates.append(known)
            continue
        if known is not None and known.external_id == external_id:
            known.title, known.source_text, known.sha256 = title, text, digest
            known.size_bytes, known.status, known.progress = len(text.encode()), Document.Status.PENDING, 0
            known.error_message, known.updated_at = "", now
            known.save(update_fields=["title", "source_text", "sha256", "size_bytes", "status", "progress",
                                      "error_message", "updated_at"])
            result.updated.append(known)
            continue
        new.append(Document(
            collection=collection, title=title, external_id=external_id, source_text=text,
            original_filename=filename, mime_type="application/x-ndjson", size_bytes=len(text.encode()),
            sha256=digest, metadata={"kind": "record", "source_file": filename},
        ))
    plan_limit_check(limit="max_storage_mb", used=storage_used_bytes, adding=sum(d.size_bytes for d in new))
    result.created = Document.objects.bulk_create(new, batch_size=1000)
    audit_event_create(actor=principal, action="documents.imported", target_type="collection",
                       target_id=collection.pk,
                       payload={"filename": filename, "created": len(result.created), "updated": len(result.updated),
                                "duplicates": len(result.duplicates), "bad_lines": len(result.line_errors)})
    if queue:
        enqueue_ingest([d.pk for d in result.created + result.updated])
    return result


@transaction.atomic
def document_delete(*, principal: Principal, document: Document) -> None:
    """Delete a document, its chunks and its file."""
    principal.require("kb:write")
    document = Document.objects.select_for_update().get(pk=document.pk)
    chunks = chunks_delete(document)
    audit_event_create(actor=principal, action="document.deleted", target_type="document", target_id=document.pk,
                       payload={"title": document.title, "collection": document.collection_id, "chunks": chunks})
    name = document.file.name
    document.delete()
    if name:
        transaction.on_commit(lambda: _delete_files([name]))


@transaction.atomic
def document_reindex(*, principal: Principal, document: Document) -> Document:
    """Queue a document for indexing again (e.g. after a failure). Raises ``Conflict`` while a
    job is working on it."""
    principal.require("kb:write")
    document = Document.objects.select_for_update().get(pk=document.pk)
    if document.status == Document.Status.PROCESSING:
        raise Conflict("The document is being indexed right now.", code="indexing_in_progress")
    document.status, document.progress, document.error_message = Document.Status.PENDING, 0, ""
    document.attempts, document.updated_at = 0, timezone.now()
    document.save(update_fields=["status", "progress", "error_message", "attempts", "updated_at"])
    audit_event_create(actor=principal, action="document.reindexed", target_type="document", target_id=document.pk,
                       payload={"title": document.title})
    enqueue_ingest([document.pk])
    return document
