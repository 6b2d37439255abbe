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
