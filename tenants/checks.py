"""System checks for settings that must not be silently wrong (``manage.py check``)."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


@register(Tags.security, deploy=False)
def production_settings(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    """In production (``PORTAL_ENV=production``) refuse the development defaults."""
    issues: list[Error | Warning] = []
    if os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "").lower() != "true":
        issues.append(Error("LITELLM_LOCAL_MODEL_COST_MAP must be True: litellm must never fetch its price map "
                            "from the internet.", id="portal.E001"))
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
