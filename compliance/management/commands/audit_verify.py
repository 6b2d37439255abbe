"""manage.py audit_verify [--schema S | --all] [--checkpoints PATH]: verify audit hash chains."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from compliance.management.schemas import schemas_to_audit
from compliance.selectors import audit_chain_verify, checkpoints_from_json_lines
from tenants.models import AuditCheckpoint


class Command(BaseCommand):
    help = ("Verify audit hash chains (keyed hashes, links, and the heads their signed checkpoints recorded); "
            "exit 0 when all are intact, 1 at the first broken link or untrustworthy checkpoint.")

    def add_arguments(self, parser: CommandParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--schema", help="One schema (public or t_<slug>)")
        group.add_argument("--all", action="store_true", help="Every schema (the default)")
        parser.add_argument("--checkpoints", metavar="PATH",
                            help="Also hold the chains against checkpoints exported by audit_checkpoint --export "
                                 "(JSON lines), so that deleting stored checkpoints does not hide a truncation")

    def handle(self, *args: Any, **options: Any) -> None:
        schemas = schemas_to_audit(options["schema"])
        exported = self._exported(options["checkpoints"]) if options["checkpoints"] else []
        for schema in schemas:
            report = audit_chain_verify(schema=schema, exported=exported)
            for problem in report.checkpoint_problems:
                where = f"id={problem.checkpoint_id}" if problem.checkpoint_id else "from the export"
                self.stdout.write(self.style.ERROR(
                    f"BROKEN {schema}: checkpoint {where} (seq={problem.seq}): {problem.reason}"))
            if report.broken is not None:
                b = report.broken
                self.stdout.write(self.style.ERROR(
                    f"BROKEN {schema}: event seq={b.seq} id={b.event_id if b.event_id is not None else '-'}: "
                    f"{b.reason}"))
            if not report.ok:
                sys.exit(1)
            anchored = (f", holds {report.anchor.label} (seq {report.anchor.seq})" if report.anchor
                        else ", no checkpoint yet")
            legacy = f", {report.legacy_events} legacy plain-hash event(s)" if report.legacy_events else ""
            self.stdout.write(f"ok {schema}: {report.events} events, head {report.head_hash}{anchored}{legacy}")
        self.stdout.write(self.style.SUCCESS(f"{len(schemas)} chain(s) intact"))

    def _exported(self, path: str) -> list[AuditCheckpoint]:
        try:
            with Path(path).open(encoding="utf-8") as lines:
                return checkpoints_from_json_lines(lines)
        except (OSError, ValueError) as exc:
            raise CommandError(f"Cannot read checkpoints from {path}: {exc}") from exc
