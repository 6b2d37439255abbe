"""Personas and hosts shared by the whole suite.

The world is built once per test session, committed, in the test database: two tenants
(``acme`` = tenant A, ``globex`` = tenant B); owner, admin, operator, viewer and auditor in A; an
outsider who owns B; a staff user; and an all-scopes API key in each tenant. Each test then
runs in a transaction that is rolled back, so tests may change anything without affecting
others. Tests that need commits (concurrency, live servers) create their own rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from tenants.models import ApiKey, Tenant, User
from tenants.principal import Principal
from tenants.roles import PERMISSIONS, Role
from tests.factories import member_add

PASSWORD = "correct horse battery staple"
HOST_A = "acme.localhost"
HOST_B = "globex.localhost"


@dataclasses.dataclass
class World:
    tenant_a: Tenant
    tenant_b: Tenant
    users: dict[str, User]
    key_a: str
    key_b: str

    def user(self, persona: str) -> User:
        return self.users[persona]


def _build_world() -> World:
    from tenants.services.keys import api_key_create
    from tenants.services.provisioning import tenant_create

    system = Principal.system("tests")
    a = tenant_create(actor=system, slug="acme", name="Acme Corp", owner_email="owner@acme.test").tenant
    b = tenant_create(actor=system, slug="globex", name="Globex", owner_email="outsider@globex.test").tenant
    users: dict[str, User] = {}
    for persona in ("owner", "outsider"):
        email = "owner@acme.test" if persona == "owner" else "outsider@globex.test"
        user = User.objects.get(email=email)
        user.set_password(PASSWORD)
        user.name = persona.title()
        user.save()
        users[persona] = user
    for role in (Role.ADMIN, Role.OPERATOR, Role.VIEWER, Role.AUDITOR):
        users[str(role)] = member_add(tenant=a, email=f"{role}@acme.test", role=role, password=PASSWORD).user
    staff = User.objects.create_user(email="staff@platform.test", password=PASSWORD, is_staff=True,
                                     is_superuser=True, name="Staff")
    users["staff"] = staff
    key_a = api_key_create(principal=Principal.system("tests", tenant=a), tenant=a, name="acme all",
                           scopes=list(PERMISSIONS)).secret
    key_b = api_key_create(principal=Principal.system("tests", tenant=b), tenant=b, name="globex all",
                           scopes=list(PERMISSIONS)).secret
    connection.set_schema_to_public()
    return World(tenant_a=a, tenant_b=b, users=users, key_a=key_a, key_b=key_b)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: Any, django_db_blocker: Any) -> Iterator[World]:
    with django_db_blocker.unblock():
        world = _build_world()
    yield world


@pytest.fixture
def world(django_db_setup: World, db: Any) -> World:
    """The personas, inside this test's rolled-back transaction."""
    # Reload rows so a test's changes to them never leak through shared Python objects.
    return dataclasses.replace(
        django_db_setup,
        tenant_a=Tenant.objects.get(pk=django_db_setup.tenant_a.pk),
        tenant_b=Tenant.objects.get(pk=django_db_setup.tenant_b.pk),
        users={k: User.objects.get(pk=u.pk) for k, u in django_db_setup.users.items()},
    )


@pytest.fixture(autouse=True)
def _public_schema_after_test() -> Iterator[None]:
    """Requests switch the shared connection into a tenant's schema; switch back after."""
    yield
    connection.set_schema_to_public()


def host_client(host: str, user: User | None = None, *, enforce_csrf: bool = False) -> Client:
    """A test client whose requests go to ``host``, signed in as ``user`` if given."""
    client = Client(HTTP_HOST=host, enforce_csrf_checks=enforce_csrf)
    if user is not None:
        client.force_login(user)
    connection.set_schema_to_public()
    return client


def verified_staff_client(world: World) -> Client:
    """A client on the public host signed in as the staff persona with a verified TOTP device
    (what the OTP-protected admin site asks for)."""
    from django_otp.plugins.otp_totp.models import TOTPDevice

    staff = world.user("staff")
    device = TOTPDevice.objects.create(user=staff, name="t", confirmed=True)
    client = host_client("localhost", staff)
    session = client.session
    session["otp_device_id"] = device.persistent_id
    session.save()
    return client


def api_client(host: str, key: str | None) -> Client:
    """A test client sending ``Authorization: Bearer <key>`` to ``host``."""
    headers = {"HTTP_HOST": host}
    if key is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return Client(**headers)


@pytest.fixture
def client_a(world: World) -> Any:
    """``client_a("viewer")`` is a console client on tenant A's host signed in as that persona."""
    return lambda persona=None: host_client(HOST_A, world.user(persona) if persona else None)


@pytest.fixture
def api_a(world: World) -> Client:
    """An all-scopes API client on tenant A's host."""
    return api_client(HOST_A, world.key_a)


def active_key_count(tenant: Tenant) -> int:
    return ApiKey.objects.filter(tenant=tenant, revoked_at__isnull=True).count()


# Live servers and workers (daphne, Celery, RQ, the scripted model server), shared by the browser
# and chat tests, and the hook that runs their tests last.
from tests.live import (  # noqa: E402
    celery_metrics_port,
    celery_worker,
    ingest_worker,
    portal,
    pytest_collection_modifyitems,
    scripted_llm,
)

__all__ = ["celery_metrics_port", "celery_worker", "ingest_worker", "portal", "pytest_collection_modifyitems",
           "scripted_llm"]
