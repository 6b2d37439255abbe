"""Creating, suspending, resuming and deleting tenants.

A tenant's schema is created by executing the SQL its migrations consist of, collected once per
process (``tenant_ddl``): the same statements ``migrate`` would run, without Django building a
migration state per tenant, which is what makes ``migrate``-per-tenant slow. (django-tenants'
schema cloning was tried first and rejected: its clone function drops pgvector's dimension
from ``vector(384)`` columns, so the HNSW index cannot be recreated.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import structlog
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.utils import timezone
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


def _tenant_app_labels() -> set[str]:
    return {app.rsplit(".", 1)[-1] for app in settings.TENANT_APPS}


@dataclass(frozen=True)
class TenantDDL:
    """The SQL that migrating an empty tenant schema runs, and the migrations it records."""

    statements: list[str]
    migrations: list[tuple[str, str]]


_ddl: TenantDDL | None = None


def tenant_ddl() -> TenantDDL:
    """Collect, once per process, the SQL of every tenant-app migration from scratch.

    This is Django's own ``collect_sql`` (what ``sqlmigrate`` prints), run with the connection
    in a tenant context so django-tenants' router keeps exactly the operations a tenant schema
    gets. Executing it in a new schema is equivalent to migrating that schema, without
    rendering migration states for every tenant.
    """
    global _ddl
    if _ddl is not None:
        return _ddl
    from django.db.migrations.executor import MigrationExecutor

    previous = connection.schema_name  # type: ignore[attr-defined]  # django-tenants' backend
    try:
        # Any non-public name makes the router apply the tenant rules; nothing is executed.
        connection.set_schema("tenant_ddl_collection", include_public=True)  # type: ignore[attr-defined]
        executor = MigrationExecutor(connection)
        loader = executor.loader
        targets = [key for key in loader.graph.leaf_nodes() if key[0] in _tenant_app_labels()]
        plan = executor.migration_plan(targets, clean_start=True)
        _refuse_python_operations(plan)
        statements = loader.collect_sql(plan)
        # A migrated tenant schema records every migration of every app (shared ones as no-ops).
        migrations = sorted(loader.disk_migrations)
    finally:
        connection.set_schema(previous)  # type: ignore[attr-defined]
    _ddl = TenantDDL(statements=[s for s in statements if s.strip() and not s.lstrip().startswith("--")],
                     migrations=migrations)
    return _ddl


def _refuse_python_operations(plan: list[Any]) -> None:
    """SQL collection cannot run Python: a tenant migration with RunPython would be silently
    skipped for new tenants, so refuse it here (make it idempotent SQL, or seed in a service)."""
    from django.db.migrations.operations import RunPython

    for migration, _backwards in plan:
        if migration.app_label in _tenant_app_labels():
            for operation in migration.operations:
                if isinstance(operation, RunPython):
                    raise ImproperlyConfigured(
                        f"Tenant migration {migration.app_label}.{migration.name} uses RunPython, which tenant "
                        "provisioning cannot replay as SQL. Use RunSQL, or seed data in a service."
                    )


def _schema_create(schema: str) -> None:
    """Create ``schema`` with every tenant table, index and trigger (see ``tenant_ddl``)."""
    ddl = tenant_ddl()
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE SCHEMA "{schema}"')
        cursor.execute(f'SET LOCAL search_path = "{schema}", public')
        for statement in ddl.statements:
            cursor.execute(statement)
        cursor.execute(
            "CREATE TABLE django_migrations (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
            "app varchar(255) NOT NULL, name varchar(255) NOT NULL, applied timestamptz NOT NULL)"
        )
        cursor.executemany(
            "INSERT INTO django_migrations (app, name, applied) VALUES (%s, %s, now())", ddl.migrations
        )
    # Forget the search path set above; django-tenants sets its own on the next query.
    connection.set_schema_to_public()  # type: ignore[attr-defined]


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
