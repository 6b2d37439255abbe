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
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from compliance.services import audit_event_create
from config.errors import Forbidden, NotAuthenticated, ValidationFailed
from tenants.models import ApiKey, Membership, Tenant, User
from tenants.principal import Principal
from tenants.roles import Role, permissions_for_role, unknown_scopes

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


def _member_role(*, tenant: Tenant, user: User) -> str | None:
    return Membership.objects.filter(tenant=tenant, user=user).values_list("role", flat=True).first()


def _acting_user(*, principal: Principal, tenant: Tenant, acting_user: User | None) -> tuple[User, str]:
    """The person a new key acts for and their role in ``tenant`` (see ``api_key_create``)."""
    if principal.kind != "system":
        person = principal.person
        if person is None:
            raise Forbidden("Only members and their keys can create API keys.", code="permission_denied")
        if acting_user is not None and acting_user.pk != person.pk:
            raise Forbidden("A key can only act for the person creating it.", code="not_key_owner")
        acting_user = person
    elif acting_user is None:
        first_owner = (Membership.objects.filter(tenant=tenant, role=Role.OWNER).select_related("user")
                       .order_by("created_at", "pk").first())
        if first_owner is None:
            raise ValidationFailed("The tenant has no owner for the key to act for.", code="no_owner")
        acting_user = first_owner.user
    role = _member_role(tenant=tenant, user=acting_user)
    if role is None or not acting_user.is_active:
        raise ValidationFailed(f"{acting_user.email} is not a member of {tenant.slug}: a key must act for one.",
                               code="not_a_member")
    return acting_user, role


