"""manage.py demo_seed: an idempotent development data set.

Creates (or finds) a staff user with a TOTP device, plans, tenant ``demo`` at
``demo.<BASE_DOMAIN>`` with an owner, and an API key; writes the credentials to
``var/demo-credentials`` and the key to ``var/demo-api-key``. Running it again reuses what
exists, so the printed passwords and key stay valid. Development only: refuses to run with
``PORTAL_ENV=production``.
"""

from __future__ import annotations

import json
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django_otp.plugins.otp_totp.models import TOTPDevice

from config.errors import NotAuthenticated
from tenants.models import Plan, Tenant, User
from tenants.principal import Principal
from tenants.roles import PERMISSIONS
from tenants.services.keys import api_key_authenticate, api_key_create
from tenants.services.provisioning import public_tenant_ensure, tenant_create

STAFF_EMAIL = "staff@example.com"
OWNER_EMAIL = "owner@example.com"
DEMO_SLUG = "demo"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)


class Command(BaseCommand):
    help = "Create or refresh the development demo data and print how to sign in."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEVELOPMENT:
            raise CommandError("demo_seed is for development only (PORTAL_ENV=development).")
        var = Path(settings.VAR_DIR)
        creds_path = var / "demo-credentials"
        key_path = var / "demo-api-key"
        saved: dict[str, str] = {}
        if creds_path.exists():
            try:
                saved = json.loads(creds_path.read_text(encoding="utf-8"))
            except ValueError:
                saved = {}
        actor = Principal.system("manage.py demo_seed")
        public_tenant_ensure()

        for code, name, fee, members in (("free", "Free", "0", 5), ("team", "Team", "99", 50)):
            Plan.objects.get_or_create(code=code, defaults={"name": name, "monthly_fee": Decimal(fee),
                                                            "max_members": members})

        staff_password = saved.get("staff_password") or secrets.token_urlsafe(12)
        staff, _ = User.objects.get_or_create(email=STAFF_EMAIL, defaults={"name": "Staff"})
        staff.is_staff = staff.is_superuser = True
        staff.set_password(staff_password)
        staff.save()
        device = TOTPDevice.objects.filter(user=staff, confirmed=True).first()
        if device is None:
            device = TOTPDevice.objects.create(user=staff, name="demo authenticator", confirmed=True)

        tenant = Tenant.objects.filter(slug=DEMO_SLUG).first()
        if tenant is None:
            tenant = tenant_create(actor=actor, slug=DEMO_SLUG, name="Demo Company", owner_email=OWNER_EMAIL,
                                   plan=Plan.objects.get(code="team")).tenant
        owner = User.objects.get(email=OWNER_EMAIL)
        owner_password = saved.get("owner_password") or secrets.token_urlsafe(12)
        owner.name = owner.name or "Demo Owner"
        owner.set_password(owner_password)
        owner.save()
        from allauth.account.models import EmailAddress

        for user in (staff, owner):
            EmailAddress.objects.update_or_create(user=user, email=user.email,
                                                  defaults={"verified": True, "primary": True})

        api_key = key_path.read_text(encoding="utf-8").strip() if key_path.exists() else ""
        try:
            api_key_authenticate(raw_key=api_key, tenant=tenant)
        except NotAuthenticated:
            api_key = api_key_create(principal=Principal.system("demo_seed", tenant=tenant), tenant=tenant,
                                     name="demo key", scopes=list(PERMISSIONS)).secret
            _write_private(key_path, api_key + "\n")

        port = f":{settings.PUBLIC_PORT}" if settings.PUBLIC_PORT else ""
        creds = {
            "console_url": f"http://{tenant.primary_host}{port}/",
            "owner_email": OWNER_EMAIL,
            "owner_password": owner_password,
            "staff_url": f"http://{settings.PUBLIC_HOST}{port}/admin/",
            "staff_email": STAFF_EMAIL,
            "staff_password": staff_password,
            "staff_totp_uri": device.config_url,
            "api_key_file": str(key_path),
        }
        _write_private(creds_path, json.dumps(creds, indent=2) + "\n")
        out = self.stdout.write
        out(self.style.SUCCESS("Demo data ready (development only). Also in var/demo-credentials:"))
        out(f"  Console     {creds['console_url']}")
        out(f"    owner     {OWNER_EMAIL} / {owner_password}")
        out(f"  Staff admin {creds['staff_url']}")
        out(f"    staff     {STAFF_EMAIL} / {staff_password}")
        out(f"    TOTP      {device.config_url}")
        out("              (add it to an authenticator app; `make totp` prints the current code)")
        out(f"  API key     in {key_path}:")
        out(f"    curl -H 'Host: {tenant.primary_host}' -H \"Authorization: Bearer $(cat {key_path})\" "
            f"http://127.0.0.1{port}/api/v1/me")
