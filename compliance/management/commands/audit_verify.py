"""manage.py audit_verify [--schema S | --all]: verify audit hash chains."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_tenants.utils import schema_exists

from compliance.selectors import audit_chain_verify, audited_schemas


class Command(BaseCommand):
    help = "Verify audit hash chains; exit 0 when all are intact, 1 at the first broken link."

    def add_arguments(self, parser: CommandParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--schema", help="One schema (public or t_<slug>)")
        group.add_argument("--all", action="store_true", help="Every schema (the default)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["schema"]:
            if not schema_exists(options["schema"]) and options["schema"] != "public":
                raise CommandError(f"No schema {options['schema']!r}")
            schemas = [options["schema"]]
        else:
            schemas = audited_schemas()
        for schema in schemas:
            report = audit_chain_verify(schema=schema)
            if report.broken is not None:
                b = report.broken
                self.stdout.write(self.style.ERROR(
                    f"BROKEN {schema}: event seq={b.seq} id={b.event_id}: {b.reason}"))
                sys.exit(1)
            self.stdout.write(f"ok {schema}: {report.events} events, head {report.head_hash}")
        self.stdout.write(self.style.SUCCESS(f"{len(schemas)} chain(s) intact"))
