"""manage.py tenant_template [--force]: bring the clone template schema up to date."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tenants.services.provisioning import template_schema_ensure


class Command(BaseCommand):
    help = "Rebuild the template schema new tenants are cloned from, if its migrations are stale."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        rebuilt = template_schema_ensure(force=options["force"])
        self.stdout.write("template schema rebuilt" if rebuilt else "template schema is current")
