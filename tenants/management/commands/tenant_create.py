"""manage.py tenant_create <slug> --name N --owner-email E [--plan P] [--region R] [--require-2fa]"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.errors import DomainError
from tenants.models import Plan
from tenants.principal import Principal
from tenants.services.provisioning import tenant_create


class Command(BaseCommand):
    help = "Provision a tenant: schema, host <slug>.<BASE_DOMAIN> and owner."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--owner-email", required=True)
        parser.add_argument("--plan", help="Plan code")
        parser.add_argument("--region")
        parser.add_argument("--require-2fa", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        plan = None
        if options["plan"]:
            plan = Plan.objects.filter(code=options["plan"]).first()
            if plan is None:
                raise CommandError(f"No plan with code {options['plan']!r}")
        try:
            result = tenant_create(
                actor=Principal.system("manage.py tenant_create"), slug=options["slug"], name=options["name"],
                owner_email=options["owner_email"], plan=plan, region=options["region"],
                require_2fa=options["require_2fa"],
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        tenant = result.tenant
        self.stdout.write(self.style.SUCCESS(f"Created tenant {tenant.slug} (schema {tenant.schema_name})"))
        self.stdout.write(f"  host:  {tenant.primary_host}")
        self.stdout.write(f"  owner: {result.owner.email}" + (
            " (new account without a password: use 'Forgot password' on the sign-in page)"
            if result.owner_created else ""))
