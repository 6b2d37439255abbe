"""A tenant's OpenID Connect single sign-on: its settings, and what a sign-in does to memberships.

Settings (``sso_settings_get`` / ``sso_settings_update``): holders of ``members:write`` (owners
and admins), since SSO creates members and sets their roles. The issuer URL passes the egress
guard when saved (422 ``egress_denied``); the client secret is write-only, stored encrypted
(``config.crypto``) and audited only as ``client_auth: set``.

Sign-in (``sso_login_check`` then ``sso_membership_sync``, called by ``tenants.sso``'s adapter
after allauth verified the ID token):

- the address must be in ``allowed_email_domains``;
- the role is the strongest role that a value of the groups claim maps to, else
  ``default_role``; none refuses the sign-in (403 ``sso_no_role``);
- an IdP signs in only people whose account belongs to its tenant alone: an existing account
  that is staff or a member of another tenant is refused (403 ``sso_account_elsewhere``), because
  a tenant's IdP must not be able to act for an account that other tenants trust;
- the first sign-in creates the membership with that role; later sign-ins set the role from the
  claims (the member's API keys are narrowed to it). Owners are never changed by SSO, and SSO
  never grants ownership: owners are managed in the console, and keep password sign-in as the
  break-glass way in when ``enforce_sso`` is on.

Every sign-in, refusal, membership creation and role change is an audit event in the tenant's
chain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import idna
import structlog
from django.db import transaction
from django.utils import timezone

from compliance.services import audit_event_create
from config.crypto import secret_encrypt
from config.egress import EgressDenied, egress_check_url
from config.errors import Forbidden, ValidationFailed
from tenants.models import Membership, SsoConfig, Tenant, User
from tenants.principal import Principal
from tenants.roles import Role
from tenants.services.keys import api_keys_fit_to_role
from tenants.services.limits import plan_limit_check

logger = structlog.get_logger(__name__)

ISSUER_MAX_LENGTH = 500  # SsoConfig.issuer_url's column
CLIENT_ID_MAX_LENGTH = 255
CLIENT_SECRET_MAX_LENGTH = 1024
MAX_SCOPES = 20
MAX_MAPPINGS = 200
MAX_DOMAINS = 50
DEFAULT_SCOPES = ("openid", "email", "profile")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,64}$")
_CLAIM_RE = re.compile(r"^[A-Za-z0-9_:./-]{1,100}$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# SSO grants any role but owner. When several groups map, the strongest wins (this order).
SSO_ROLES: tuple[str, ...] = (Role.ADMIN, Role.OPERATOR, Role.APPROVER, Role.AUDITOR, Role.VIEWER)
SSO_ACTOR = "sso"


@dataclass(frozen=True)
class SsoSettings:
    """What may be read back: the client secret itself never is, only whether one is set."""

    enabled: bool
    display_name: str
    issuer_url: str
    client_id: str
    client_secret_set: bool
    scopes: list[str]
    groups_claim: str
    role_mapping: dict[str, str]
    default_role: str
    allowed_email_domains: list[str]
    enforce_sso: bool


def _invalid(field: str, message: str, *, code: str | None = None) -> ValidationFailed:
    return ValidationFailed(message, code=code, details=[{"field": field, "message": message}])


def _settings_of(config: SsoConfig | None) -> SsoSettings:
    if config is None:
        return SsoSettings(enabled=False, display_name="your identity provider", issuer_url="", client_id="",
                           client_secret_set=False, scopes=list(DEFAULT_SCOPES), groups_claim="groups",
                           role_mapping={}, default_role=Role.VIEWER, allowed_email_domains=[], enforce_sso=False)
    return SsoSettings(
        enabled=config.enabled, display_name=config.display_name, issuer_url=config.issuer_url,
        client_id=config.client_id, client_secret_set=config.has_client_secret, scopes=list(config.scopes),
        groups_claim=config.groups_claim, role_mapping=dict(config.role_mapping), default_role=config.default_role,
        allowed_email_domains=list(config.allowed_email_domains), enforce_sso=config.enforce_sso,
    )


# --- Cleaning the settings ---------------------------------------------------------------------


def issuer_url_clean(value: str) -> str:
    """Return the stripped issuer URL ('' allowed only while SSO is off) after the egress guard
    allowed it. Raises ``ValidationFailed`` (field ``issuer_url``) for an over-long URL or one
    with a query or fragment, and ``EgressDenied`` (422 ``egress_denied``) for what the guard
    refuses (other schemes, loopback, private, metadata ... unless the staff allowlist opens it)."""
    url = (value or "").strip()
    if not url:
        return ""
    if len(url) > ISSUER_MAX_LENGTH:
        raise _invalid("issuer_url", f"The issuer URL is longer than {ISSUER_MAX_LENGTH} characters.")
    if "?" in url or "#" in url:
        raise _invalid("issuer_url", "An issuer URL has no query or fragment (OpenID Connect Discovery 1.0, 2).")
    try:
        egress_check_url(url)
    except EgressDenied as exc:
        raise EgressDenied(
            f"The issuer URL is refused: {exc.message}",
            details=[{"field": "issuer_url", "message": exc.message}],
        ) from None
    return url


def _text_clean(field: str, value: str, *, max_length: int, label: str) -> str:
    text = (value or "").strip()
    if len(text) > max_length:
        raise _invalid(field, f"The {label} is longer than {max_length} characters.")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise _invalid(field, f"The {label} contains control characters.")
    return text


def scopes_clean(value: list[str]) -> list[str]:
    """The scopes, deduplicated in order with ``openid`` first (added when missing). Raises
    ``ValidationFailed`` (field ``scopes``) for a token outside RFC 6749's scope syntax or more
    than 20 scopes."""
    scopes: list[str] = ["openid"]
    for raw in value:
        scope = str(raw).strip()
        if not _SCOPE_RE.match(scope):
            raise _invalid("scopes", f"'{scope[:64]}' is not a valid OAuth scope (RFC 6749, 3.3).")
        if scope not in scopes:
            scopes.append(scope)
    if len(scopes) > MAX_SCOPES:
        raise _invalid("scopes", f"At most {MAX_SCOPES} scopes.")
    return scopes


def _sso_role_clean(field: str, role: str, *, allow_blank: bool) -> str:
    if allow_blank and role == "":
        return ""
    if role == Role.OWNER:
        raise _invalid(field, "Single sign-on never grants the owner role: owners are managed in the console.",
                       code="invalid_role")
    if role not in SSO_ROLES:
        raise _invalid(field, f"Unknown role '{role[:32]}'. Roles: {', '.join(SSO_ROLES)}.", code="invalid_role")
    return role


def role_mapping_clean(value: dict[str, str]) -> dict[str, str]:
    """Group value -> role, each value 1-256 characters, each role any but owner. Raises
    ``ValidationFailed`` (field ``role_mapping``)."""
    if len(value) > MAX_MAPPINGS:
        raise _invalid("role_mapping", f"At most {MAX_MAPPINGS} group mappings.")
    mapping: dict[str, str] = {}
    for group, role in value.items():
        name = str(group).strip()
        if not 1 <= len(name) <= 256:
            raise _invalid("role_mapping", "A group value is 1 to 256 characters long.")
        mapping[name] = _sso_role_clean("role_mapping", str(role), allow_blank=False)
    return mapping


def email_domains_clean(value: list[str]) -> list[str]:
    """Domain names, lowercased and in IDNA ASCII form, deduplicated. Raises ``ValidationFailed``
    (field ``allowed_email_domains``) for anything that is not a domain name."""
    if len(value) > MAX_DOMAINS:
        raise _invalid("allowed_email_domains", f"At most {MAX_DOMAINS} domains.")
    domains: list[str] = []
    for raw in value:
        text = str(raw).strip().lower().removeprefix("@").rstrip(".")
        try:
            domain = idna.encode(text, uts46=True).decode("ascii").lower() if text else ""
        except (idna.IDNAError, UnicodeError):
            domain = ""
        labels = domain.split(".")
        if len(labels) < 2 or len(domain) > 253 or not all(_LABEL_RE.match(label) for label in labels):
            raise _invalid("allowed_email_domains", f"'{str(raw)[:64]}' is not a domain name such as 'example.com'.")
        if domain not in domains:
            domains.append(domain)
    return domains


# --- Reading and changing the settings -----------------------------------------------------------


def sso_settings_get(*, principal: Principal, tenant: Tenant) -> SsoSettings:
    """The tenant's SSO settings without the client secret (``members:write``: owners and
    admins). A tenant that never saved any gets the defaults (off). Raises ``Forbidden``."""
    principal.require("members:write")
    return _settings_of(SsoConfig.objects.filter(tenant=tenant).first())


@transaction.atomic
def sso_settings_update(
    *,
    principal: Principal,
    tenant: Tenant,
    enabled: bool | None = None,
    display_name: str | None = None,
    issuer_url: str | None = None,
    client_id: str | None = None,
    client_secret: str = "",
    scopes: list[str] | None = None,
    groups_claim: str | None = None,
    role_mapping: dict[str, str] | None = None,
    default_role: str | None = None,
    allowed_email_domains: list[str] | None = None,
    enforce_sso: bool | None = None,
) -> SsoSettings:
    """Change the tenant's SSO settings (``members:write``); ``None`` keeps a field as is, and
    ``client_secret`` '' keeps the stored secret.

    Turning SSO on (or keeping it on) needs an issuer URL, a client id, a client secret and at
    least one allowed e-mail domain; ``enforce_sso`` needs SSO on. Saving the current values
    changes nothing and writes no audit event (a repeated PUT is a no-op); otherwise one event
    ``tenant.sso_settings_changed`` names the changed fields, the secret only as
    ``client_auth: set``.

    Raises ``Forbidden`` (403), ``ValidationFailed`` (422 ``validation_failed``/``invalid_role``
    with ``details[0].field``) or ``EgressDenied`` (422 ``egress_denied``).
    """
    principal.require("members:write")
    updates: dict[str, Any] = {}
    if enabled is not None:
        updates["enabled"] = bool(enabled)
    if display_name is not None:
        name = _text_clean("display_name", display_name, max_length=100, label="display name")
        updates["display_name"] = name or "your identity provider"
    if issuer_url is not None:
        updates["issuer_url"] = issuer_url_clean(issuer_url)
    if client_id is not None:
        updates["client_id"] = _text_clean("client_id", client_id, max_length=CLIENT_ID_MAX_LENGTH,
                                           label="client id")
    secret = _text_clean("client_secret", client_secret, max_length=CLIENT_SECRET_MAX_LENGTH, label="client secret")
    if scopes is not None:
        updates["scopes"] = scopes_clean(scopes)
    if groups_claim is not None:
        claim = (groups_claim or "").strip()
        if not _CLAIM_RE.match(claim):
            raise _invalid("groups_claim", "The groups claim is a claim name of 1-100 letters, digits and _:./-.")
        updates["groups_claim"] = claim
    if role_mapping is not None:
        updates["role_mapping"] = role_mapping_clean(role_mapping)
    if default_role is not None:
        updates["default_role"] = _sso_role_clean("default_role", default_role.strip(), allow_blank=True)
    if allowed_email_domains is not None:
        updates["allowed_email_domains"] = email_domains_clean(allowed_email_domains)
    if enforce_sso is not None:
        updates["enforce_sso"] = bool(enforce_sso)

    config, _ = SsoConfig.objects.select_for_update().get_or_create(
        tenant=tenant, defaults={"scopes": list(DEFAULT_SCOPES)})
    changed: dict[str, object] = {}
    for name, value in updates.items():
        if getattr(config, name) != value:
            setattr(config, name, value)
            changed[name] = value
    if secret:
        config.client_secret_encrypted = secret_encrypt(secret)
        changed["client_auth"] = "set"
    if config.enabled:
        missing = [label for label, ok in (("issuer_url", config.issuer_url), ("client_id", config.client_id),
                                           ("client_secret", config.has_client_secret),
                                           ("allowed_email_domains", config.allowed_email_domains)) if not ok]
        if missing:
            raise _invalid(missing[0], f"Single sign-on needs {', '.join(missing)} before it can be turned on.")
    elif config.enforce_sso:
        raise _invalid("enforce_sso", "Enforcing single sign-on needs single sign-on turned on.")
    if changed:
        config.updated_at = timezone.now()
        config.save()
        audit_event_create(actor=principal, action="tenant.sso_settings_changed", target_type="tenant",
                           target_id=tenant.pk, payload={"changed": changed}, schema=tenant.schema_name)
        logger.info("tenant_sso_settings_changed", tenant=tenant.slug, fields=sorted(changed))
    return _settings_of(config)


# --- Signing in ----------------------------------------------------------------------------------


def sso_config_active(*, tenant: Tenant | None) -> SsoConfig | None:
    """The tenant's SSO configuration when SSO is on, else ``None`` (also on the public host)."""
    if tenant is None or getattr(tenant, "is_public", True):
        return None
    return SsoConfig.objects.filter(tenant=tenant, enabled=True).first()


