"""manage.py apikey_create --tenant T --name N [--user EMAIL] [--scopes a,b] [--expires-days D]

The key acts for the member ``--user`` (default: the tenant's first owner): it never holds more
than that member's role allows and dies when they leave.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from config.errors import DomainError
from tenants.models import Membership, Tenant
from tenants.principal import Principal
from tenants.roles import PERMISSIONS, permissions_for_role
from tenants.services.keys import api_key_create


class Command(BaseCommand):
    help = "Mint an API key for a tenant and print its secret once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="Tenant slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--user", metavar="EMAIL",
                            help="The member the key acts for (default: the tenant's first owner)")
        parser.add_argument("--scopes", default="tenant:read",
                            help="Comma-separated; 'all' for every scope the member's role allows. "
                                 f"Known: {', '.join(PERMISSIONS)}")
        parser.add_argument("--expires-days", type=int)

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).exclude(schema_name="public").first()
        if tenant is None:
            raise CommandError(f"No tenant {options['tenant']!r}")
        scopes = list(PERMISSIONS) if options["scopes"] == "all" else [
            s.strip() for s in options["scopes"].split(",") if s.strip()]
        expires = timezone.now() + dt.timedelta(days=options["expires_days"]) if options["expires_days"] else None
        user = None
        if options["user"]:
            membership = (Membership.objects.select_related("user")
                          .filter(tenant=tenant, user__email__iexact=options["user"].strip()).first())
            if membership is None:
                raise CommandError(f"{options['user']} is not a member of {tenant.slug}")
            user = membership.user
            if options["scopes"] == "all":
                scopes = [s for s in scopes if s in permissions_for_role(membership.role)]
        try:
            issued = api_key_create(principal=Principal.system("manage.py apikey_create", tenant=tenant),
                                    tenant=tenant, name=options["name"], scopes=scopes, expires_at=expires,
                                    acting_user=user)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stderr.write(f"Created {issued.key.prefix} for {tenant.slug} acting for {issued.key.acting_user.email}"
                          f" with scopes {', '.join(issued.key.scopes)}. The secret below is shown once:")
        self.stdout.write(issued.secret)
