"""Preparing a document for embedding: its source -> extracted text -> chunk drafts.

``prepare`` turns one document into a ``Prepared`` (the document, its chunk drafts and the
extracted text); ``document_fail`` marks a document ``failed`` with a reason a user can read, and
``_progress`` writes a document's progress and heartbeat. ``record_text`` is the text a JSONL
record is indexed by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import structlog
from django.utils import timezone

from knowledge.chunking import ChunkDraft, chunk_text
from knowledge.embeddings import embedder
from knowledge.extraction import ExtractedText, ExtractionError, Section, extract
from knowledge.models import Collection, Document

# Named after the package, not this module, so records keep the logger name they had before
# the package was split into modules.
logger = structlog.get_logger("knowledge.ingestion")


@dataclass
class Prepared:
    document: Document
    drafts: list[ChunkDraft]
    extracted: ExtractedText


def _progress(document_ids: list[int], percent: int, **fields: object) -> None:
    """Set the documents' progress (and ``fields``) and mark them alive now, in one statement."""
    now = timezone.now()
    Document.objects.filter(pk__in=document_ids).update(progress=percent, heartbeat_at=now, updated_at=now, **fields)


def document_fail(document_id: int, message: str) -> None:
    """Mark a document ``failed`` with a reason a user can read."""
    now = timezone.now()
    Document.objects.filter(pk=document_id).update(
        status=Document.Status.FAILED, error_message=message[:2000], updated_at=now, heartbeat_at=now
    )
    logger.info("document_failed", document=document_id, reason=message[:200])


def _source(document: Document) -> tuple[str, bytes]:
    if document.source_text:
        return "record", document.source_text.encode()
    with document.file.open("rb") as handle:
        return document.metadata.get("kind", "text"), handle.read()


def _extract(document: Document) -> ExtractedText:
    kind, data = _source(document)
    if kind == "record":
        text = data.decode()
        extracted = ExtractedText(text=text, sections=[Section((), 0, len(text))])
        if not text.strip():
            raise ExtractionError("The record has no text to index.", code="no_text")
        return extracted
    return extract(kind, data)


def prepare(document: Document, collection: Collection) -> Prepared:
    """Extract and chunk ``document`` (already marked ``processing`` by ``documents_start``).
    Raises ``ExtractionError``."""
    extracted = _extract(document)
    title = document.title
    if document.metadata.get("title_from_content") and extracted.title:
        title = extracted.title[:500]
        Document.objects.filter(pk=document.pk).update(title=title)
        document.title = title
    model = embedder()
    drafts = chunk_text(extracted, title=title, tokenizer=model.tokenizer(),
                        chunk_tokens=min(collection.chunk_size_tokens, model.max_tokens),
                        overlap_tokens=collection.chunk_overlap_tokens, max_tokens=model.max_tokens)
    if not drafts:
        raise ExtractionError("The document produced no chunks to index.", code="no_text")
    if len(drafts) > 40 or extracted.page_count:
        # Worth a visible step only for documents that take a while to embed.
        _progress([document.pk], 20, page_count=extracted.page_count)
    return Prepared(document, drafts, extracted)


def record_text(record: dict[str, object]) -> str:
    """The text of a JSONL record (``text``, else the whole record as JSON)."""
    text = record.get("text")
    return text if isinstance(text, str) else json.dumps(record, ensure_ascii=False)
