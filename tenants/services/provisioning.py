"""Creating, suspending, resuming and deleting tenants.

A tenant's schema is cloned from a template schema (``settings.TENANT_BASE_SCHEMA``) that holds
every tenant app's tables at the current migration state. Cloning copies table definitions,
indexes, triggers and functions in one SQL call, which is several times faster than replaying
every migration for each new tenant. The template is rebuilt whenever the migrations on disk
differ from the ones recorded in it (see ``template_schema_ensure``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import structlog
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction
from django.db.migrations.loader import MigrationLoader
from django.utils import timezone
from django_tenants.clone import CLONE_SCHEMA_FUNCTION
from django_tenants.utils import schema_context, schema_exists

from compliance.services import audit_event_create
from config.errors import Conflict, ValidationFailed
from tenants.models import Domain, Membership, Plan, Tenant, User
from tenants.principal import Principal
from tenants.roles import Role

logger = structlog.get_logger(__name__)

SLUG_RE = re.compile(r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")
# Host labels that must never become tenants: they name the platform's own services, are
# commonly phished, or collide with schema names.
RESERVED_SLUGS = frozenset(
    {
        "admin", "api", "app", "apps", "assets", "auth", "billing", "cdn", "console", "dashboard",
        "dev", "docs", "help", "internal", "localhost", "login", "mail", "metrics", "portal",
        "public", "root", "smtp", "sso", "staff", "static", "status", "support", "system",
        "template", "tenant", "test", "www",
    }
)


def slug_validate(slug: str) -> str:
    """Return ``slug`` if it can name a tenant, else raise ``ValidationFailed``.

    A slug is 3-40 characters of lower-case letters, digits and single hyphens, starting
    with a letter and not ending with a hyphen, and not one of ``RESERVED_SLUGS``; it becomes
    the host label ``<slug>.<BASE_DOMAIN>``.
    """
    if not SLUG_RE.match(slug or "") or "--" in slug:
        raise ValidationFailed(
            "A tenant slug is 3-40 characters: lower-case letters, digits and single hyphens, "
            "starting with a letter and ending with a letter or digit.",
            code="invalid_slug",
        )
    if slug in RESERVED_SLUGS:
        raise ValidationFailed(f"'{slug}' is reserved and cannot name a tenant.", code="reserved_slug")
    return slug


def schema_name_for(slug: str) -> str:
    """The PostgreSQL schema of tenant ``slug``: ``t_`` + slug with hyphens as underscores."""
    return "t_" + slug.replace("-", "_")


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _tenant_app_labels() -> set[str]:
    return {app.rsplit(".", 1)[-1] for app in settings.TENANT_APPS}


def _tenant_migrations_on_disk() -> set[tuple[str, str]]:
    loader = MigrationLoader(None, ignore_no_migrations=True)
    return {key for key in loader.disk_migrations if key[0] in _tenant_app_labels()}


_template_checked = False


def template_schema_ensure(*, force: bool = False) -> bool:
    """Make the template schema match the tenant migrations on disk; return True if rebuilt.

    Checked once per process (migrations do not change while it runs). Rebuilding drops the
    template and replays the tenant migrations into it; concurrent callers are serialized by an
    advisory lock.
    """
    global _template_checked
    if _template_checked and not force:
        return False
    template = settings.TENANT_BASE_SCHEMA
    rebuilt = False
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key("tenant-template")])
        wanted = _tenant_migrations_on_disk()
        current: set[tuple[str, str]] = set()
        if schema_exists(template):
            with connection.cursor() as cursor:
                cursor.execute(f'SELECT app, name FROM "{template}".django_migrations')  # noqa: S608 - fixed name
                # Shared apps are recorded there too (as no-ops); only tenant apps matter.
                current = {(app, name) for app, name in cursor.fetchall() if app in _tenant_app_labels()}
        if force or current != wanted:
            logger.info("tenant_template_rebuild", schema=template, migrations=len(wanted))
            with connection.cursor() as cursor:
                cursor.execute(f'DROP SCHEMA IF EXISTS "{template}" CASCADE')
                cursor.execute(f'CREATE SCHEMA "{template}"')
            call_command("migrate_schemas", schema_name=template, tenant=True, interactive=False, verbosity=0)
            connection.set_schema_to_public()  # type: ignore[attr-defined]  # django-tenants
            rebuilt = True
    _template_checked = True
    return rebuilt


_clone_function_ready = False


def _clone_function_ensure() -> None:
    """Install django-tenants' ``clone_schema`` SQL function once, not on every clone.

    django-tenants' own ``CloneSchema`` re-creates its ~4,600-line function (dropping and
    re-creating its types) before each clone, which costs 0.5-2 s per tenant. The function is
    tagged with a hash of its source, so upgrading django-tenants installs the new version.
    """
    global _clone_function_ready
    if _clone_function_ready:
        return
    user = settings.DATABASES["default"].get("USER") or "postgres"
    source = CLONE_SCHEMA_FUNCTION.format(db_user=user)
    version = "django-tenants:" + hashlib.sha256(source.encode()).hexdigest()[:16]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key("clone-schema-function")])
        cursor.execute(
            "SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p "
            "WHERE p.proname = 'clone_schema' AND p.pronamespace = 'public'::regnamespace"
        )
        if version not in {row[0] for row in cursor.fetchall()}:
            cursor.execute(source)
            cursor.execute(f"COMMENT ON FUNCTION public.clone_schema(text, text, public.cloneparms[]) IS '{version}'")
    _clone_function_ready = True


def _schema_create(schema: str) -> None:
    """Create ``schema`` with every tenant table, by cloning the template or by migrating."""
    if settings.TENANT_CREATION_FAKES_MIGRATIONS:
        template_schema_ensure()
        _clone_function_ensure()
        # DATA copies the template's django_migrations rows (its only rows), so the new schema
        # needs no migrate --fake afterwards.
        with connection.cursor() as cursor:
            cursor.execute("SELECT public.clone_schema(%s, %s, 'DATA')", [settings.TENANT_BASE_SCHEMA, schema])
    else:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA "{schema}"')
        call_command("migrate_schemas", schema_name=schema, tenant=True, interactive=False, verbosity=0)
    connection.set_schema_to_public()  # type: ignore[attr-defined]  # django-tenants


@dataclass(frozen=True)
class ProvisionedTenant:
    tenant: Tenant
    owner: User
    owner_created: bool


def tenant_create(
    *,
    actor: Principal,
    slug: str,
    name: str,
    owner_email: str,
    plan: Plan | None = None,
    region: str | None = None,
    require_2fa: bool = False,
) -> ProvisionedTenant:
    """Provision a tenant: row, schema, primary domain ``<slug>.<BASE_DOMAIN>``, owner.

    The owner is the existing user with ``owner_email`` or a new one without a password (who
    sets it through the password-reset link). Everything happens in one transaction, schema
    DDL included, so a failure leaves nothing behind. Audited in the public chain and as the
    first event of the tenant's own chain.

    Raises ``ValidationFailed`` for a bad slug, name, e-mail or region and ``Conflict`` when the
    slug, schema or domain is taken. Works whichever schema the connection was in.
    """
    with schema_context(settings.PUBLIC_SCHEMA_NAME), transaction.atomic():
        return _tenant_create(actor=actor, slug=slug, name=name, owner_email=owner_email, plan=plan,
                              region=region, require_2fa=require_2fa)


def _tenant_create(*, actor: Principal, slug: str, name: str, owner_email: str, plan: Plan | None,
                   region: str | None, require_2fa: bool) -> ProvisionedTenant:
    slug_validate(slug)
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise ValidationFailed("A tenant name is 1-200 characters.", code="invalid_name")
    owner_email = User.objects.normalize_email((owner_email or "").strip()).lower()
    if not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", owner_email) and not owner_email.endswith("@localhost"):
        raise ValidationFailed(f"'{owner_email}' is not an e-mail address.", code="invalid_email")
    region = region or settings.TENANT_REGIONS[0]
    if region not in settings.TENANT_REGIONS:
        raise ValidationFailed(f"Unknown region '{region}'.", code="invalid_region")

    schema = schema_name_for(slug)
    host = f"{slug}.{settings.BASE_DOMAIN}"
    if Tenant.objects.filter(slug=slug).exists() or schema_exists(schema):
        raise Conflict(f"A tenant with slug '{slug}' already exists.", code="slug_taken")
    if Domain.objects.filter(domain=host).exists():
        raise Conflict(f"The host {host} is already routed to another tenant.", code="domain_taken")

    tenant = Tenant(schema_name=schema, slug=slug, name=name, plan=plan, region=region, require_2fa=require_2fa)
    tenant.save()
    Domain.objects.create(domain=host, tenant=tenant, is_primary=True)
    _schema_create(schema)

    owner, owner_created = User.objects.get_or_create(email=owner_email)
    if owner_created:
        owner.set_unusable_password()
        owner.save(update_fields=["password"])
    Membership.objects.create(user=owner, tenant=tenant, role=Role.OWNER)

    details = {"slug": slug, "name": name, "owner": owner_email, "plan": plan.code if plan else None,
               "region": region}
    audit_event_create(actor=actor, action="tenant.created", target_type="tenant", target_id=tenant.pk,
                       payload=details, schema="public")
    audit_event_create(actor=actor, action="tenant.created", target_type="tenant", target_id=tenant.pk,
                       payload=details, schema=schema)
    logger.info("tenant_created", tenant=slug, schema=schema)
    return ProvisionedTenant(tenant=tenant, owner=owner, owner_created=owner_created)


@transaction.atomic
def tenant_suspend(*, actor: Principal, tenant: Tenant, reason: str = "") -> Tenant:
    """Suspend ``tenant``: its console and API answer 403 until resumed. Idempotent (suspending
    a suspended tenant changes nothing and records nothing)."""
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    if tenant.status == Tenant.Status.SUSPENDED:
        return tenant
    tenant.status = Tenant.Status.SUSPENDED
    tenant.suspended_at = timezone.now()
    tenant.suspended_reason = reason[:500]
    tenant.save(update_fields=["status", "suspended_at", "suspended_reason"])
    for schema in ("public", tenant.schema_name):
        audit_event_create(actor=actor, action="tenant.suspended", target_type="tenant", target_id=tenant.pk,
                           payload={"slug": tenant.slug, "reason": reason}, schema=schema)
    return tenant


@transaction.atomic
def tenant_resume(*, actor: Principal, tenant: Tenant) -> Tenant:
    """Resume a suspended tenant. Idempotent."""
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    if tenant.status == Tenant.Status.ACTIVE:
        return tenant
    tenant.status = Tenant.Status.ACTIVE
    tenant.suspended_at = None
    tenant.suspended_reason = ""
    tenant.save(update_fields=["status", "suspended_at", "suspended_reason"])
    for schema in ("public", tenant.schema_name):
        audit_event_create(actor=actor, action="tenant.resumed", target_type="tenant", target_id=tenant.pk,
                           payload={"slug": tenant.slug}, schema=schema)
    return tenant


@transaction.atomic
def tenant_delete(*, actor: Principal, tenant: Tenant, confirm: str) -> None:
    """Delete ``tenant`` for good: drop its schema (every agent, document, chunk, usage and audit
    event in it) and its control-plane rows (domains, memberships, API keys, invitations).

    ``confirm`` must equal the tenant's slug; otherwise ``ValidationFailed`` is raised and
    nothing happens. The deletion is recorded in the public audit chain.
    """
    if tenant.is_public:
        raise ValidationFailed("The public schema cannot be deleted.", code="public_tenant")
    if confirm != tenant.slug:
        raise ValidationFailed(
            f"To delete tenant '{tenant.slug}', confirm by typing its slug exactly.", code="confirmation_required"
        )
    audit_event_create(
        actor=actor, action="tenant.deleted", target_type="tenant", target_id=tenant.pk,
        payload={"slug": tenant.slug, "name": tenant.name, "schema": tenant.schema_name}, schema="public",
    )
    with schema_context("public"):
        tenant.delete(force_drop=True)
    logger.info("tenant_deleted", tenant=tenant.slug)


@transaction.atomic
def tenant_settings_update(*, actor: Principal, tenant: Tenant, require_2fa: bool) -> Tenant:
    """Change the tenant's security settings (owners only: ``tenant:admin``)."""
    actor.require("tenant:admin")
    if tenant.require_2fa == require_2fa:
        return tenant
    tenant.require_2fa = require_2fa
    tenant.save(update_fields=["require_2fa"])
    audit_event_create(actor=actor, action="tenant.settings_changed", target_type="tenant", target_id=tenant.pk,
                       payload={"require_2fa": require_2fa}, schema=tenant.schema_name)
    return tenant


def public_tenant_ensure() -> Tenant:
    """Return the row that routes ``PUBLIC_HOST`` to the public schema, creating it if needed."""
    tenant, _ = Tenant.objects.get_or_create(
        schema_name=settings.PUBLIC_SCHEMA_NAME,
        defaults={"slug": "public", "name": "Platform"},
    )
    return tenant
