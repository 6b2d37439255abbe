"""demo_seed's part of the tools demo: the staff egress rule for exactly the ticket service, the
ticket tools, the ``it-helpdesk`` agent, an approver, and a demo key holding today's scopes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jsonschema
import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from config.egress import EgressDenied, egress_check_url
from tenants.models import ApiKey, EgressAllowRule, Membership, Tenant, User
from tenants.roles import PERMISSIONS
from tests.conftest import World, api_client


def _seed(var: Path) -> dict[str, str]:
    with override_settings(VAR_DIR=var):
        call_command("demo_seed", stdout=io.StringIO())
    return json.loads((var / "demo-credentials").read_text())


def test_demo_seed_adds_the_ticket_tools_agent_approver_and_egress_rule_once(world: World, tmp_path: Path) -> None:
    from agents.models import Agent, Tool
    from knowledge.models import Collection

    first = _seed(tmp_path)
    second = _seed(tmp_path)
    assert first == second
    port = settings.DEMO_TICKETS_PORT

    # Exactly the ticket service's address is opened, once, and the staff change is audited.
    assert list(EgressAllowRule.objects.values_list("target", "port", "enabled")) == [("127.0.0.1", port, True)]
    with schema_context("public"):
        created = AuditEvent.objects.filter(action="egress_allow_rule.created")
        assert created.count() == 1
        assert created.get().payload["port"] == port
    assert egress_check_url(f"http://127.0.0.1:{port}/tickets").port == port
    with pytest.raises(EgressDenied):
        egress_check_url(f"http://127.0.0.1:{port + 1}/tickets")
    with pytest.raises(EgressDenied):
        egress_check_url(f"http://127.0.0.2:{port}/tickets")

    tenant = Tenant.objects.get(slug="demo")
    with schema_context(tenant.schema_name):
        tools = {t.name: t for t in Tool.objects.filter(name__in=["list_tickets", "create_ticket"])}
        assert set(tools) == {"list_tickets", "create_ticket"}
        listing, creating = tools["list_tickets"], tools["create_ticket"]
        assert (listing.kind, listing.method, listing.side_effect, listing.requires_approval) == (
            "http",
            "GET",
            "read",
            False,
        )
        assert (creating.kind, creating.method, creating.side_effect, creating.requires_approval) == (
            "http",
            "POST",
            "write",
            True,
        )
        assert listing.url == creating.url == f"http://127.0.0.1:{port}/tickets"
        for tool in tools.values():
            jsonschema.Draft202012Validator.check_schema(tool.parameters)
        jsonschema.validate(
            {"title": "Laptop screen", "description": "It is broken.", "priority": "high"}, creating.parameters
        )
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(
                {"title": "Laptop screen", "description": "", "priority": "urgent"}, creating.parameters
            )
        assert AuditEvent.objects.filter(action="tool.created").count() == 2

        agent = Agent.objects.get(slug="it-helpdesk")
        assert agent.status == Agent.Status.ACTIVE
        version = agent.active_version
        assert version is not None
        assert version.tools == ["list_tickets", "create_ticket", "kb_search"]
        assert version.tool_choice == "create_ticket"
        assert version.collection_ids == [Collection.objects.get(name="Handbook").pk]
        assert Tool.objects.filter(name__in=version.tools).count() == 3

    approver = User.objects.get(email=first["approver_email"])
    assert approver.check_password(first["approver_password"])
    assert Membership.objects.get(tenant=tenant, user=approver).role == "approver"
    assert first["approvals_url"].endswith("/approvals/")
    assert first["tickets_url"] == f"http://127.0.0.1:{port}/tickets"


def test_the_demo_key_holds_every_scope_and_an_older_narrower_key_is_replaced(world: World, tmp_path: Path) -> None:
    _seed(tmp_path)
    key = (tmp_path / "demo-api-key").read_text().strip()
    row = ApiKey.objects.get(tenant__slug="demo", revoked_at__isnull=True)
    assert set(row.scopes) == set(PERMISSIONS)
    assert {"tools:read", "tools:write", "approvals:read", "approvals:decide"} <= set(row.scopes)

    # A key made before tools and approvals existed.
    ApiKey.objects.filter(pk=row.pk).update(
        scopes=[s for s in row.scopes if not s.startswith(("tools:", "approvals:"))]
    )
    _seed(tmp_path)
    new_key = (tmp_path / "demo-api-key").read_text().strip()
    assert new_key != key
    row.refresh_from_db()
    assert row.revoked_at is not None
    current = ApiKey.objects.get(tenant__slug="demo", revoked_at__isnull=True)
    assert set(current.scopes) == set(PERMISSIONS)
    assert api_client("demo.localhost", new_key).get("/api/v1/me").status_code == 200
    assert api_client("demo.localhost", key).get("/api/v1/me").status_code == 401