@transaction.atomic
def api_key_create(
    *,
    principal: Principal,
    tenant: Tenant,
    name: str,
    scopes: list[str],
    expires_at: dt.datetime | None = None,
    acting_user: User | None = None,
) -> IssuedKey:
    """Mint a key for ``tenant`` with ``scopes``, acting for a member of ``tenant``.

    The key acts for the principal's person (``Principal.person``: the member, or the creating
    key's own person). Only the system may name ``acting_user``; without one it acts for the
    tenant's first owner. Scopes must be known permissions (``tenants.roles.PERMISSIONS``) that
    both the principal and the acting member's role hold. ``expires_at`` must lie in the future
    and within two years. Raises ``Forbidden`` without ``keys:write``, for scopes beyond the
    principal's or the member's (``scope_not_held``) or for another person (``not_key_owner``);
    ``ValidationFailed`` otherwise (``not_a_member`` when the person is not an active member).
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
    person, role = _acting_user(principal=principal, tenant=tenant, acting_user=acting_user)
    granted = permissions_for_role(role)
    beyond = [s for s in scopes if not principal.can(s) or s not in granted]
    if beyond:
        message = (f"A key acting for {person.email} ({role}) cannot grant" if principal.kind == "system"
                   else "You cannot grant scopes you do not hold")
        raise Forbidden(f"{message}: {', '.join(beyond)}.", code="scope_not_held", details={"scopes": beyond})
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
        created_by=principal.user, acting_user=person, expires_at=expires_at,
    )
    audit_event_create(actor=principal, action="api_key.created", target_type="api_key", target_id=key.key_id,
                       payload={"name": name, "scopes": scopes, "acting_user": person.email,
                                "expires_at": expires_at.isoformat() if expires_at else None},
                       schema=tenant.schema_name)
    return IssuedKey(key=key, secret=secret)


@transaction.atomic
def api_key_revoke(*, principal: Principal, key: ApiKey) -> ApiKey:
    """Revoke ``key`` at once. Idempotent.

    Owners and admins (``members:write``) revoke any key of the tenant; other members revoke
    the keys they created or that act for them; a key may revoke itself. Raises ``Forbidden``
    otherwise.
    """
    principal.require("keys:write")
    own = (principal.user is not None and principal.user.pk in (key.created_by_id, key.acting_user_id)) or (
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


@dataclass(frozen=True)
class KeysFitted:
    """What ``api_keys_fit_to_role`` did: keys whose scopes it narrowed and keys it revoked."""

    clipped: int
    revoked: int


@transaction.atomic
def api_keys_fit_to_role(*, actor: Principal, user: User, tenant: Tenant | None, role: str | None,
                         reason: str) -> KeysFitted:
    """Narrow the active keys acting for ``user`` to what ``role`` allows; revoke the rest.

    Called when a member's access changes: a new role (``role``), removal or deactivation
    (``role=None``: every key is revoked). ``tenant=None`` covers the keys of every tenant (an
    account deactivated by staff). A key's scopes become their intersection with the role's
    permissions (``tenants.roles.ROLE_PERMISSIONS``); a key left with none is revoked. Each
    change is an audit event in the key's tenant (``api_key.scopes_clipped`` or
    ``api_key.revoked``, payload with ``reason``). Idempotent: a key already within the role is
    left alone.
    """
    granted = permissions_for_role(role) if role is not None else frozenset()
    # of=self: lock the keys, not the tenant rows joined in for their schema names.
    keys = (ApiKey.objects.select_for_update(of=("self",)).select_related("tenant")
            .filter(acting_user=user, revoked_at__isnull=True))
    if tenant is not None:
        keys = keys.filter(tenant=tenant)
    now = timezone.now()
    clipped = revoked = 0
    for key in keys.order_by("pk"):
        kept = [s for s in key.scopes if s in granted]
        if kept == key.scopes:
            continue
        payload = {"name": key.name, "acting_user": user.email, "reason": reason, "role": role}
        if kept:
            removed = [s for s in key.scopes if s not in granted]
            ApiKey.objects.filter(pk=key.pk).update(scopes=kept)
            audit_event_create(actor=actor, action="api_key.scopes_clipped", target_type="api_key",
                               target_id=key.key_id, payload={**payload, "removed": removed, "scopes": kept},
                               schema=key.tenant.schema_name)
            clipped += 1
        else:
            ApiKey.objects.filter(pk=key.pk).update(revoked_at=now)
            audit_event_create(actor=actor, action="api_key.revoked", target_type="api_key",
                               target_id=key.key_id, payload=payload, schema=key.tenant.schema_name)
            revoked += 1
    return KeysFitted(clipped=clipped, revoked=revoked)


def api_key_authenticate(*, raw_key: str, tenant: Tenant) -> ApiKey:
    """Return the active key ``raw_key`` of ``tenant``; raise ``NotAuthenticated`` otherwise.

    A well-formed key of another tenant, a revoked or an expired key all fail with messages that
    do not reveal whether the key exists elsewhere. A key whose person is no longer an active
    member of the tenant fails with ``orphaned_api_key`` (the services revoke such keys; this
    holds even when a membership changed past them). The key comes back with ``acting_role``,
    its person's current role, read in the same query, from which
    ``Principal.for_api_key`` derives its permissions. Touches ``last_used_at`` at most once a
    minute per key.
    """
    match = _KEY_RE.match(raw_key or "")
    if not match or match["prefix"] != settings.API_KEY_PREFIX:
        raise NotAuthenticated(
            f"Malformed API key: expected '{settings.API_KEY_PREFIX}_<id>_<secret>'.", code="malformed_api_key"
        )
    role = Membership.objects.filter(user=OuterRef("acting_user"), tenant=OuterRef("tenant")).values("role")[:1]
    key = (ApiKey.objects.select_related("tenant", "acting_user").annotate(acting_role=Subquery(role))
           .filter(key_id=match["key_id"]).first())
    if key is None or not hmac.compare_digest(key.secret_hash, _hash(raw_key)) or key.tenant_id != tenant.pk:
        raise NotAuthenticated("Invalid API key.", code="invalid_api_key")
    if key.revoked_at is not None:
        raise NotAuthenticated("This API key has been revoked.", code="revoked_api_key")
    now = timezone.now()
    if key.expires_at is not None and key.expires_at <= now:
        raise NotAuthenticated("This API key has expired.", code="expired_api_key")
    if key.acting_role is None or not key.acting_user.is_active:  # type: ignore[attr-defined]  # annotated above
        raise NotAuthenticated("The person this API key acts for is no longer a member of this workspace.",
                               code="orphaned_api_key")
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key