def sso_role_for_claims(*, config: SsoConfig, claims: dict[str, Any]) -> str | None:
    """The role the claims give: the strongest role (``SSO_ROLES`` order) a value of the groups
    claim maps to, else ``default_role``; ``None`` when neither gives one. The claim may be a
    list of strings or one string."""
    raw = claims.get(config.groups_claim)
    groups = [raw] if isinstance(raw, str) else [g for g in raw if isinstance(g, str)] if isinstance(raw, list) else []
    mapped = {config.role_mapping[g] for g in groups if g in config.role_mapping}
    for role in SSO_ROLES:
        if role in mapped:
            return role
    return config.default_role or None


@dataclass(frozen=True)
class SsoLoginDecision:
    """Who the IdP's claims sign in: ``email`` (normalized), the ``role`` they give, and the
    existing account with that address (``None``: a new account is made)."""

    email: str
    role: str
    existing_user: User | None


def sso_login_refused(*, tenant: Tenant, reason: str, email: str = "", detail: str = "") -> None:
    """Record a refused or failed SSO sign-in in the tenant's audit chain (own transaction)."""
    with transaction.atomic():
        audit_event_create(actor=Principal.system(SSO_ACTOR, tenant=tenant), action="sso.login_refused",
                           target_type="tenant", target_id=tenant.pk,
                           payload={"reason": reason, "email": email, "detail": detail[:300]},
                           schema=tenant.schema_name)
    logger.info("sso_login_refused", tenant=tenant.slug, reason=reason)


