"""manage.py tenant_delete <slug> --confirm <slug>"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.errors import DomainError
from tenants.models import Tenant
from tenants.principal import Principal
from tenants.services.provisioning import tenant_delete


class Command(BaseCommand):
    help = "Delete a tenant and drop its schema. Needs --confirm repeating the slug."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--confirm", required=True, help="Repeat the slug to confirm")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["slug"]).exclude(schema_name="public").first()
        if tenant is None:
            raise CommandError(f"No tenant {options['slug']!r}")
        try:
            tenant_delete(actor=Principal.system("manage.py tenant_delete"), tenant=tenant, confirm=options["confirm"])
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(self.style.SUCCESS(f"Deleted {tenant.slug} and schema {tenant.schema_name}"))
