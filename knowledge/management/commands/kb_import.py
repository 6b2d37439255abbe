"""manage.py kb_import --tenant T --collection C [--create] [--queue] PATH...

Bulk-load files (PDF, DOCX, HTML, Markdown, text, JSONL) into a collection, indexing them in
this process with a progress bar (or queueing them for the rq worker with --queue).
Directories are walked recursively.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_tenants.utils import schema_context
from tqdm import tqdm

from config.errors import DomainError
from knowledge.extraction.detect import EXTENSIONS
from knowledge.ingestion import ingest_documents
from knowledge.models import Collection, Document
from knowledge.services import collection_create, document_upload
from tenants.models import Tenant
from tenants.principal import Principal


@contextlib.contextmanager
def _quiet_logs(verbosity: int) -> Iterator[None]:
    """Below ``--verbosity 2``, keep the per-document info logs (uploads, audit events, failures)
    and the model's weight-loading bar off the terminal while the progress bars run; rejected and
    failed files are listed at the end either way."""
    if verbosity >= 2:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("knowledge", "compliance")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    transformers_logging: Any = None
    with contextlib.suppress(ImportError):  # the litellm embedding backend needs no transformers
        from transformers.utils import logging as transformers_logging
    bar = transformers_logging is not None and transformers_logging.is_progress_bar_enabled()
    if bar:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bar:
            transformers_logging.enable_progress_bar()


class Command(BaseCommand):
    help = "Import files into a knowledge collection of a tenant."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+")
        parser.add_argument("--tenant", required=True, help="Tenant slug")
        parser.add_argument("--collection", required=True, help="Collection name or id")
        parser.add_argument("--create", action="store_true", help="Create the collection if it does not exist")
        parser.add_argument("--queue", action="store_true", help="Queue indexing for the rq worker instead")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).exclude(schema_name="public").first()
        if tenant is None:
            raise CommandError(f"No tenant {options['tenant']!r}")
        files = self._files(options["paths"])
        if not files:
            raise CommandError("No importable files found (PDF, DOCX, HTML, Markdown, text, JSONL).")
        actor = Principal.system("manage.py kb_import", tenant=tenant)
        with schema_context(tenant.schema_name), _quiet_logs(options["verbosity"]):
            collection = self._collection(options["collection"], options["create"], actor)
            ids: list[int] = []
            rejected = 0
            for path in tqdm(files, desc="upload", unit="file", disable=len(files) < 2):
                try:
                    result = document_upload(principal=actor, collection=collection, filename=path.name,
                                             data=path.read_bytes(), queue=options["queue"])
                except DomainError as exc:
                    rejected += 1
                    self.stderr.write(f"rejected {path}: {exc.message}")
                    continue
                for error in result.line_errors:
                    self.stderr.write(f"{path}:{error['line']}: {error['error']}")
                ids.extend(d.pk for d in result.created + result.updated)
                if result.duplicates:
                    self.stdout.write(f"{path}: {len(result.duplicates)} already in the collection")
            if options["queue"] or not ids:
                self.stdout.write(self.style.SUCCESS(f"{len(ids)} document(s) queued; {rejected} file(s) rejected"))
                return
            started = time.perf_counter()
            # Two bars: documents finish a group (2,048 chunks) at a time, so the chunk bar is the
            # one that moves while a group embeds.
            with (tqdm(total=len(ids), desc="index", unit="doc") as documents,
                  tqdm(desc="embed", unit="chunk") as chunks):
                report = ingest_documents(ids, on_document=lambda done, total: documents.update(done - documents.n),
                                          on_chunks=chunks.update)
            elapsed = time.perf_counter() - started
            for document in Document.objects.filter(pk__in=ids, status=Document.Status.FAILED)[:50]:
                self.stderr.write(f"failed: {document.title}: {document.error_message}")
            self.stdout.write(self.style.SUCCESS(
                f"indexed {report.indexed} document(s), {report.chunks} chunks in {elapsed:.1f} s "
                f"({report.indexed / elapsed:.1f} docs/s); {report.failed} failed; {rejected} file(s) rejected"))

    def _files(self, paths: list[str]) -> list[Path]:
        files: list[Path] = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS))
            elif path.is_file():
                files.append(path)
            else:
                raise CommandError(f"{raw}: no such file or directory")
        return files

    def _collection(self, ref: str, create: bool, actor: Principal) -> Collection:
        collection = (Collection.objects.filter(pk=int(ref)).first() if ref.isdigit()
                      else Collection.objects.filter(name__iexact=ref).first())
        if collection is not None:
            return collection
        if not create:
            raise CommandError(f"No collection {ref!r} (add --create to make it)")
        try:
            return collection_create(principal=actor, name=ref)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
