"""GET /api/v1/me with each kind of credential."""

from __future__ import annotations

from tests.conftest import HOST_A, World, api_client, host_client


def test_it_returns_the_tenant_and_the_keys_scopes(world: World) -> None:
    response = api_client(HOST_A, world.key_a).get("/api/v1/me")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["tenant"]["slug"] == "acme"
    assert body["principal"]["type"] == "api_key"
    assert body["role"] is None
    assert "members:write" in body["permissions"]


def test_it_returns_the_members_role_for_a_session(world: World) -> None:
    response = host_client(HOST_A, world.user("viewer")).get("/api/v1/me")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["principal"] == {"type": "user", "id": str(world.user("viewer").pk), "label": "viewer@acme.test"}
    assert body["role"] == "viewer"
    assert "members:write" not in body["permissions"]


def test_it_rejects_other_tenants_key(world: World) -> None:
    response = api_client(HOST_A, world.key_b).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "acme" not in response.content.decode()