def sso_login_check(*, tenant: Tenant, config: SsoConfig, claims: dict[str, Any],
                    linked_user: User | None) -> SsoLoginDecision:
    """Decide whether verified ID-token/userinfo ``claims`` may sign in to ``tenant``.

    ``linked_user`` is the account already linked to this IdP subject, if any. Raises
    ``Forbidden`` with code ``sso_email_missing``, ``sso_domain_not_allowed``,
    ``sso_account_elsewhere``, ``sso_account_inactive`` or ``sso_no_role``, or ``Conflict``
    (``plan_limit``) when a new member would pass the plan's seats.
    """
    email = User.objects.normalize_email(str(claims.get("email") or "").strip()).lower()
    if "@" not in email:
        raise Forbidden("The identity provider sent no e-mail address.", code="sso_email_missing")
    domain = email.rpartition("@")[2]
    if domain not in config.allowed_email_domains:
        raise Forbidden(f"Addresses at {domain} may not sign in to this workspace.", code="sso_domain_not_allowed")
    user = linked_user or User.objects.filter(email__iexact=email).first()
    membership = None
    if user is not None:
        if not user.is_active:
            raise Forbidden("This account is deactivated.", code="sso_account_inactive")
        elsewhere = Membership.objects.filter(user=user).exclude(tenant=tenant).exists()
        if user.is_staff or elsewhere:
            raise Forbidden(
                "This account belongs to another workspace (or to staff), so this workspace's identity "
                "provider cannot sign it in. Sign in with its password.",
                code="sso_account_elsewhere",
            )
        membership = Membership.objects.filter(user=user, tenant=tenant).first()
    role = sso_role_for_claims(config=config, claims=claims)
    if membership is not None and membership.role == Role.OWNER:
        role = Role.OWNER  # never changed by SSO
    if role is None:
        raise Forbidden("Your identity provider gives you no role in this workspace.", code="sso_no_role")
    if membership is None:
        # Refuse early, before an account is made; sso_membership_sync checks again under the lock.
        with transaction.atomic():
            plan_limit_check(tenant=tenant, limit="max_members",
                             used=lambda: Membership.objects.filter(tenant=tenant).count())
    return SsoLoginDecision(email=email, role=role, existing_user=user)


