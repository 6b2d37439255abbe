"""Control plane, in the public schema: tenants, their hosts, users, memberships, API keys."""

from __future__ import annotations

import uuid
import zoneinfo
from typing import Any, ClassVar

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from django_tenants.models import DomainMixin, TenantMixin

from tenants.roles import Role


def validate_time_zone(value: str) -> None:
    """Refuse a name that is not an IANA timezone (``ZoneInfo`` must load it)."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationError(f"{value!r} is not an IANA timezone such as 'Europe/Berlin'.") from exc


class Plan(models.Model):  # type: ignore[django-manager-missing]  # reverse FK from a TenantMixin subclass
    """A commercial plan a tenant is on: its monthly fee and the limits it grants.

    ``None`` in a limit means unlimited.
    """

    code = models.SlugField(max_length=40, unique=True)
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    currency = models.CharField(max_length=3, default="USD")
    monthly_fee = models.DecimalField(max_digits=12, decimal_places=2, default=0)
    max_members = models.PositiveIntegerField(null=True, blank=True)
    max_agents = models.PositiveIntegerField(null=True, blank=True)
    max_storage_mb = models.PositiveIntegerField(null=True, blank=True)
    # Per API key and per member, per minute (Redis-backed, across processes).
    api_requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    chat_turns_per_minute = models.PositiveIntegerField(null=True, blank=True)
    kb_searches_per_minute = models.PositiveIntegerField(null=True, blank=True)
    # Model input + output tokens per calendar month in the tenant's timezone, tenant-wide.
    monthly_token_quota = models.PositiveBigIntegerField(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["monthly_fee", "code"]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"


class Tenant(TenantMixin):
    """A customer company. Its rows live in its own PostgreSQL schema (``schema_name``)."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    slug = models.SlugField(max_length=40, unique=True)
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.PROTECT, related_name="tenants")
    region = models.CharField(max_length=40, default="local")
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone],
                                 help_text="IANA timezone of budget periods and invoice months.")
    alert_webhook_url = models.URLField(max_length=500, blank=True,
                                        help_text="Budget alerts are POSTed here, signed (HMAC-SHA256).")
    alert_webhook_secret_encrypted = models.TextField(blank=True, editable=False)
    require_2fa = models.BooleanField(
        default=False, help_text="Owners and admins must use two-factor authentication."
    )
    created_at = models.DateTimeField(default=timezone.now)
    suspended_at = models.DateTimeField(null=True, blank=True)
    suspended_reason = models.CharField(max_length=500, blank=True)

    # Provisioning creates the schema explicitly (tenants.provisioning), never as a save() side
    # effect, so that a failed provisioning cannot leave a half-made tenant behind.
    auto_create_schema = False
    auto_drop_schema = False

    class Meta:
        ordering: ClassVar = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def is_public(self) -> bool:
        return self.schema_name == settings.PUBLIC_SCHEMA_NAME

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE

    @property
    def primary_host(self) -> str:
        return f"{self.slug}.{settings.BASE_DOMAIN}"


class Domain(DomainMixin):
    """A host name routed to a tenant (``<slug>.<BASE_DOMAIN>`` plus any custom domains)."""

    def __str__(self) -> str:
        return self.domain


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def _create(self, email: str, password: str | None, **extra: Any) -> User:
        if not email:
            raise ValueError("An e-mail address is required")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create(email, password, **extra)

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra["is_staff"] = True
        extra["is_superuser"] = True
        return self._create(email, password, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    """A person. Logs in by e-mail; belongs to tenants through ``Membership``."""

    email = models.EmailField(max_length=254, unique=True)
    name = models.CharField(max_length=200, blank=True)
    is_staff = models.BooleanField(default=False, help_text="May use the staff admin pages.")
    is_active = models.BooleanField(default=True)
    date_joined = models.DateTimeField(default=timezone.now)

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(Lower("email"), name="user_email_ci_unique"),
        ]

    def __str__(self) -> str:
        return self.email

    def clean(self) -> None:
        super().clean()
        self.email = self.__class__.objects.normalize_email(self.email).lower()

    @property
    def display_name(self) -> str:
        return self.name or self.email


