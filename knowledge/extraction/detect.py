"""What kind of file an upload is, judged by its content and checked against its name."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import PurePath

from knowledge.extraction.limits import extraction_limits, zip_entry_count_exceeds

KINDS = ("pdf", "docx", "html", "markdown", "text", "jsonl")

MIME_TYPES = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "html": "text/html",
    "markdown": "text/markdown",
    "text": "text/plain",
    "jsonl": "application/x-ndjson",
}

EXTENSIONS = {
    ".pdf": "pdf", ".docx": "docx", ".html": "html", ".htm": "html", ".md": "markdown",
    ".markdown": "markdown", ".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
}
# Formats we recognize but do not ingest: what the file is, and what to do instead (a clearer 415
# than "unknown").
SAVE_AS_DOCX = "Save it as .docx"
UNSUPPORTED_EXTENSIONS = {
    ".doc": ("a legacy Word document", SAVE_AS_DOCX), ".rtf": ("an RTF document", SAVE_AS_DOCX),
    ".odt": ("an OpenDocument text", SAVE_AS_DOCX), ".xls": ("an Excel workbook", ""),
    ".xlsx": ("an Excel workbook", ""), ".ppt": ("a PowerPoint presentation", ""),
    ".pptx": ("a PowerPoint presentation", ""), ".png": ("an image", ""), ".jpg": ("an image", ""),
    ".jpeg": ("an image", ""), ".gif": ("an image", ""),
    ".zip": ("a ZIP archive", "Upload the files inside it"), ".exe": ("a program", ""),
}
ACCEPTED = "PDF, DOCX, HTML, Markdown, plain text or JSONL"


class UnsupportedFile(Exception):
    """The upload is not a kind we ingest, or its name and content disagree (HTTP 415)."""

    def __init__(self, message: str, *, code: str = "unsupported_media_type") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _sniff(data: bytes) -> str | None:
    """The binary format ``data`` is in, from its magic bytes, or ``None`` for anything else."""
    if data[:5] == b"%PDF-" or (b"%PDF-" in data[:1024] and data.lstrip()[:5] == b"%PDF-"):
        return "pdf"
    if data[:4] == b"PK\x03\x04":
        if zip_entry_count_exceeds(data, extraction_limits().max_entries):
            # Do not build one object per entry in the web process: the extractor fails the
            # document with the reason (a .docx) or the upload is refused as a ZIP.
            return "zip-unchecked"
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = set(archive.namelist())
        except zipfile.BadZipFile:
            # A ZIP whose central directory is missing: typically a truncated DOCX.
            return "zip-damaged"
        return "docx" if "word/document.xml" in names else "zip"
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:4] in (b"GIF8",):
        return "image"
    if data[:4] == b"\xd0\xcf\x11\xe0":
        return "ole"
    return None


def _looks_textual(data: bytes) -> bool:
    sample = data[:8192]
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the sample's end is still text.
        if exc.start < len(sample) - 4:
            from charset_normalizer import from_bytes

            return from_bytes(sample).best() is not None
    return True


def _looks_jsonl(data: bytes) -> bool:
    for line in data.splitlines()[:5]:
        if line.strip():
            try:
                return isinstance(json.loads(line), dict)
            except ValueError:
                return False
    return False


def detect_kind(filename: str, data: bytes) -> str:
    """Return the kind of an upload (one of ``KINDS``).

    The content decides for binary formats; the extension chooses among text formats. Raises
    ``UnsupportedFile`` for formats we do not ingest and when the extension names one format but
    the content is another (e.g. a ``.docx`` that is really a PDF).
    """
    suffix = PurePath(filename or "").suffix.lower()
    claimed = EXTENSIONS.get(suffix)
    sniffed = _sniff(data)
    if suffix in UNSUPPORTED_EXTENSIONS and sniffed not in ("pdf", "docx"):
        what, advice = UNSUPPORTED_EXTENSIONS[suffix]
        raise UnsupportedFile(f"{filename} is {what}, which is not supported. "
                              f"{advice or 'Upload ' + ACCEPTED}.")
    if sniffed in ("zip-damaged", "zip-unchecked"):
        if claimed in (None, "docx"):
            return "docx"  # let the DOCX extractor report the damage on the document row
        sniffed = "zip"
    if sniffed in ("pdf", "docx"):
        if claimed is not None and claimed != sniffed:
            raise UnsupportedFile(
                f"{filename}: the name says {claimed.upper()} but the content is {sniffed.upper()}. "
                f"Rename it to .{sniffed} if that is what it is.",
                code="extension_mismatch",
            )
        return sniffed
    if sniffed in ("image", "ole", "zip"):
        what = {"image": "an image", "ole": "a legacy Office file", "zip": "a ZIP archive"}[sniffed]
        raise UnsupportedFile(f"{filename}: the content is {what}, which is not supported.")
    if claimed in ("pdf", "docx"):
        raise UnsupportedFile(
            f"{filename}: the name says {claimed.upper()} but the content is not a {claimed.upper()} file.",
            code="extension_mismatch",
        )
    if not _looks_textual(data):
        raise UnsupportedFile(f"{filename}: binary content of an unknown format is not supported.")
    if claimed is not None:
        return claimed
    head = data[:2048].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<body" in head:
        return "html"
    if _looks_jsonl(data):
        return "jsonl"
    return "text"
