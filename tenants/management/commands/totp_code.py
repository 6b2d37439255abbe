"""manage.py totp_code [--email E]: print a user's current TOTP code (development only)."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice


class Command(BaseCommand):
    help = "Print the current TOTP code of a user's authenticator (development convenience)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", default="staff@example.com")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEVELOPMENT:
            raise CommandError("totp_code is for development only.")
        device = TOTPDevice.objects.filter(user__email=options["email"], confirmed=True).first()
        if device is None:
            raise CommandError(f"{options['email']} has no confirmed authenticator")
        code = totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits, drift=device.drift)
        self.stdout.write(f"{code:0{device.digits}d}  (valid for {device.step - int(time.time()) % device.step} s)")