class Membership(models.Model):
    """A user's role in one tenant."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(default=timezone.now)
    invited_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # SCIM 2.0 (tenants.scim): the resource id the tenant's identity provider addresses this member
    # by, and the IdP's own id for them. Both are per tenant, hence here and not on the User.
    scim_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    scim_external_id = models.CharField(max_length=255, null=True, blank=True,
                                        help_text="The identity provider's id of this person (SCIM externalId).")

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_user_tenant_unique"),
            models.UniqueConstraint(fields=["tenant", "scim_external_id"], name="membership_scim_external_id_unique",
                                    condition=models.Q(scim_external_id__isnull=False)),
        ]
        ordering: ClassVar = ["tenant", "user__email"]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} as {self.role}"


class Invitation(models.Model):
    """An offer of membership sent to an e-mail address; accepted once through a secret link.

    Only the SHA-256 of the link's token is stored.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField(max_length=254)
    role = models.CharField(max_length=16, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering: ClassVar = ["-created_at"]
        constraints: ClassVar = [
            # At most one open invitation per address and tenant; re-inviting replaces it.
            models.UniqueConstraint(
                "tenant",
                Lower("email"),
                condition=models.Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="invitation_open_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.email} to {self.tenant} as {self.role}"

    @property
    def is_open(self) -> bool:
        return self.accepted_at is None and self.revoked_at is None and self.expires_at > timezone.now()

    @property
    def state(self) -> str:
        if self.accepted_at:
            return "accepted"
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "pending"


class ApiKey(models.Model):
    """A credential for programs, bound to one tenant and a set of scopes, acting for one person.

    The secret is ``<prefix>_<key_id>_<random>``; it is shown once and only its SHA-256 is kept.
    ``key_id`` is public (shown in lists, used to find the row); the random part is 256 bits.
    ``acting_user`` is the member the key acts for (its creator, or the creating key's person):
    the key never holds more than that member's current role allows and dies with their access
    (``tenants.services.keys``). ``created_by`` is null when a key or the system minted it.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    key_id = models.CharField(max_length=24, unique=True)
    secret_hash = models.CharField(max_length=64)
    scopes = ArrayField(models.CharField(max_length=40), default=list)
    created_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # CASCADE: a key cannot outlive the account of the person it acts for.
    acting_user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="acting_api_keys",
                                    help_text="The member this key acts for; it never holds more than their role.")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering: ClassVar = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    @property
    def prefix(self) -> str:
        """The non-secret start of the key, e.g. ``aop_3fk29x0qzm1c``."""
        return f"{settings.API_KEY_PREFIX}_{self.key_id}"

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class ModelEndpoint(models.Model):
    """A chat model reachable through litellm: the platform's (``tenant`` null) or a tenant's own.

    ``model`` is a litellm model string (``hosted_vllm/Qwen/Qwen2.5-7B-Instruct``,
    ``openai/gpt-4o-mini``); ``api_base`` its OpenAI-compatible base URL. The API key is stored
    only encrypted (``config.crypto``) and never shown again. Within a tier, endpoints are tried
    in ``priority`` order (lowest first): the first is the primary, the others its fallbacks.
    An agent version that pins no endpoint uses only the platform's endpoints of its tier; a
    tenant's own endpoint serves only the versions that pin it, and its ``api_base`` goes through
    the egress guard (``config.egress``). Prices are per million tokens, in ``currency``, and are
    snapshotted on every usage event.
    """

    class Tier(models.TextChoices):
        LIGHT = "light", "Light"
        STANDARD = "standard", "Standard"
        HEAVY = "heavy", "Heavy"

    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE,
                               related_name="model_endpoints")
    name = models.CharField(max_length=100)
    model = models.CharField(max_length=200,
                             help_text="litellm model string, e.g. hosted_vllm/Qwen/Qwen2.5-7B-Instruct")
    api_base = models.URLField(max_length=500, blank=True)
    api_key_encrypted = models.TextField(blank=True, editable=False)
    tier = models.CharField(max_length=10, choices=Tier.choices, default=Tier.STANDARD)
    priority = models.PositiveIntegerField(default=100, help_text="Lower is tried first within the tier.")
    context_window = models.PositiveIntegerField(default=8192, help_text="Tokens the model accepts in all.")
    input_price_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    output_price_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    currency = models.CharField(max_length=3, default="USD")
    timeout_seconds = models.FloatField(default=60.0)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["tier", "priority", "name"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["name"], condition=models.Q(tenant__isnull=True),
                                    name="model_endpoint_platform_name_unique"),
            models.UniqueConstraint(fields=["tenant", "name"], name="model_endpoint_tenant_name_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.tier})"

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)

    def api_key(self) -> str:
        """The decrypted API key ('' when none); raises ``config.crypto.SecretUnreadable``."""
        from config.crypto import secret_decrypt

        return secret_decrypt(self.api_key_encrypted)


class EgressAllowRule(models.Model):
    """A staff rule of the egress allowlist (``config.egress``): the only way for a tenant-supplied
    URL to reach a private address or a port other than 80/443.

    ``target`` is a host name (admits whatever that exact name resolves to), an IP address or a
    CIDR network (admits those addresses under any name); ``port`` null opens 80 and 443 only.
    The cloud metadata services stay closed whatever the rules say.
    """

    target = models.CharField(max_length=255, help_text="Host name, IP address or CIDR network, e.g. 10.20.0.0/16.")
    port = models.PositiveIntegerField(null=True, blank=True,
                                       help_text="The one port this rule opens; empty opens 80 and 443 only.")
    description = models.CharField(max_length=200, blank=True, help_text="Why this is open, and for whom.")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["target", "port"]

    def __str__(self) -> str:
        return f"{self.target}:{self.port}" if self.port else self.target


class AuditCheckpoint(models.Model):
    """A signed statement of one audit chain's head (``compliance.chain``), kept in the public
    schema, outside the tenant's, so that truncating a tenant's chain is noticed.

    ``schema_name`` names the chain (``public`` or a tenant's schema; a string, so checkpoints
    outlive a deleted tenant); ``seq``/``hash`` are its head at ``created_at``; ``legacy_events``
    counts the plain-hash events that open it; ``signature`` is the HMAC of all of these under the
    ``AUDIT_SIGNING_KEYS`` key named ``key_id``. Rows are never updated or deleted (a trigger).
    """

    schema_name = models.CharField(max_length=63)
    seq = models.BigIntegerField()
    hash = models.CharField(max_length=64)
    legacy_events = models.BigIntegerField(default=0)
    created_at = models.DateTimeField()
    key_id = models.CharField(max_length=16)
    signature = models.CharField(max_length=64)

    class Meta:
        ordering: ClassVar = ["-created_at", "-id"]
        indexes: ClassVar = [models.Index(fields=["schema_name", "-seq"], name="audit_checkpoint_head")]

    def __str__(self) -> str:
        return f"{self.schema_name} @ {self.seq}"


class SsoConfig(models.Model):
    """A tenant's OpenID Connect single sign-on (``tenants.services.sso``; login in ``tenants.sso``).

    ``issuer_url`` is the IdP's issuer (its discovery document is at
    ``<issuer>/.well-known/openid-configuration``), checked by the egress guard when saved and
    on every connection. The client secret is stored only encrypted (``config.crypto``).
    ``role_mapping`` maps values of the ``groups_claim`` claim to roles (never owner);
    ``default_role`` applies when no group maps ('' refuses such people). Only addresses in
    ``allowed_email_domains`` may sign in. ``enforce_sso`` refuses password sign-in on the
    tenant's host to members other than owners (their break-glass accounts).
    """

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="sso_config")
    enabled = models.BooleanField(default=False)
    display_name = models.CharField(max_length=100, default="your identity provider",
                                    help_text='Shown on the login page: "Sign in with <display name>".')
    issuer_url = models.URLField(max_length=500, blank=True)
    client_id = models.CharField(max_length=255, blank=True)
    client_secret_encrypted = models.TextField(blank=True, editable=False)
    scopes = ArrayField(models.CharField(max_length=64), default=list)
    groups_claim = models.CharField(max_length=100, default="groups")
    role_mapping = models.JSONField(default=dict, blank=True)
    default_role = models.CharField(max_length=16, blank=True, default=Role.VIEWER)
    allowed_email_domains = ArrayField(models.CharField(max_length=253), default=list)
    enforce_sso = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"SSO of {self.tenant_id}"

    @property
    def has_client_secret(self) -> bool:
        return bool(self.client_secret_encrypted)

    def client_secret(self) -> str:
        """The decrypted client secret ('' when none); raises ``config.crypto.SecretUnreadable``."""
        from config.crypto import secret_decrypt

        return secret_decrypt(self.client_secret_encrypted)
