"""The agents REST API: create, read, change, versions, publish and rollback, status, permissions,
validation and query counts (Django test client, no live processes)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from agents.models import Agent
from compliance.models import AuditEvent
from knowledge.models import Collection
from knowledge.services import collection_create
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client

pytestmark = pytest.mark.django_db


def _agent(client: Client, slug: str = "helpdesk", **extra: Any) -> dict[str, Any]:
    response = client.post("/api/v1/agents", {"slug": slug, "name": slug.title(), **extra},
                           content_type="application/json")
    assert response.status_code == 201, response.content
    return response.json()  # type: ignore[no-any-return]


def _post(client: Client, path: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(path, body or {}, content_type="application/json")


def _key(world: World, scopes: list[str]) -> str:
    """A committed-in-this-test API key of tenant A holding exactly ``scopes``."""
    key = api_key_create(principal=Principal.system("tests", tenant=world.tenant_a), tenant=world.tenant_a,
                         name="scoped", scopes=scopes).secret
    connection.set_schema_to_public()
    return key


def test_an_agent_is_created_read_listed_and_renamed(world: World, api_a: Client) -> None:
    created = _agent(api_a, description="First line", config={"system_prompt": "Be brief.", "temperature": 0.7})
    assert created["status"] == "draft" and created["active_version_number"] is None
    assert created["slug"] == "helpdesk" and created["description"] == "First line"
    fetched = api_a.get(f"/api/v1/agents/{created['id']}").json()
    assert fetched == created
    listed = api_a.get("/api/v1/agents").json()
    assert [a["slug"] for a in listed["items"]] == ["helpdesk"] and listed["next_cursor"] is None
    renamed = api_a.patch(f"/api/v1/agents/{created['id']}", {"name": "Help desk", "description": ""},
                          content_type="application/json")
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "Help desk" and renamed.json()["description"] == ""
    version = api_a.get(f"/api/v1/agents/{created['id']}/versions/1").json()
    assert version["system_prompt"] == "Be brief." and version["temperature"] == 0.7
    assert version["tier"] == "standard" and version["is_active"] is False


def test_an_unknown_agent_is_not_found(world: World, api_a: Client) -> None:
    response = api_a.get("/api/v1/agents/999999")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_versions_are_created_from_the_latest_and_published_and_rolled_back(world: World, api_a: Client) -> None:
    agent = _agent(api_a, config={"system_prompt": "Version one."})
    second = _post(api_a, f"/api/v1/agents/{agent['id']}/versions",
                   {"config": {"temperature": 1.1}, "note": "warmer"})
    assert second.status_code == 201, second.content
    v2 = second.json()
    assert v2["number"] == 2 and v2["system_prompt"] == "Version one." and v2["temperature"] == 1.1
    assert v2["note"] == "warmer" and v2["is_active"] is False
    listed = api_a.get(f"/api/v1/agents/{agent['id']}/versions").json()["items"]
    assert [v["number"] for v in listed] == [2, 1]

    published = _post(api_a, f"/api/v1/agents/{agent['id']}/versions/2/publish")
    assert published.status_code == 200
    assert published.json()["status"] == "active" and published.json()["active_version_number"] == 2
    rolled_back = _post(api_a, f"/api/v1/agents/{agent['id']}/versions/1/publish").json()
    assert rolled_back["active_version_number"] == 1
    again = _post(api_a, f"/api/v1/agents/{agent['id']}/versions/1/publish")  # idempotent
    assert again.status_code == 200 and again.json()["active_version_number"] == 1
    assert api_a.get(f"/api/v1/agents/{agent['id']}/versions/1").json()["is_active"] is True
    with schema_context(world.tenant_a.schema_name):
        actions = list(AuditEvent.objects.filter(target_type="agent", target_id=str(agent["id"]))
                       .order_by("pk").values_list("action", flat=True))
    assert actions == ["agent.created", "agent_version.created", "agent.published", "agent.rolled_back"]
    assert api_a.get(f"/api/v1/agents/{agent['id']}/versions/9").status_code == 404
    assert _post(api_a, f"/api/v1/agents/{agent['id']}/versions/9/publish").status_code == 404


def test_status_follows_its_transitions(world: World, api_a: Client) -> None:
    agent = _agent(api_a)
    status = f"/api/v1/agents/{agent['id']}/status"
    refused = _post(api_a, status, {"status": "paused"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "invalid_transition"
    assert _post(api_a, status, {"status": "sleeping"}).json()["error"]["code"] == "invalid_status"
    _post(api_a, f"/api/v1/agents/{agent['id']}/versions/1/publish")
    assert _post(api_a, status, {"status": "paused"}).json()["status"] == "paused"
    assert _post(api_a, status, {"status": "active"}).json()["status"] == "active"
    assert _post(api_a, status, {"status": "active"}).status_code == 200  # setting the current status: no-op
    assert _post(api_a, status, {"status": "retired"}).json()["status"] == "retired"
    final = _post(api_a, status, {"status": "active"})
    assert final.status_code == 409
    no_version = _post(api_a, f"/api/v1/agents/{agent['id']}/versions", {"config": {}})
    assert no_version.status_code == 409 and no_version.json()["error"]["code"] == "agent_retired"


def test_a_read_only_key_reads_but_cannot_write(world: World, api_a: Client) -> None:
    agent = _agent(api_a)
    reader = api_client(HOST_A, _key(world, ["agents:read"]))
    assert reader.get("/api/v1/agents").status_code == 200
    assert reader.get(f"/api/v1/agents/{agent['id']}/versions").status_code == 200
    writes = [
        _post(reader, "/api/v1/agents", {"slug": "nope", "name": "Nope"}),
        reader.patch(f"/api/v1/agents/{agent['id']}", {"name": "x"}, content_type="application/json"),
        _post(reader, f"/api/v1/agents/{agent['id']}/versions", {"config": {}}),
        _post(reader, f"/api/v1/agents/{agent['id']}/versions/1/publish"),
        _post(reader, f"/api/v1/agents/{agent['id']}/status", {"status": "retired"}),
    ]
    assert [r.status_code for r in writes] == [403] * 5
    assert {r.json()["error"]["code"] for r in writes} == {"permission_denied"}
    no_scope = api_client(HOST_A, _key(world, ["chat"]))
    assert no_scope.get("/api/v1/agents").status_code == 403


def test_a_viewer_member_reads_and_an_operator_writes(world: World, api_a: Client) -> None:
    viewer = host_client(HOST_A, world.user("viewer"))
    assert viewer.get("/api/v1/agents").status_code == 200
    assert _post(viewer, "/api/v1/agents", {"slug": "v", "name": "V"}).status_code == 403
    operator = host_client(HOST_A, world.user("operator"))
    assert _agent(operator, slug="ops")["slug"] == "ops"


def test_tenant_b_cannot_reach_tenant_a_agents(world: World, api_a: Client) -> None:
    agent = _agent(api_a)
    b_on_a = api_client(HOST_A, world.key_b)
    for response in (b_on_a.get("/api/v1/agents"), b_on_a.get(f"/api/v1/agents/{agent['id']}"),
                     _post(b_on_a, "/api/v1/agents", {"slug": "x", "name": "X"}),
                     _post(b_on_a, f"/api/v1/agents/{agent['id']}/versions/1/publish")):
        assert response.status_code == 401
    outsider = host_client(HOST_A, world.user("outsider"))
    assert outsider.get("/api/v1/agents").status_code == 403
    b_home = api_client(HOST_B, world.key_b)
    assert b_home.get("/api/v1/agents").json()["items"] == []
    assert b_home.get(f"/api/v1/agents/{agent['id']}").status_code == 404


@pytest.mark.parametrize(("body", "code"), [
    ({"slug": "Bad Slug!", "name": "x"}, "invalid_slug"),
    ({"slug": "-edge", "name": "x"}, "invalid_slug"),
    ({"slug": "ok", "name": "  "}, "invalid_name"),
    ({"slug": "ok", "name": "x", "config": {"system_prompt": " "}}, "invalid_version"),
    ({"slug": "ok", "name": "x", "config": {"temperature": 3}}, "invalid_version"),
    ({"slug": "ok", "name": "x", "config": {"tier": "gigantic"}}, "invalid_version"),
    ({"slug": "ok", "name": "x", "config": {"output_format": "json_schema", "output_schema": {"type": 12}}},
     "invalid_version"),
    ({"slug": "ok", "name": "x", "config": {"output_format": "json_schema"}}, "invalid_version"),
    ({"slug": "ok", "name": "x", "config": {"colour": "blue"}}, "validation_failed"),
    ({"slug": "ok", "name": "x", "config": {"temperature": "warm"}}, "validation_failed"),
])
def test_bad_agents_are_rejected(world: World, api_a: Client, body: dict[str, Any], code: str) -> None:
    response = _post(api_a, "/api/v1/agents", body)
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == code
    assert api_a.get("/api/v1/agents").json()["items"] == []


def test_a_duplicate_slug_conflicts(world: World, api_a: Client) -> None:
    _agent(api_a)
    response = _post(api_a, "/api/v1/agents", {"slug": "helpdesk", "name": "Again"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "duplicate_slug"


def test_another_tenants_collection_cannot_be_attached(world: World, api_a: Client) -> None:
    with schema_context(world.tenant_b.schema_name):
        foreign = collection_create(principal=Principal.system("t", tenant=world.tenant_b), name="globex secrets")
    with schema_context(world.tenant_a.schema_name):
        assert not Collection.objects.filter(pk=foreign.pk).exists()
    response = _post(api_a, "/api/v1/agents", {"slug": "ok", "name": "x", "config": {"collection_ids": [foreign.pk]}})
    assert response.status_code == 422
    assert response.json()["error"]["details"] == {"field": "collection_ids", "missing": [foreign.pk]}
    with schema_context(world.tenant_a.schema_name):
        own = collection_create(principal=Principal.system("t", tenant=world.tenant_a), name="acme docs")
    connection.set_schema_to_public()
    attached = _agent(api_a, slug="ok", config={"collection_ids": [own.pk], "retrieval_top_k": 3})
    assert api_a.get(f"/api/v1/agents/{attached['id']}/versions/1").json()["collection_ids"] == [own.pk]


def test_a_versions_chunks_per_document_cap_is_bounded_kept_and_cleared(world: World, api_a: Client) -> None:
    agent = _agent(api_a, slug="capped", config={"retrieval_max_chunks_per_document": 2})
    assert api_a.get(f"/api/v1/agents/{agent['id']}/versions/1").json()["retrieval_max_chunks_per_document"] == 2
    for bad in (0, 51, "two"):
        response = _post(api_a, f"/api/v1/agents/{agent['id']}/versions",
                         {"config": {"retrieval_max_chunks_per_document": bad}})
        assert response.status_code == 422, (bad, response.json())
        if bad != "two":  # a string is the schema's refusal, before the service's bounds
            assert response.json()["error"]["details"] == {"field": "retrieval_max_chunks_per_document"}
    # A new version keeps the cap unless the request names it; null lifts it.
    kept = _post(api_a, f"/api/v1/agents/{agent['id']}/versions", {"config": {"temperature": 0.5}}).json()
    assert kept["retrieval_max_chunks_per_document"] == 2
    lifted = _post(api_a, f"/api/v1/agents/{agent['id']}/versions",
                   {"config": {"retrieval_max_chunks_per_document": None}}).json()
    assert lifted["retrieval_max_chunks_per_document"] is None
    fresh = _agent(api_a, slug="uncapped")
    assert api_a.get(f"/api/v1/agents/{fresh['id']}/versions/1").json()["retrieval_max_chunks_per_document"] is None


def test_agents_are_paged_by_cursor(world: World, api_a: Client) -> None:
    for n in range(5):
        _agent(api_a, slug=f"agent-{n}")
    first = api_a.get("/api/v1/agents?limit=2").json()
    second = api_a.get(f"/api/v1/agents?limit=2&cursor={first['next_cursor']}").json()
    third = api_a.get(f"/api/v1/agents?limit=2&cursor={second['next_cursor']}").json()
    slugs = [a["slug"] for page in (first, second, third) for a in page["items"]]
    assert slugs == [f"agent-{n}" for n in range(5)] and third["next_cursor"] is None
    assert api_a.get("/api/v1/agents?cursor=garbage").json()["error"]["code"] == "invalid_cursor"
    assert api_a.get("/api/v1/agents?limit=0").json()["error"]["code"] == "invalid_limit"


def test_list_endpoints_do_not_grow_their_query_count(world: World, api_a: Client,
                                                      django_assert_max_num_queries: Any) -> None:
    agent = _agent(api_a, slug="agent-0")
    _post(api_a, f"/api/v1/agents/{agent['id']}/versions/1/publish")
    with django_assert_max_num_queries(12) as few:
        api_a.get("/api/v1/agents")
    agents_baseline = len(few.captured_queries)  # read now: each request clears Django's query log
    with django_assert_max_num_queries(12) as few:
        api_a.get(f"/api/v1/agents/{agent['id']}/versions")
    versions_baseline = len(few.captured_queries)
    for n in range(1, 12):
        created = _agent(api_a, slug=f"agent-{n}")
        _post(api_a, f"/api/v1/agents/{created['id']}/versions/1/publish")
        _post(api_a, f"/api/v1/agents/{agent['id']}/versions", {"config": {"temperature": n / 10}})
    with django_assert_max_num_queries(agents_baseline):
        assert len(api_a.get("/api/v1/agents").json()["items"]) == 12
    with django_assert_max_num_queries(versions_baseline):
        assert len(api_a.get(f"/api/v1/agents/{agent['id']}/versions").json()["items"]) == 12


def test_a_write_only_key_is_refused_before_an_agent_is_created(world: World) -> None:
    """The answer is the agent read back, which needs ``agents:read``: the refusal must come before
    the write (it used to come after it, leaving a 403 and a new agent)."""
    writer = api_client(HOST_A, _key(world, ["agents:write"]))
    response = _post(writer, "/api/v1/agents", {"slug": "ghost", "name": "Ghost"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    with schema_context(world.tenant_a.schema_name):
        assert not Agent.objects.filter(slug="ghost").exists()
        assert not AuditEvent.objects.filter(action="agent.created", payload__slug="ghost").exists()