@transaction.atomic
def sso_membership_sync(*, tenant: Tenant, user: User, role: str, subject: str, created_user: bool) -> Membership:
    """After an SSO sign-in: create ``user``'s membership with ``role``, or set its role to
    ``role`` (never for an owner), narrowing their API keys to it; audit the sign-in
    (``sso.login``), a new member (``member.joined``) and a role change (``member.role_changed``,
    actor ``sso``). Returns the membership."""
    actor = Principal.system(SSO_ACTOR, tenant=tenant)
    membership = Membership.objects.select_for_update().filter(user=user, tenant=tenant).first()
    if membership is None:
        plan_limit_check(tenant=tenant, limit="max_members",
                         used=lambda: Membership.objects.filter(tenant=tenant).count())
        membership = Membership.objects.create(user=user, tenant=tenant, role=role)
        audit_event_create(actor=Principal.for_member(membership), action="member.joined", target_type="membership",
                           target_id=membership.pk, payload={"email": user.email, "role": role, "via": "sso"},
                           schema=tenant.schema_name)
    elif membership.role != role and membership.role != Role.OWNER and role != Role.OWNER:
        previous = membership.role
        membership.role = role
        membership.save(update_fields=["role"])
        audit_event_create(actor=actor, action="member.role_changed", target_type="membership",
                           target_id=membership.pk,
                           payload={"email": user.email, "from": previous, "to": role, "via": "sso"},
                           schema=tenant.schema_name)
        api_keys_fit_to_role(actor=actor, user=user, tenant=tenant, role=role, reason="role_changed")
    audit_event_create(actor=Principal.for_member(membership), action="sso.login", target_type="membership",
                       target_id=membership.pk,
                       payload={"email": user.email, "role": membership.role, "subject": subject[:255],
                                "new_account": created_user},
                       schema=tenant.schema_name)
    return membership


def password_login_allowed(*, tenant: Tenant | None, user: User) -> bool:
    """False when ``tenant`` enforces SSO and ``user`` is a member there other than an owner
    (owners keep password sign-in as the break-glass way in)."""
    config = sso_config_active(tenant=tenant)
    if config is None or not config.enforce_sso:
        return True
    role = Membership.objects.filter(user=user, tenant=tenant).values_list("role", flat=True).first()
    return role is None or role == Role.OWNER


def sso_password_login_refused(*, tenant: Tenant, user: User) -> None:
    """Record, in the tenant's audit chain, a password sign-in that ``enforce_sso`` refused."""
    with transaction.atomic():
        audit_event_create(actor=Principal.system(SSO_ACTOR, tenant=tenant), action="sso.password_login_refused",
                           target_type="user", target_id=user.pk, payload={"email": user.email},
                           schema=tenant.schema_name)
