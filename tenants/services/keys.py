"""API keys: minting, revoking and authenticating.

Format: ``aop_<key_id>_<secret>``: ``aop`` makes leaked keys recognizable to secret scanners,
``key_id`` (12 lower-case base-32 characters) finds the row, ``secret`` is 32 random bytes in
URL-safe base64. Only SHA-256 of the whole key is stored: with 256 bits of entropy a fast hash
cannot be brute-forced, so a slow password hash would only add latency to every API call
(the reasoning GitHub gives for its token format).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from compliance.services import audit_event_create
from config.errors import Forbidden, NotAuthenticated, ValidationFailed
from tenants.models import ApiKey, Tenant
from tenants.principal import Principal
from tenants.roles import unknown_scopes

_KEY_RE = re.compile(r"^(?P<prefix>[a-z]+)_(?P<key_id>[a-z2-7]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
# last_used_at is written at most this often per key, so reads do not become writes.
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)
MAX_KEY_LIFETIME = dt.timedelta(days=366 * 2)


def _hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    """A new key and its secret, which exists only here and is shown to its creator once."""

    key: ApiKey
    secret: str


@transaction.atomic
def api_key_create(
    *,
    principal: Principal,
    tenant: Tenant,
    name: str,
    scopes: list[str],
    expires_at: dt.datetime | None = None,
) -> IssuedKey:
    """Mint a key for ``tenant`` with ``scopes``.

    Scopes must be known permissions (``tenants.roles.PERMISSIONS``) that the principal itself
    holds. ``expires_at`` must lie in the future and within two years. Raises ``Forbidden``
    without ``keys:write`` or for scopes beyond the principal's, ``ValidationFailed`` otherwise.
    """
    principal.require("keys:write")
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ValidationFailed("A key name is 1-100 characters.", code="invalid_name")
    scopes = sorted(set(scopes))
    if not scopes:
        raise ValidationFailed("Choose at least one scope.", code="invalid_scopes")
    unknown = unknown_scopes(scopes)
    if unknown:
        raise ValidationFailed(f"Unknown scopes: {', '.join(unknown)}.", code="invalid_scopes",
                               details={"unknown": unknown})
    beyond = [s for s in scopes if not principal.can(s)]
    if beyond:
        raise Forbidden(f"You cannot grant scopes you do not hold: {', '.join(beyond)}.",
                        code="scope_not_held", details={"scopes": beyond})
    now = timezone.now()
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValidationFailed("expires_at must include a time zone.", code="invalid_expiry")
        if expires_at <= now:
            raise ValidationFailed("expires_at must be in the future.", code="invalid_expiry")
        if expires_at > now + MAX_KEY_LIFETIME:
            raise ValidationFailed("A key can live at most two years.", code="invalid_expiry")

    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:12]
    secret = f"{settings.API_KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        tenant=tenant, name=name, key_id=key_id, secret_hash=_hash(secret), scopes=scopes,
        created_by=principal.user, expires_at=expires_at,
    )
    audit_event_create(actor=principal, action="api_key.created", target_type="api_key", target_id=key.key_id,
                       payload={"name": name, "scopes": scopes,
                                "expires_at": expires_at.isoformat() if expires_at else None},
                       schema=tenant.schema_name)
    return IssuedKey(key=key, secret=secret)


@transaction.atomic
def api_key_revoke(*, principal: Principal, key: ApiKey) -> ApiKey:
    """Revoke ``key`` at once. Idempotent.

    Owners and admins (``members:write``) revoke any key of the tenant; other members revoke
    the keys they created; a key may revoke itself. Raises ``Forbidden`` otherwise.
    """
    principal.require("keys:write")
    own = (principal.user is not None and key.created_by_id == principal.user.pk) or (
        principal.api_key is not None and principal.api_key.pk == key.pk
    )
    if not (own or principal.can("members:write")):
        raise Forbidden("You can only revoke keys you created.", code="not_key_owner")
    if key.revoked_at is not None:
        return key
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    audit_event_create(actor=principal, action="api_key.revoked", target_type="api_key", target_id=key.key_id,
                       payload={"name": key.name}, schema=key.tenant.schema_name)
    return key


def api_key_authenticate(*, raw_key: str, tenant: Tenant) -> ApiKey:
    """Return the active key ``raw_key`` of ``tenant``; raise ``NotAuthenticated`` otherwise.

    A well-formed key of another tenant, a revoked or an expired key all fail with messages that
    do not reveal whether the key exists elsewhere. Touches ``last_used_at`` at most once a
    minute per key.
    """
    match = _KEY_RE.match(raw_key or "")
    if not match or match["prefix"] != settings.API_KEY_PREFIX:
        raise NotAuthenticated(
            f"Malformed API key: expected '{settings.API_KEY_PREFIX}_<id>_<secret>'.", code="malformed_api_key"
        )
    key = ApiKey.objects.select_related("tenant").filter(key_id=match["key_id"]).first()
    if key is None or not hmac.compare_digest(key.secret_hash, _hash(raw_key)) or key.tenant_id != tenant.pk:
        raise NotAuthenticated("Invalid API key.", code="invalid_api_key")
    if key.revoked_at is not None:
        raise NotAuthenticated("This API key has been revoked.", code="revoked_api_key")
    now = timezone.now()
    if key.expires_at is not None and key.expires_at <= now:
        raise NotAuthenticated("This API key has expired.", code="expired_api_key")
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key
