"""Re-encrypt every stored secret under the first ``FIELD_ENCRYPTION_KEYS`` key.

Rotation: put a new key in front of ``FIELD_ENCRYPTION_KEYS`` (keeping the old ones after it),
deploy, run this command, and only when it exits 0 remove the old keys. A secret that no
configured key can read makes the command exit 1 naming the endpoint ids; the readable ones are
still rotated (rotating is idempotent, so running it again is safe).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from compliance.services import audit_event_create
from config.crypto import SecretUnreadable, secret_rotate
from tenants.models import ModelEndpoint
from tenants.principal import Principal


class Command(BaseCommand):
    help = "Re-encrypt model endpoint API keys under the first FIELD_ENCRYPTION_KEYS key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true",
                            help="Check that every secret is readable; change nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run: bool = options["dry_run"]
        rotated: list[int] = []
        unreadable: list[int] = []
        with transaction.atomic():
            rows = ModelEndpoint.objects.exclude(api_key_encrypted="").select_for_update().order_by("pk")
            for endpoint in rows:
                try:
                    token = secret_rotate(endpoint.api_key_encrypted)
                except SecretUnreadable:
                    unreadable.append(endpoint.pk)
                    continue
                rotated.append(endpoint.pk)
                if not dry_run:
                    ModelEndpoint.objects.filter(pk=endpoint.pk).update(api_key_encrypted=token)
            if rotated and not dry_run:
                audit_event_create(actor=Principal.system("field_keys_rotate"), action="field_keys.rotated",
                                   target_type="model_endpoint",
                                   payload={"rotated": len(rotated), "unreadable_ids": unreadable}, schema="public")
        verb = "readable" if dry_run else "re-encrypted"
        self.stdout.write(f"{len(rotated)} model endpoint key(s) {verb}, {len(unreadable)} unreadable.")
        if unreadable:
            raise CommandError(
                "No configured FIELD_ENCRYPTION_KEYS key can read the API key of model endpoint(s) "
                f"{', '.join(map(str, unreadable))}: restore the key they were encrypted with, or set their keys "
                "again. Do not remove old keys until this command succeeds."
            )
        if not dry_run:
            self.stdout.write(self.style.SUCCESS("Every stored secret is now under the first key."))
