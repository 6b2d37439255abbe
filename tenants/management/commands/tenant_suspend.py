"""manage.py tenant_suspend <slug> [--reason R] | --resume"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.models import Tenant
from tenants.principal import Principal
from tenants.services.provisioning import tenant_resume, tenant_suspend


class Command(BaseCommand):
    help = "Suspend a tenant (console and API answer 403), or resume it with --resume."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--reason", default="")
        parser.add_argument("--resume", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["slug"]).exclude(schema_name="public").first()
        if tenant is None:
            raise CommandError(f"No tenant {options['slug']!r}")
        actor = Principal.system("manage.py tenant_suspend")
        if options["resume"]:
            tenant_resume(actor=actor, tenant=tenant)
            self.stdout.write(self.style.SUCCESS(f"Resumed {tenant.slug}"))
        else:
            tenant_suspend(actor=actor, tenant=tenant, reason=options["reason"])
            self.stdout.write(self.style.SUCCESS(f"Suspended {tenant.slug}"))
