"""manage.py apikey_create --tenant T --name N [--scopes a,b] [--expires-days D]"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from config.errors import DomainError
from tenants.models import Tenant
from tenants.principal import Principal
from tenants.roles import PERMISSIONS
from tenants.services.keys import api_key_create


class Command(BaseCommand):
    help = "Mint an API key for a tenant and print its secret once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="Tenant slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--scopes", default="tenant:read",
                            help=f"Comma-separated; 'all' for every scope. Known: {', '.join(PERMISSIONS)}")
        parser.add_argument("--expires-days", type=int)

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).exclude(schema_name="public").first()
        if tenant is None:
            raise CommandError(f"No tenant {options['tenant']!r}")
        scopes = list(PERMISSIONS) if options["scopes"] == "all" else [
            s.strip() for s in options["scopes"].split(",") if s.strip()]
        expires = timezone.now() + dt.timedelta(days=options["expires_days"]) if options["expires_days"] else None
        try:
            issued = api_key_create(principal=Principal.system("manage.py apikey_create", tenant=tenant),
                                    tenant=tenant, name=options["name"], scopes=scopes, expires_at=expires)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stderr.write(f"Created {issued.key.prefix} for {tenant.slug} with scopes {', '.join(issued.key.scopes)}."
                          " The secret below is shown once:")
        self.stdout.write(issued.secret)
