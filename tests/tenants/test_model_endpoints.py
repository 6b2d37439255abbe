"""Model endpoints: encrypted keys at rest, key rotation, staff admin, tenant API and console,
the egress guard on tenants' endpoints (save time and call time), and tier takeover."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
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
from config.egress import resolver_override
from tenants.models import EgressAllowRule, ModelEndpoint
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client, verified_staff_client
from tests.scripted_llm import ScriptedLLM

SECRET = "sk-test-PLAINTEXT-never-shown-0123456789"
OTHER_SECRET = "sk-test-REPLACEMENT-key-9876543210"
KEY_OLD = Fernet.generate_key().decode()
KEY_NEW = Fernet.generate_key().decode()
PUBLIC = "93.184.216.34"
# DNS as the tests see it (a process boundary): the example names resolve publicly.
DNS: dict[str, list[str]] = {"llm.example.test": [PUBLIC], "own.example.test": [PUBLIC],
                             "intranet.example.test": ["10.1.2.3"]}


@pytest.fixture(autouse=True)
def _dns() -> Iterator[dict[str, list[str]]]:
    answers = {name: list(addresses) for name, addresses in DNS.items()}

    def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(f"{host} does not resolve")
        return answers[host]

    with resolver_override(resolve):
        yield answers


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
        before = len(api_a.get("/api/v1/model-endpoints").json()["items"])
    for n in range(10):
        _own_endpoint(world, name=f"more {n}")
        _platform_endpoint(name=f"platform {n}")
    with django_assert_max_num_queries(len(few.captured_queries)):
        # Counted from what was listed before: platform endpoints left by live-server tests are shared.
        assert len(api_a.get("/api/v1/model-endpoints").json()["items"]) == before + 20


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


# --- Egress guard (SSRF) ------------------------------------------------------------------

ISSUE_FORMS = ["http://127.0.0.1:9999/v1", "http://169.254.169.254/", "http://2130706433/", "http://0x7f000001/",
               "http://127.1/", "http://0.0.0.0/", "http://[::1]/", "http://user:pw@10.0.0.5/",
               "http://0177.0.0.1/", "http://localhost./v1", "http://metadata.google.internal/",
               "http://intranet.example.test/v1", "http://ｌｏｃａｌｈｏｓｔ/v1"]


@pytest.mark.parametrize("api_base", ISSUE_FORMS)
def test_the_api_refuses_an_endpoint_on_a_private_address_with_egress_denied(world: World, api_a: Client,
                                                                               api_base: str) -> None:
    response = api_a.post("/api/v1/model-endpoints", _body(api_base=api_base), content_type="application/json")
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "egress_denied" and error["message"] and error["details"] == {"api_base": error["message"]}
    assert not ModelEndpoint.objects.filter(name="own gpt").exists()


def test_the_refusal_says_why(world: World, api_a: Client) -> None:
    response = api_a.post("/api/v1/model-endpoints", _body(api_base="http://2130706433/v1"),
                          content_type="application/json")
    assert "127.0.0.1 is loopback" in response.json()["error"]["message"]


def test_a_patch_to_a_private_address_is_refused(world: World, api_a: Client) -> None:
    endpoint = _own_endpoint(world)
    response = api_a.patch(f"/api/v1/model-endpoints/{endpoint.pk}", {"api_base": "http://[::ffff:169.254.169.254]/"},
                           content_type="application/json")
    assert response.status_code == 422 and response.json()["error"]["code"] == "egress_denied"
    assert ModelEndpoint.objects.get(pk=endpoint.pk).api_base == "http://own.example.test/v1"


@pytest.mark.parametrize(("model", "api_base"), [("ollama/llama3", ""), ("lm_studio/qwen", ""),
                                                 ("anthropic/claude-3-5-haiku", "https://llm.example.test/v1")])
def test_litellm_routes_that_would_bypass_the_guard_are_refused(world: World, api_a: Client, model: str,
                                                                api_base: str) -> None:
    # ollama/ and lm_studio/ default to a local server; litellm's own clients are not guarded.
    response = api_a.post("/api/v1/model-endpoints", _body(model=model, api_base=api_base),
                          content_type="application/json")
    assert response.status_code == 422 and response.json()["error"]["code"] == "egress_denied"
    assert api_a.post("/api/v1/model-endpoints", _body(name="hosted", model="anthropic/claude-3-5-haiku", api_base=""),
                      content_type="application/json").status_code == 201


def test_the_staff_allowlist_opens_a_private_address(world: World, api_a: Client) -> None:
    EgressAllowRule.objects.create(target="10.0.0.0/8", port=8000, description="tenant A's VPC")
    created = api_a.post("/api/v1/model-endpoints", _body(api_base="http://intranet.example.test:8000/v1"),
                         content_type="application/json")
    assert created.status_code == 201, created.content
    refused = api_a.post("/api/v1/model-endpoints", _body(name="other port", api_base="http://10.1.2.3:8001/v1"),
                         content_type="application/json")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "egress_denied"


def test_the_console_form_says_why_an_address_is_refused(world: World) -> None:
    client = host_client(HOST_A, world.user("operator"))
    form = {**_body(api_base="http://0x7f000001:9999/v1"), "currency": "USD", "timeout_seconds": "30",
            "enabled": "on"}
    page = client.post("/models/", form)
    html = page.content.decode()
    assert page.status_code == 422 and "127.0.0.1 is loopback" in html and SECRET not in html
    assert not ModelEndpoint.objects.filter(name="own gpt").exists()
    endpoint = _own_endpoint(world)
    edit = client.post(f"/models/{endpoint.pk}/", {**form, "api_key": "", "api_base": "http://169.254.169.254/"})
    assert edit.status_code == 422 and "cloud metadata service" in edit.content.decode()
    assert ModelEndpoint.objects.get(pk=endpoint.pk).api_base == "http://own.example.test/v1"


def _call(endpoint: ModelEndpoint) -> str:
    from agents.runtime.llm import LLMError, stream_chat

    try:
        result = stream_chat(endpoints=[endpoint], messages=[{"role": "user", "content": "hi"}], temperature=0.0,
                             max_tokens=20, on_delta=lambda _: None, should_stop=lambda: False)
    except LLMError as error:
        return error.code
    return result.text


def test_a_name_that_resolves_privately_at_call_time_fails_the_call_and_sends_nothing(
        world: World, _dns: dict[str, list[str]], scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script("rebind-target", tokens=["leaked"])
    # Staff opened the scripted server's port for the public address the name had at save time.
    EgressAllowRule.objects.create(target=PUBLIC, port=scripted_llm.port)
    _dns["model.rebind.test"] = [PUBLIC]
    with schema_context(world.tenant_a.schema_name):
        endpoint = model_endpoint_create(principal=Principal.system("tests", tenant=world.tenant_a),
                                         name="rebinding", model="openai/rebind-target",
                                         api_base=f"http://model.rebind.test:{scripted_llm.port}/v1")
    connection.set_schema_to_public()  # type: ignore[attr-defined]
    _dns["model.rebind.test"] = ["127.0.0.1"]  # the tenant's DNS now points at the worker's loopback
    assert _call(endpoint) == "egress_denied"
    assert scripted_llm.requests_for("rebind-target") == []


def test_a_tenant_endpoint_on_a_local_server_needs_an_allow_rule_a_platform_one_does_not(
        world: World, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script("egress-local", tokens=["ok"])
    own = ModelEndpoint.objects.create(tenant=world.tenant_a, name="own local", model="openai/egress-local",
                                       api_base=scripted_llm.api_base)  # saved before the guard existed
    platform = ModelEndpoint.objects.create(name="platform local", model="openai/egress-local",
                                            api_base=scripted_llm.api_base)
    assert _call(own) == "egress_denied"
    assert scripted_llm.requests_for("egress-local") == []
    assert _call(platform) == "ok"
    EgressAllowRule.objects.create(target="127.0.0.1", port=scripted_llm.port, description="the scripted server")
    assert _call(own) == "ok"
    legacy = ModelEndpoint.objects.create(tenant=world.tenant_a, name="own ollama", model="ollama/llama3")
    assert _call(legacy) == "egress_denied"


def test_a_tenant_endpoint_does_not_take_over_its_tier(world: World) -> None:
    from agents.runtime.llm import endpoints_for

    platform = _platform_endpoint()
    own = _own_endpoint(world)
    ModelEndpoint.objects.filter(pk=own.pk).update(tier=platform.tier, priority=0)
    assert endpoints_for(tenant=world.tenant_a, tier=platform.tier) == [platform]
    # An agent version that pins it gets it.
    assert endpoints_for(tenant=world.tenant_a, tier=platform.tier, endpoint_id=own.pk) == [own]
    assert endpoints_for(tenant=world.tenant_b, tier=platform.tier, endpoint_id=own.pk) == []


def test_staff_edit_the_egress_allowlist_on_the_admin_audited(world: World) -> None:
    client = verified_staff_client(world)
    assert client.get("/admin/tenants/egressallowrule/add/").status_code == 200
    bad = client.post("/admin/tenants/egressallowrule/add/", {"target": "10.0.0.0/33", "port": "", "enabled": "on"})
    assert bad.status_code == 200 and b"errorlist" in bad.content and not EgressAllowRule.objects.exists()
    added = client.post("/admin/tenants/egressallowrule/add/",
                        {"target": "10.20.0.0/16", "port": "8000", "description": "acme VPC", "enabled": "on"})
    assert added.status_code == 302
    rule = EgressAllowRule.objects.get()
    assert (rule.target, rule.port) == ("10.20.0.0/16", 8000)
    assert AuditEvent.objects.filter(action="egress_allow_rule.created", target_id=str(rule.pk)).exists()
    assert client.get("/admin/tenants/egressallowrule/").status_code == 200
