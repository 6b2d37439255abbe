"""System checks for settings that must not be silently wrong (``manage.py check``)."""

from __future__ import annotations

import os
from typing import Any

from cryptography.fernet import Fernet
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


@register(Tags.security, deploy=False)
def production_settings(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    """In production (``PORTAL_ENV=production``) refuse the development defaults."""
    issues: list[Error | Warning] = []
    if os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "").lower() != "true":
        issues.append(Error("LITELLM_LOCAL_MODEL_COST_MAP must be True: litellm must never fetch its price map "
                            "from the internet.", id="portal.E001"))
    issues.extend(_field_encryption_keys())
    if settings.DEVELOPMENT:
        return issues
    if settings.DEBUG:
        issues.append(Error("DEBUG must be off in production.", id="portal.E002"))
    if settings.EMBEDDED_PG:
        issues.append(Error("Set DATABASE_URL in production; the embedded PostgreSQL is for development.",
                            id="portal.E003"))
    if len(settings.SECRET_KEY) < 40:
        issues.append(Error("SECRET_KEY must be at least 40 characters.", id="portal.E004"))
    if not (settings.SESSION_COOKIE_SECURE and settings.CSRF_COOKIE_SECURE):
        issues.append(Error("Session and CSRF cookies must be Secure in production.", id="portal.E005"))
    if "console" in settings.EMAIL_BACKEND or "locmem" in settings.EMAIL_BACKEND:
        issues.append(Warning("EMAIL_BACKEND does not send e-mail: invitations and password resets will not "
                              "arrive.", id="portal.W001"))
    if settings.BASE_DOMAIN == "localhost" or settings.PUBLIC_HOST == "localhost":
        issues.append(Warning("PUBLIC_HOST/BASE_DOMAIN are still 'localhost'.", id="portal.W002"))
    return issues


def _field_encryption_keys() -> list[Error | Warning]:
    """``FIELD_ENCRYPTION_KEYS`` (``config.crypto``): each entry must be a Fernet key (32 bytes,
    URL-safe base64), and production must set them rather than derive one from ``SECRET_KEY``
    (rotating ``SECRET_KEY`` would then make every stored API key unreadable)."""
    keys = list(settings.FIELD_ENCRYPTION_KEYS)
    issues: list[Error | Warning] = []
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            # The key itself is a secret: name its position only.
            issues.append(Error(f"FIELD_ENCRYPTION_KEYS entry {position} is not a Fernet key (32 bytes, URL-safe "
                                "base64).", hint="Make one with: python -c 'from cryptography.fernet import Fernet; "
                                "print(Fernet.generate_key().decode())'", id="portal.E007"))
    if len(set(keys)) != len(keys):
        issues.append(Warning("FIELD_ENCRYPTION_KEYS lists the same key more than once.", id="portal.W003"))
    if not keys and not settings.DEVELOPMENT:
        issues.append(Error("FIELD_ENCRYPTION_KEYS must be set in production: without it the key that encrypts "
                            "model endpoint API keys is derived from SECRET_KEY.", id="portal.E006"))
    return issues
