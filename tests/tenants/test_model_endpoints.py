"""Model endpoints: encrypted keys at rest, key rotation, staff admin, tenant API and console."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.checks import run_checks
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client, override_settings
from django_tenants.utils import schema_context

from agents.endpoints import model_endpoint_create
from compliance.models import AuditEvent
from config.crypto import SecretUnreadable, secret_decrypt, secret_encrypt
from tenants.models import ModelEndpoint
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client, verified_staff_client

SECRET = "sk-test-PLAINTEXT-never-shown-0123456789"
OTHER_SECRET = "sk-test-REPLACEMENT-key-9876543210"
KEY_OLD = Fernet.generate_key().decode()
KEY_NEW = Fernet.generate_key().decode()


def _body(**overrides: Any) -> dict[str, Any]:
    return {"name": "own gpt", "model": "openai/gpt-4o-mini", "api_base": "https://llm.example.test/v1",
            "api_key": SECRET, "tier": "standard", "priority": 10, "context_window": 16384,
            "input_price_per_mtok": "0.15", "output_price_per_mtok": "0.6", **overrides}


def _raw_column(pk: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key_encrypted FROM public.tenants_modelendpoint WHERE id = %s", [pk])
        return str(cursor.fetchone()[0])


def _own_endpoint(world: World, name: str = "acme private", api_key: str = SECRET,
                  tenant: Any = None) -> ModelEndpoint:
    tenant = tenant or world.tenant_a
    with schema_context(tenant.schema_name):
        endpoint = model_endpoint_create(principal=Principal.system("tests", tenant=tenant), name=name,
                                         model="openai/own-model", api_base="http://own.example.test/v1",
                                         api_key=api_key)
    connection.set_schema_to_public()  # type: ignore[attr-defined]
    return endpoint


def _platform_endpoint(name: str = "platform standard", api_key: str = SECRET) -> ModelEndpoint:
    return ModelEndpoint.objects.create(name=name, model="hosted_vllm/Qwen/Qwen2.5-7B-Instruct",
                                        api_base="http://vllm.internal:8000/v1",
                                        api_key_encrypted=secret_encrypt(api_key))


def _audit_payloads(schema: str) -> str:
    with schema_context(schema):
        payloads = list(AuditEvent.objects.filter(target_type="model_endpoint").values_list("payload", flat=True))
    connection.set_schema_to_public()  # type: ignore[attr-defined]
    return json.dumps(payloads)


def _scoped_client(world: World, scopes: list[str]) -> Client:
    tenant = world.tenant_a
    key = api_key_create(principal=Principal.system("tests", tenant=tenant), tenant=tenant, name="scoped",
                         scopes=scopes).secret
    connection.set_schema_to_public()  # type: ignore[attr-defined]
    return api_client(HOST_A, key)


# --- Encryption at rest and rotation ------------------------------------------------------


def test_the_key_is_stored_only_encrypted_and_decrypts_back(world: World) -> None:
    endpoint = _own_endpoint(world)
    raw = _raw_column(endpoint.pk)
    assert raw and SECRET not in raw and "PLAINTEXT" not in raw
    assert ModelEndpoint.objects.get(pk=endpoint.pk).api_key() == SECRET


def test_rotation_moves_secrets_to_the_new_key_so_the_old_key_can_go(world: World) -> None:
    with override_settings(FIELD_ENCRYPTION_KEYS=[KEY_OLD]):
        endpoint = _own_endpoint(world)
        platform = _platform_endpoint()
        before = _raw_column(endpoint.pk)
    with override_settings(FIELD_ENCRYPTION_KEYS=[KEY_NEW, KEY_OLD]):
        call_command("field_keys_rotate", stdout=(out := io.StringIO()))
        assert "2 model endpoint key(s) re-encrypted, 0 unreadable" in out.getvalue()
    assert _raw_column(endpoint.pk) != before
    with override_settings(FIELD_ENCRYPTION_KEYS=[KEY_NEW]):
        assert ModelEndpoint.objects.get(pk=endpoint.pk).api_key() == SECRET
        assert ModelEndpoint.objects.get(pk=platform.pk).api_key() == SECRET
    with override_settings(FIELD_ENCRYPTION_KEYS=[KEY_OLD]), pytest.raises(SecretUnreadable):
        secret_decrypt(_raw_column(endpoint.pk))
    assert AuditEvent.objects.filter(action="field_keys.rotated").exists()


def test_rotation_fails_loudly_naming_endpoints_no_key_can_read(world: World) -> None:
    with override_settings(FIELD_ENCRYPTION_KEYS=[KEY_OLD]):
        lost = _platform_endpoint(name="under a lost key")
    with override_settings(FIELD_ENCRYPTION_KEYS=[KEY_NEW]):
        readable = _platform_endpoint(name="readable")
        with pytest.raises(CommandError) as failure:
            call_command("field_keys_rotate", stdout=io.StringIO())
    assert failure.value.returncode == 1
    assert str(lost.pk) in str(failure.value) and str(readable.pk) not in str(failure.value).split("endpoint(s)")[1]


# --- System checks ------------------------------------------------------------------------


def test_production_requires_field_encryption_keys(world: World) -> None:
    with override_settings(DEVELOPMENT=False, FIELD_ENCRYPTION_KEYS=[]):
        ids = {message.id for message in run_checks()}
    assert "portal.E006" in ids
    with override_settings(DEVELOPMENT=False, FIELD_ENCRYPTION_KEYS=[KEY_NEW]):
        ids = {message.id for message in run_checks()}
    assert "portal.E006" not in ids and "portal.E007" not in ids


def test_a_malformed_field_encryption_key_is_an_error(world: World) -> None:
    with override_settings(FIELD_ENCRYPTION_KEYS=["not-a-fernet-key"]):
        messages = [m for m in run_checks() if m.id == "portal.E007"]
    assert messages and "not-a-fernet-key" not in messages[0].msg


# --- Staff admin --------------------------------------------------------------------------


def _admin_form(**overrides: Any) -> dict[str, Any]:
    return {"name": "platform light", "model": "openai/gpt-4o-mini", "api_base": "https://api.openai.com/v1",
            "api_key": SECRET, "tier": "light", "priority": "5", "context_window": "128000",
            "input_price_per_mtok": "0.15", "output_price_per_mtok": "0.60", "currency": "USD",
            "timeout_seconds": "30", "enabled": "on", **overrides}


def test_staff_create_and_edit_a_platform_endpoint_without_the_key_ever_shown(world: World) -> None:
    client = verified_staff_client(world)
    add = client.get("/admin/tenants/modelendpoint/add/")
    assert add.status_code == 200 and b'type="password"' in add.content
    assert client.post("/admin/tenants/modelendpoint/add/", _admin_form()).status_code == 302
    endpoint = ModelEndpoint.objects.get(name="platform light")
    assert endpoint.tenant_id is None and endpoint.api_key() == SECRET and SECRET not in _raw_column(endpoint.pk)

    change_url = f"/admin/tenants/modelendpoint/{endpoint.pk}/change/"
    pages = [client.get("/admin/"), client.get("/admin/tenants/modelendpoint/"), client.get(change_url)]
    # A blank key keeps the stored one.
    assert client.post(change_url, _admin_form(api_key="", priority="7")).status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.priority == 7 and endpoint.api_key() == SECRET
    # A new key replaces it; "clear key" removes it.
    assert client.post(change_url, _admin_form(api_key=OTHER_SECRET)).status_code == 302
    assert ModelEndpoint.objects.get(pk=endpoint.pk).api_key() == OTHER_SECRET
    assert client.post(change_url, _admin_form(api_key="", clear_api_key="on")).status_code == 302
    assert not ModelEndpoint.objects.get(pk=endpoint.pk).has_api_key
    pages += [client.get(change_url), client.get("/admin/compliance/auditevent/")]
    for page in pages:
        assert page.status_code == 200
        html = page.content.decode()
        assert SECRET not in html and OTHER_SECRET not in html

    events = list(AuditEvent.objects.filter(target_type="model_endpoint", target_id=str(endpoint.pk))
                  .order_by("seq").values_list("action", "payload"))
    assert [a for a, _ in events] == ["model_endpoint.created"] + ["model_endpoint.changed"] * 3
    assert [p.get("key") for _, p in events] == ["set", None, "set", "cleared"]
    assert events[1][1]["priority"] == "7"
    payloads = _audit_payloads("public")
    assert SECRET not in payloads and OTHER_SECRET not in payloads and "gAAAA" not in payloads


@pytest.mark.parametrize(("field", "value"), [
    ("api_base", "ftp://files.example.test/"), ("api_base", "javascript:alert(1)"),
    ("input_price_per_mtok", "-1"), ("output_price_per_mtok", "-0.01"), ("context_window", "255"),
])
def test_the_admin_rejects_invalid_values(world: World, field: str, value: str) -> None:
    response = verified_staff_client(world).post("/admin/tenants/modelendpoint/add/", _admin_form(**{field: value}))
    assert response.status_code == 200 and b"errorlist" in response.content
    assert not ModelEndpoint.objects.filter(name="platform light").exists()


def test_staff_see_tenants_own_endpoints_read_only(world: World) -> None:
    endpoint = _own_endpoint(world)
    client = verified_staff_client(world)
    listing = client.get("/admin/tenants/modelendpoint/")
    assert listing.status_code == 200 and b"acme private" in listing.content and b">acme<" in listing.content
    page = client.get(f"/admin/tenants/modelendpoint/{endpoint.pk}/change/")
    assert page.status_code == 200 and b'name="model"' not in page.content and SECRET.encode() not in page.content
    client.post(f"/admin/tenants/modelendpoint/{endpoint.pk}/change/", _admin_form(name="hijacked"))
    assert ModelEndpoint.objects.get(pk=endpoint.pk).name == "acme private"
    assert client.post(f"/admin/tenants/modelendpoint/{endpoint.pk}/delete/", {"post": "yes"}).status_code == 403


# --- Tenant REST API ----------------------------------------------------------------------


def test_a_tenant_creates_reads_changes_and_deletes_its_own_endpoint(world: World, api_a: Client) -> None:
    created = api_a.post("/api/v1/model-endpoints", _body(), content_type="application/json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["scope"] == "tenant" and body["has_api_key"] is True and "api_key" not in body
    endpoint = ModelEndpoint.objects.get(pk=body["id"])
    assert endpoint.tenant_id == world.tenant_a.pk and endpoint.api_key() == SECRET

    url = f"/api/v1/model-endpoints/{endpoint.pk}"
    assert api_a.get(url).json()["name"] == "own gpt"
    changed = api_a.patch(url, {"priority": 3, "enabled": False}, content_type="application/json")
    assert changed.status_code == 200 and changed.json()["priority"] == 3 and changed.json()["has_api_key"]
    assert ModelEndpoint.objects.get(pk=endpoint.pk).api_key() == SECRET
    rekeyed = api_a.patch(url, {"api_key": OTHER_SECRET}, content_type="application/json")
    assert rekeyed.status_code == 200 and ModelEndpoint.objects.get(pk=endpoint.pk).api_key() == OTHER_SECRET
    cleared = api_a.patch(url, {"clear_api_key": True}, content_type="application/json")
    assert cleared.json()["has_api_key"] is False
    assert api_a.delete(url).status_code == 204
    assert not ModelEndpoint.objects.filter(pk=endpoint.pk).exists()

    for response in (created, changed, rekeyed, cleared):
        assert SECRET not in response.content.decode() and OTHER_SECRET not in response.content.decode()
    with schema_context(world.tenant_a.schema_name):
        actions = set(AuditEvent.objects.filter(target_id=str(endpoint.pk), target_type="model_endpoint")
                      .values_list("action", flat=True))
    connection.set_schema_to_public()  # type: ignore[attr-defined]
    assert actions == {"model_endpoint.created", "model_endpoint.changed", "model_endpoint.deleted"}
    payloads = _audit_payloads(world.tenant_a.schema_name)
    assert SECRET not in payloads and OTHER_SECRET not in payloads and '"key": "cleared"' in payloads


def test_names_are_unique_per_tenant(world: World, api_a: Client) -> None:
    assert api_a.post("/api/v1/model-endpoints", _body(), content_type="application/json").status_code == 201
    again = api_a.post("/api/v1/model-endpoints", _body(), content_type="application/json")
    assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_name"
    # Another tenant may use the same name.
    other = api_client(HOST_B, world.key_b).post("/api/v1/model-endpoints", _body(), content_type="application/json")
    assert other.status_code == 201


def test_the_list_shows_own_and_platform_endpoints_without_secrets(world: World, api_a: Client) -> None:
    own = _own_endpoint(world)
    platform = _platform_endpoint()
    foreign = _own_endpoint(world, name="globex private", tenant=world.tenant_b)
    body = api_a.get("/api/v1/model-endpoints").json()
    by_id = {item["id"]: item for item in body["items"]}
    assert by_id[own.pk]["scope"] == "tenant" and by_id[own.pk]["api_base"] == "http://own.example.test/v1"
    assert by_id[platform.pk]["scope"] == "platform" and by_id[platform.pk]["api_base"] is None
    assert foreign.pk not in by_id
    assert SECRET not in json.dumps(body) and "gAAAA" not in json.dumps(body)
    only_own = api_a.get("/api/v1/model-endpoints?include_platform=false").json()["items"]
    assert [item["id"] for item in only_own] == [own.pk]


def test_it_hides_other_tenants_endpoints_behind_404(world: World) -> None:
    endpoint = _own_endpoint(world)
    outsider = api_client(HOST_B, world.key_b)
    url = f"/api/v1/model-endpoints/{endpoint.pk}"
    assert outsider.get(url).status_code == 404
    assert outsider.patch(url, {"name": "mine now"}, content_type="application/json").status_code == 404
    assert outsider.delete(url).status_code == 404
    assert ModelEndpoint.objects.get(pk=endpoint.pk).name == "acme private"


def test_a_tenant_cannot_change_platform_endpoints(world: World, api_a: Client) -> None:
    platform = _platform_endpoint()
    url = f"/api/v1/model-endpoints/{platform.pk}"
    assert api_a.get(url).json()["scope"] == "platform"
    assert api_a.patch(url, {"priority": 1}, content_type="application/json").status_code == 404
    assert api_a.delete(url).status_code == 404
    assert ModelEndpoint.objects.filter(pk=platform.pk, priority=100).exists()


def test_a_reader_lists_but_cannot_create(world: World) -> None:
    reader = _scoped_client(world, ["agents:read"])
    assert reader.get("/api/v1/model-endpoints").status_code == 200
    response = reader.post("/api/v1/model-endpoints", _body(), content_type="application/json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    endpoint = _own_endpoint(world)
    assert reader.delete(f"/api/v1/model-endpoints/{endpoint.pk}").status_code == 403
    assert _scoped_client(world, ["kb:read"]).get("/api/v1/model-endpoints").status_code == 403


def test_viewers_session_cannot_create(world: World) -> None:
    response = host_client(HOST_A, world.user("viewer")).post("/api/v1/model-endpoints", _body(),
                                                              content_type="application/json")
    assert response.status_code == 403


@pytest.mark.parametrize(("overrides", "field"), [
    ({"api_base": "not a url"}, "api_base"), ({"api_base": "file:///etc/passwd"}, "api_base"),
    ({"input_price_per_mtok": "-1"}, "input_price_per_mtok"), ({"output_price_per_mtok": -5}, "output_price_per_mtok"),
    ({"context_window": 100}, "context_window"), ({"tier": "ultra"}, "tier"), ({"name": "  "}, "name"),
])
def test_it_rejects_invalid_values_with_422(world: World, api_a: Client, overrides: dict[str, Any],
                                            field: str) -> None:
    response = api_a.post("/api/v1/model-endpoints", _body(**overrides), content_type="application/json")
    assert response.status_code == 422, response.content
    assert field in response.json()["error"]["details"]
    assert SECRET not in response.content.decode()


def test_a_patch_with_a_bad_url_is_rejected(world: World, api_a: Client) -> None:
    endpoint = _own_endpoint(world)
    response = api_a.patch(f"/api/v1/model-endpoints/{endpoint.pk}", {"api_base": "gopher://x"},
                           content_type="application/json")
    assert response.status_code == 422
    assert ModelEndpoint.objects.get(pk=endpoint.pk).api_base == "http://own.example.test/v1"


def test_the_list_endpoints_query_count_does_not_grow_with_endpoints(
    world: World, api_a: Client, django_assert_max_num_queries: Any
) -> None:
    _own_endpoint(world, name="first")
    api_a.get("/api/v1/model-endpoints")  # first use of the key may touch last_used_at
    with django_assert_max_num_queries(6) as few:
        assert api_a.get("/api/v1/model-endpoints").status_code == 200
    for n in range(10):
        _own_endpoint(world, name=f"more {n}")
        _platform_endpoint(name=f"platform {n}")
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert len(api_a.get("/api/v1/model-endpoints").json()["items"]) == 21


# --- Console pages ------------------------------------------------------------------------


def test_the_console_lists_own_and_platform_endpoints(world: World, django_assert_max_num_queries: Any) -> None:
    _own_endpoint(world)
    _platform_endpoint()
    client = host_client(HOST_A, world.user("viewer"))
    client.get("/models/")
    with django_assert_max_num_queries(15) as few:
        page = client.get("/models/")
    html = page.content.decode()
    assert page.status_code == 200 and "acme private" in html and "platform standard" in html
    assert "vllm.internal" not in html and SECRET not in html
    assert 'name="api_key"' not in html  # viewers get no form
    for n in range(5):
        _own_endpoint(world, name=f"more {n}")
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert client.get("/models/").status_code == 200


def test_a_viewer_cannot_create_or_edit_in_the_console(world: World) -> None:
    endpoint = _own_endpoint(world)
    client = host_client(HOST_A, world.user("viewer"))
    assert client.post("/models/", {**_body(), "enabled": "on"}).status_code == 403
    assert client.get(f"/models/{endpoint.pk}/").status_code == 403


def test_an_operator_creates_edits_and_deletes_in_the_console(world: World) -> None:
    client = host_client(HOST_A, world.user("operator"))
    form = {**_body(), "currency": "USD", "timeout_seconds": "30", "enabled": "on"}
    created = client.post("/models/", form)
    assert created.status_code == 302, created.content.decode()[:2000]
    endpoint = ModelEndpoint.objects.get(tenant=world.tenant_a, name="own gpt")
    assert endpoint.api_key() == SECRET

    edit = client.get(f"/models/{endpoint.pk}/")
    assert edit.status_code == 200 and SECRET not in edit.content.decode()
    assert 'type="password"' in edit.content.decode()
    assert client.post(f"/models/{endpoint.pk}/", {**form, "api_key": "", "priority": "2"}).status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.priority == 2 and endpoint.api_key() == SECRET
    bad = client.post(f"/models/{endpoint.pk}/", {**form, "api_key": "", "api_base": "ftp://nope"})
    assert bad.status_code == 422 and SECRET not in bad.content.decode()
    assert client.post(f"/models/{endpoint.pk}/", {**form, "api_key": "", "clear_api_key": "on"}).status_code == 302
    assert not ModelEndpoint.objects.get(pk=endpoint.pk).has_api_key

    client.post(f"/models/{endpoint.pk}/delete/", {"confirm": "wrong"})
    assert ModelEndpoint.objects.filter(pk=endpoint.pk).exists()
    assert client.post(f"/models/{endpoint.pk}/delete/", {"confirm": "own gpt"}).status_code == 302
    assert not ModelEndpoint.objects.filter(pk=endpoint.pk).exists()


def test_the_console_hides_other_tenants_endpoints(world: World) -> None:
    foreign = _own_endpoint(world, name="globex private", tenant=world.tenant_b)
    client = host_client(HOST_A, world.user("owner"))
    assert "globex private" not in client.get("/models/").content.decode()
    assert client.get(f"/models/{foreign.pk}/").status_code == 404
    assert client.post(f"/models/{foreign.pk}/delete/", {"confirm": "globex private"}).status_code == 404
    assert ModelEndpoint.objects.filter(pk=foreign.pk).exists()
