"""System checks for the audit chain's signing keys (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from compliance.signing import MIN_KEY_LENGTH


@register(Tags.security)
def audit_signing_keys(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    """``AUDIT_SIGNING_KEYS`` (``compliance.signing``): production must set them (a key derived
    from ``SECRET_KEY`` would be as exposed as ``SECRET_KEY``, and rotating that would break every
    chain), and each must be at least ``MIN_KEY_LENGTH`` characters."""
    keys = list(settings.AUDIT_SIGNING_KEYS)
    issues: list[Error | Warning] = []
    for position, key in enumerate(keys, start=1):
        if len(key) < MIN_KEY_LENGTH:
            # The key itself is a secret: name its position only.
            issues.append(Error(f"AUDIT_SIGNING_KEYS entry {position} is shorter than {MIN_KEY_LENGTH} characters.",
                                hint="Make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
                                id="compliance.E002"))
    if len(set(keys)) != len(keys):
        issues.append(Warning("AUDIT_SIGNING_KEYS lists the same key more than once.", id="compliance.W001"))
    if not keys and not settings.DEVELOPMENT:
        issues.append(Error("AUDIT_SIGNING_KEYS must be set in production: the audit chain and its checkpoints are "
                            "signed with it, and it must not be stored in the database.", id="compliance.E001"))
    return issues
