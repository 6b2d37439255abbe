"""manage.py audit_checkpoint [--schema S] [--export PATH]: sign checkpoints of audit chain heads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from compliance.management.schemas import schemas_to_audit
from compliance.selectors import checkpoint_as_json
from compliance.services import audit_checkpoints_create


class Command(BaseCommand):
    help = ("Write a signed checkpoint of each audit chain's head (public and every tenant) into the public "
            "schema; exit 1 if a chain does not verify since its last checkpoint (it is then not signed).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--schema", help="Only this schema (public or t_<slug>)")
        parser.add_argument("--export", metavar="PATH",
                            help="Append each chain's newest checkpoint to PATH as JSON lines ('-' for stdout), "
                                 "to keep them outside the database (audit_verify --checkpoints reads them)")

    def handle(self, *args: Any, **options: Any) -> None:
        schemas = schemas_to_audit(options["schema"])
        outcomes = audit_checkpoints_create(schemas=schemas)
        for outcome in outcomes:
            if outcome.error is not None:
                self.stderr.write(self.style.ERROR(f"BROKEN {outcome.schema}: {outcome.error}"))
            elif outcome.checkpoint is None:
                self.stderr.write(f"empty {outcome.schema}: no events yet")
            else:
                c = outcome.checkpoint
                state = "checkpoint" if outcome.created else "unchanged"
                self.stderr.write(f"{state} {outcome.schema}: seq {c.seq}, head {c.hash}, key {c.key_id}")
        lines = [checkpoint_as_json(o.checkpoint) + "\n" for o in outcomes if o.checkpoint is not None]
        if options["export"] == "-":
            self.stdout.write("".join(lines), ending="")
        elif options["export"]:
            # Appended, so that one file kept elsewhere accumulates the history of the heads.
            with Path(options["export"]).open("a", encoding="utf-8") as export:
                export.writelines(lines)
        if any(o.error is not None for o in outcomes):
            sys.exit(1)
