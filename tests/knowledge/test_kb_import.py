"""``manage.py kb_import``: bulk loads into a collection, with progress, reports and clear errors."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.core.management import CommandError, call_command
from django_tenants.utils import schema_context

from knowledge.models import Chunk, Collection, Document
from tests.conftest import World

HANDBOOK = b"# Handbook\n\n## Leave\n\nEvery employee has twenty-five days of paid leave a year.\n"


def _run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("kb_import", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _records(tmp_path: Path) -> Path:
    lines = [json.dumps({"_id": f"r{i}", "title": f"Record {i}", "text": f"Record {i} is about tidal energy."})
             for i in range(3)]
    lines.insert(1, "{not json")
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_directory_is_imported_into_a_new_collection_with_bad_lines_and_files_reported(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "handbook.md").write_bytes(HANDBOOK)
    (tmp_path / "docs" / "notes.txt").write_text("Parking is behind the building.")
    (tmp_path / "docs" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not importable: skipped by the walk
    _records(tmp_path / "docs")
    empty = tmp_path / "empty.md"
    empty.write_bytes(b"")

    out, err = _run("--tenant", "acme", "--collection", "Imported", "--create", str(tmp_path / "docs"), str(empty))

    assert "records.jsonl:2: not valid JSON" in err
    assert f"rejected {empty}: " in err
    assert "indexed 5 document(s)" in out and "0 failed; 1 file(s) rejected" in out
    with schema_context(world.tenant_a.schema_name):
        collection = Collection.objects.get(name="Imported")
        documents = Document.objects.filter(collection=collection)
        assert sorted(d.status for d in documents) == ["indexed"] * 5
        assert sorted(documents.exclude(external_id="").values_list("external_id", flat=True)) == ["r0", "r1", "r2"]
        chunks = Chunk.objects.filter(collection=collection).count()
    assert chunks >= 5
    # The progress bars went to stderr: documents, and the chunks as the encoder embedded them.
    bars = capsys.readouterr().err
    assert "index: 100%" in bars and "5/5" in bars
    assert f"embed: {chunks}chunk" in bars


def test_a_second_import_of_the_same_files_reports_them_as_already_there(world: World, tmp_path: Path) -> None:
    path = tmp_path / "handbook.md"
    path.write_bytes(HANDBOOK)
    _run("--tenant", "acme", "--collection", "Imported", "--create", str(path))
    out, _ = _run("--tenant", "acme", "--collection", "Imported", str(path))
    assert f"{path}: 1 already in the collection" in out
    with schema_context(world.tenant_a.schema_name):
        assert Document.objects.filter(collection__name="Imported").count() == 1


def test_queue_leaves_the_documents_pending_for_the_worker(world: World, tmp_path: Path,
                                                          django_capture_on_commit_callbacks: Any) -> None:
    queue = django_rq.get_queue("ingest")
    queue.empty()
    path = tmp_path / "handbook.md"
    path.write_bytes(HANDBOOK)
    with django_capture_on_commit_callbacks(execute=True):
        out, _ = _run("--tenant", "acme", "--collection", "Imported", "--create", "--queue", str(path))
    assert "1 document(s) queued" in out
    with schema_context(world.tenant_a.schema_name):
        document = Document.objects.get(collection__name="Imported")
        assert document.status == "pending" and document.job_id
    assert len(queue) == 1
    queue.empty()


@pytest.mark.parametrize(("args", "message"), [
    (["--tenant", "nobody", "--collection", "C"], "No tenant 'nobody'"),
    (["--tenant", "public", "--collection", "C"], "No tenant 'public'"),
    (["--tenant", "acme", "--collection", "Missing"], "No collection 'Missing' (add --create to make it)"),
])
def test_a_wrong_tenant_or_collection_is_a_clear_error_and_imports_nothing(
        world: World, tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "handbook.md"
    path.write_bytes(HANDBOOK)
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(*args, str(path))
    with schema_context(world.tenant_a.schema_name):
        assert not Document.objects.exists()


def test_a_missing_path_or_a_directory_without_importable_files_is_a_clear_error(world: World, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="no such file or directory"):
        _run("--tenant", "acme", "--collection", "C", "--create", str(tmp_path / "absent.pdf"))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(CommandError, match="No importable files found"):
        _run("--tenant", "acme", "--collection", "C", "--create", str(tmp_path))
    with schema_context(world.tenant_a.schema_name):
        assert not Collection.objects.filter(name="C").exists()


@pytest.mark.parametrize(("verbosity", "logged"), [("1", False), ("2", True)])
def test_per_document_logs_stay_off_the_progress_bars_unless_asked_for(
        world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, verbosity: str, logged: bool) -> None:
    (tmp_path / "handbook.md").write_bytes(HANDBOOK)
    (tmp_path / "blank.html").write_bytes(b"<p> </p>")  # fails in ingestion: logged as document_failed
    caplog.set_level("INFO")
    out, err = _run("--tenant", "acme", "--collection", f"Quiet {verbosity}", "--create", "--verbosity", verbosity,
                    str(tmp_path))
    assert "indexed 1 document(s)" in out and "failed: blank: " in err
    noisy = [r for r in caplog.records if r.name.startswith(("knowledge", "compliance")) and r.levelname == "INFO"]
    assert bool(noisy) is logged
    assert logging.getLogger("knowledge").level == logging.NOTSET, "the command restores the log level"
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled(), "and the model's progress bars"
