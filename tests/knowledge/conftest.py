"""Fixtures for knowledge-base tests: the shared corpus, small documents, a collection."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django_tenants.utils import schema_context

from knowledge.models import Collection
from knowledge.services import collection_create
from tenants.principal import Principal
from tests.conftest import World

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


@pytest.fixture
def corpus() -> Path:
    """``../shared/corpus``; tests that need real files skip with a reason where it is absent."""
    if not CORPUS.exists():
        pytest.skip(f"the shared corpus is not at {CORPUS} (it exists only beside the project's workspace)")
    return CORPUS


@pytest.fixture
def collection_a(world: World) -> Any:
    """A collection in tenant A; the test runs inside A's schema."""
    with schema_context(world.tenant_a.schema_name):
        yield collection_create(principal=Principal.system("t", tenant=world.tenant_a), name="Handbook")


def docx_bytes(paragraphs: list[tuple[str, str]]) -> bytes:
    """A DOCX whose paragraphs are ``(style, text)``, built with python-docx."""
    import docx

    document = docx.Document()
    for style, text in paragraphs:
        document.add_paragraph(text, style=style)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` share of ``data`` (a file cut off mid-transfer)."""
    return data[: int(len(data) * keep)]


def is_zip(data: bytes) -> bool:
    try:
        zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return False
    return True


def sole(collection: Collection) -> Any:
    return collection.documents.get()


def docx_bomb(inflated_mb: int, paragraph: bytes = b"<w:p/>") -> bytes:
    """A valid DOCX whose ``word/document.xml`` inflates to about ``inflated_mb`` MiB of
    ``paragraph`` repeated (a zip bomb: with empty paragraphs the file is a thousandth of that)."""
    source = docx_bytes([("Normal", "Bomb")])
    block = paragraph * max(1, 60_000 // len(paragraph))
    with zipfile.ZipFile(io.BytesIO(source)) as original:
        parts = {info.filename: original.read(info) for info in original.infolist()}
    head, _, tail = parts["word/document.xml"].partition(b"<w:body>")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb:
        for name, blob in parts.items():
            if name != "word/document.xml":
                bomb.writestr(name, blob)
        with bomb.open("word/document.xml", "w", force_zip64=True) as document:
            document.write(head + b"<w:body>")
            for _ in range(inflated_mb * 1024 * 1024 // len(block)):
                document.write(block)
            document.write(tail)
    return out.getvalue()


def docx_with_entries(count: int) -> bytes:
    """A valid DOCX with ``count`` extra tiny entries."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(docx_bytes([("Normal", "Many parts")]))) as original, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as copy:
        for info in original.infolist():
            copy.writestr(info.filename, original.read(info))
        for index in range(count):
            copy.writestr(f"extra/part{index}.xml", b"<a/>")
    return out.getvalue()


def lying_zip(data: bytes, name: str = "word/document.xml", claimed: int = 1000) -> bytes:
    """``data`` (a ZIP) with the sizes its headers give for ``name`` rewritten to ``claimed``."""
    import struct

    blob = bytearray(data)
    encoded = name.encode()
    # Central directory: uncompressed size at offset 24 of the record; local header: offset 22.
    for signature, size_at, name_at in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        start = 0
        while (start := blob.find(signature, start)) >= 0:
            name_length = struct.unpack_from("<H", blob, start + (28 if signature == b"PK\x01\x02" else 26))[0]
            if bytes(blob[start + name_at:start + name_at + name_length]) == encoded:
                struct.pack_into("<I", blob, start + size_at, claimed)
            start += 4
    return bytes(blob)


def pdf_with_stream(text: bytes, *, filler: bytes = b"", repeat: int = 0, pages: int = 1, image_mb: int = 0) -> bytes:
    """A PDF of ``pages`` pages whose content stream (FlateDecode) shows ``text`` in Helvetica
    followed by ``filler`` ``repeat`` times (compressed as it is made, never held whole); with
    ``image_mb``, every page's resources also hold one uncompressed grey image of that size."""
    import zlib

    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(b"BT /F1 12 Tf 72 720 Td (" + text + b") Tj ET\n")]
    block = filler * 10_000 if filler else b""
    chunks.extend(compressor.compress(block) for _ in range(repeat // 10_000))
    chunks.append(compressor.flush())
    compressed = b"".join(chunks)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(pages)).encode()
    objects.append(b"<< /Type /Pages /Kids [" + kids + b"] /Count " + str(pages).encode() + b" >>")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    image = f"/XObject << /Im1 {4 + 2 * pages} 0 R >> ".encode() if image_mb else b""
    for i in range(pages):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> "
                       + image + b">> /Contents " + str(5 + 2 * i).encode() + b" 0 R >>")
        objects.append(b"<< /Length " + str(len(compressed)).encode() + b" /Filter /FlateDecode >>\nstream\n"
                       + compressed + b"\nendstream")
    if image_mb:
        side = 1024
        pixels = bytes(side * side * image_mb)
        objects.append(f"<< /Type /XObject /Subtype /Image /Width {side} /Height {side * image_mb} /ColorSpace "
                       f"/DeviceGray /BitsPerComponent 8 /Length {len(pixels)} >>\nstream\n".encode()
                       + pixels + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def peak_mb(function: Any) -> tuple[Any, float]:
    """(what ``function()`` returned or the exception it raised, the peak of memory Python
    allocated meanwhile in MiB, measured with tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result = function()
        except Exception as exc:  # noqa: BLE001 - the caller asserts on it
            result = exc
        return result, tracemalloc.get_traced_memory()[1] / (1024 * 1024)
    finally:
        tracemalloc.stop()
