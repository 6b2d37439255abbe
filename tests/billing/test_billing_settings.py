"""The tenant's billing settings: time zone and the budget-alert webhook, through the API
(``GET/PUT /api/v1/billing/settings``) and the console (``/budgets/settings/``). The secret is
write-only, the URL passes the egress guard at save, changes are audited without the secret, and
a test alert reaches a local receiver signed like a real alert."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from django_tenants.utils import schema_context

from billing.services.budgets.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER
from compliance.models import AuditEvent
from config.crypto import secret_decrypt
from tenants.models import Tenant
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client

pytestmark = pytest.mark.django_db

SECRET = "a-webhook-secret-of-32-characters"
PATH = "/api/v1/billing/settings"


def _put(client: Client, body: dict[str, Any]) -> Any:
    return client.put(PATH, data=json.dumps(body), content_type="application/json")


def _tenant_a(world: World) -> Tenant:
    return Tenant.objects.get(pk=world.tenant_a.pk)


def _audit(world: World, action: str = "tenant.billing_settings_changed") -> list[AuditEvent]:
    with schema_context(world.tenant_a.schema_name):
        return list(AuditEvent.objects.filter(action=action).order_by("seq"))


@pytest.fixture
def receiver(settings: Any) -> Iterator[dict[str, Any]]:
    """A local webhook receiver, opened by the staff allowlist (as the budget webhook tests do)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state: dict[str, Any] = {"requests": [], "status": 204}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            return

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state["requests"].append({"body": body, "headers": dict(self.headers.items())})
            self.send_response(state["status"])
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.EGRESS_ALLOWLIST = [f"127.0.0.1:{server.server_address[1]}"]
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/hooks/budget"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _assert_signed(request: dict[str, Any], secret: str) -> None:
    timestamp = request["headers"][TIMESTAMP_HEADER]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + request["body"], hashlib.sha256).hexdigest()
    assert request["headers"][SIGNATURE_HEADER] == f"sha256={expected}"


# --- API ----------------------------------------------------------------------------------------


def test_the_settings_are_set_and_read_back_without_the_secret(
    world: World, api_a: Client, receiver: dict[str, Any]
) -> None:
    assert api_a.get(PATH).json() == {
        "time_zone": "UTC",
        "alert_webhook_url": "",
        "alert_webhook_secret_set": False,
    }
    response = _put(
        api_a, {"time_zone": "Europe/Berlin", "alert_webhook_url": receiver["url"], "alert_webhook_secret": SECRET}
    )
    assert response.status_code == 200, response.content
    assert response.json() == {
        "time_zone": "Europe/Berlin",
        "alert_webhook_url": receiver["url"],
        "alert_webhook_secret_set": True,
        "alert_webhook_secret_generated": None,
    }
    got = api_a.get(PATH)
    assert got.json() == {
        "time_zone": "Europe/Berlin",
        "alert_webhook_url": receiver["url"],
        "alert_webhook_secret_set": True,
    }
    assert SECRET.encode() not in got.content and SECRET.encode() not in response.content
    tenant = _tenant_a(world)
    assert tenant.time_zone == "Europe/Berlin"
    assert SECRET not in tenant.alert_webhook_secret_encrypted
    assert secret_decrypt(tenant.alert_webhook_secret_encrypted) == SECRET


def test_a_blank_secret_keeps_the_current_one_and_omitted_fields_are_unchanged(
    world: World, api_a: Client, receiver: dict[str, Any]
) -> None:
    _put(api_a, {"alert_webhook_url": receiver["url"], "alert_webhook_secret": SECRET})
    response = _put(api_a, {"time_zone": "America/New_York", "alert_webhook_secret": ""})
    assert response.status_code == 200, response.content
    assert response.json()["alert_webhook_url"] == receiver["url"]
    tenant = _tenant_a(world)
    assert (tenant.time_zone, secret_decrypt(tenant.alert_webhook_secret_encrypted)) == ("America/New_York", SECRET)


def test_a_generated_secret_is_returned_once_and_signs_the_test_alert(
    world: World, api_a: Client, receiver: dict[str, Any]
) -> None:
    response = _put(api_a, {"alert_webhook_url": receiver["url"], "alert_webhook_secret_generate": True})
    assert response.status_code == 200, response.content
    generated = response.json()["alert_webhook_secret_generated"]
    assert generated and len(generated) >= 32
    assert secret_decrypt(_tenant_a(world).alert_webhook_secret_encrypted) == generated
    assert generated.encode() not in api_a.get(PATH).content
    tested = api_a.post(f"{PATH}/test-alert")
    assert tested.status_code == 200, tested.content
    assert tested.json() == {
        "delivered": True,
        "status": 204,
        "message": "Test alert delivered: the webhook answered 204.",
    }
    (request,) = receiver["requests"]
    _assert_signed(request, generated)
    body = json.loads(request["body"])
    assert (body["event"], body["tenant"]) == ("budget.test", "acme")


def test_clearing_the_url_clears_the_secret(world: World, api_a: Client, receiver: dict[str, Any]) -> None:
    _put(api_a, {"alert_webhook_url": receiver["url"], "alert_webhook_secret": SECRET})
    response = _put(api_a, {"alert_webhook_url": ""})
    assert response.status_code == 200, response.content
    assert response.json()["alert_webhook_secret_set"] is False
    tenant = _tenant_a(world)
    assert (tenant.alert_webhook_url, tenant.alert_webhook_secret_encrypted) == ("", "")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/", "127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://10.0.0.5/hook", "private"),
        ("ftp://hooks.example.com/", "http"),
    ],
)
def test_a_url_the_egress_guard_refuses_is_422_egress_denied_with_the_reason(
    world: World, api_a: Client, settings: Any, url: str, reason: str
) -> None:
    settings.EGRESS_ALLOWLIST = []
    response = _put(api_a, {"alert_webhook_url": url, "alert_webhook_secret": SECRET})
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "egress_denied"
    assert error["message"].startswith("The webhook URL is refused: ")
    assert reason in error["message"]
    assert error["details"][0]["field"] == "alert_webhook_url"
    assert _tenant_a(world).alert_webhook_url == ""
    assert _audit(world) == []


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "localtime", "../etc/passwd", "", "utc+2"])
def test_a_name_that_is_not_an_iana_time_zone_is_422(world: World, api_a: Client, zone: str) -> None:
    response = _put(api_a, {"time_zone": zone})
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_time_zone"
    assert "IANA time zone" in error["message"]
    assert error["details"][0]["field"] == "time_zone"
    assert _tenant_a(world).time_zone == "UTC"


def test_a_webhook_without_any_secret_or_a_short_secret_is_422(
    world: World, api_a: Client, receiver: dict[str, Any]
) -> None:
    unsigned = _put(api_a, {"alert_webhook_url": receiver["url"]})
    assert unsigned.status_code == 422
    assert unsigned.json()["error"]["details"][0]["field"] == "alert_webhook_secret"
    short = _put(api_a, {"alert_webhook_url": receiver["url"], "alert_webhook_secret": "short"})
    assert short.status_code == 422
    assert "24 to 256" in short.json()["error"]["message"]
    assert _tenant_a(world).alert_webhook_url == ""


def test_changes_are_audited_without_the_secret_and_a_repeat_is_not(
    world: World, api_a: Client, receiver: dict[str, Any]
) -> None:
    url = receiver["url"] + "?token=path-secret"
    body = {"time_zone": "Asia/Tokyo", "alert_webhook_url": url, "alert_webhook_secret": SECRET}
    assert _put(api_a, body).status_code == 200
    assert _put(api_a, {**body, "alert_webhook_secret": ""}).status_code == 200  # nothing changes
    (event,) = _audit(world)
    port = receiver["url"].split(":")[2].split("/")[0]
    assert event.payload == {
        "changed": {
            "time_zone": "Asia/Tokyo",
            "alert_webhook_url": f"http://127.0.0.1:{port}",
            "alert_webhook_signing": "set",
        }
    }
    assert event.target_type == "tenant" and event.target_id == str(world.tenant_a.pk)
    raw = json.dumps(event.payload)
    assert SECRET not in raw and "path-secret" not in raw


@pytest.mark.parametrize("persona", ["viewer", "operator", "auditor"])
def test_members_without_billing_write_cannot_change_the_settings(world: World, persona: str) -> None:
    client = host_client(HOST_A, world.user(persona))
    response = _put(client, {"time_zone": "Europe/Paris"})
    assert response.status_code == 403
    assert client.post(f"{PATH}/test-alert").status_code == 403
    # Reading needs billing:read, which operators and auditors hold and viewers do not.
    assert client.get(PATH).status_code == (403 if persona == "viewer" else 200)
    assert _tenant_a(world).time_zone == "UTC"


def test_an_admin_may_change_the_settings(world: World) -> None:
    response = _put(host_client(HOST_A, world.user("admin")), {"time_zone": "Europe/Paris"})
    assert response.status_code == 200, response.content
    assert _tenant_a(world).time_zone == "Europe/Paris"


def test_the_outsider_neither_reads_nor_changes_tenant_a_settings(world: World) -> None:
    outsider_key_on_a = api_client(HOST_A, world.key_b)
    assert outsider_key_on_a.get(PATH).status_code in (401, 403)
    assert _put(outsider_key_on_a, {"time_zone": "Europe/Paris"}).status_code in (401, 403)
    outsider_session_on_a = host_client(HOST_A, world.user("outsider"))
    assert outsider_session_on_a.get(PATH).status_code in (401, 403, 404)
    assert _put(outsider_session_on_a, {"time_zone": "Europe/Paris"}).status_code in (401, 403, 404)
    # On its own host the outsider changes its own tenant only.
    own = api_client(HOST_B, world.key_b)
    assert _put(own, {"time_zone": "Europe/Paris"}).status_code == 200
    assert _tenant_a(world).time_zone == "UTC"
    assert Tenant.objects.get(pk=world.tenant_b.pk).time_zone == "Europe/Paris"


def test_a_read_only_key_cannot_change_the_settings(world: World) -> None:
    from tenants.principal import Principal
    from tenants.services.keys import api_key_create

    key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a),
        tenant=world.tenant_a,
        name="read only",
        scopes=["billing:read"],
    ).secret
    client = api_client(HOST_A, key)
    assert client.get(PATH).status_code == 200
    response = _put(client, {"time_zone": "Europe/Paris"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_a_test_alert_reports_a_failing_receiver(world: World, api_a: Client, receiver: dict[str, Any]) -> None:
    _put(api_a, {"alert_webhook_url": receiver["url"], "alert_webhook_secret": SECRET})
    receiver["status"] = 500
    outcome = api_a.post(f"{PATH}/test-alert").json()
    assert outcome == {"delivered": False, "status": None, "message": "Not delivered: the webhook answered 500."}
    (tested,) = _audit(world, "tenant.alert_webhook_tested")
    assert tested.payload["delivered"] is False


def test_a_test_alert_without_a_webhook_is_422(world: World, api_a: Client) -> None:
    response = api_a.post(f"{PATH}/test-alert")
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "alert_webhook_url"


# --- Console ------------------------------------------------------------------------------------


def test_an_owner_sets_the_webhook_in_the_console_and_the_secret_is_never_shown(
    world: World, receiver: dict[str, Any]
) -> None:
    client = host_client(HOST_A, world.user("owner"))
    page = client.get("/budgets/settings/")
    assert page.status_code == 200
    assert "No secret is set." in page.content.decode()
    response = client.post(
        "/budgets/settings/",
        {"time_zone": "Europe/Berlin", "alert_webhook_url": receiver["url"], "alert_webhook_secret": SECRET},
    )
    assert response.status_code == 302
    tenant = _tenant_a(world)
    assert (tenant.time_zone, tenant.alert_webhook_url) == ("Europe/Berlin", receiver["url"])
    assert secret_decrypt(tenant.alert_webhook_secret_encrypted) == SECRET
    html = client.get("/budgets/settings/").content.decode()
    assert SECRET not in html and tenant.alert_webhook_secret_encrypted not in html
    assert "A secret is set." in html and 'value="Europe/Berlin"' in html
    assert "Send test alert" in html


def test_the_console_shows_a_generated_secret_once(world: World, receiver: dict[str, Any]) -> None:
    client = host_client(HOST_A, world.user("admin"))
    response = client.post(
        "/budgets/settings/",
        {"time_zone": "UTC", "alert_webhook_url": receiver["url"], "generate_secret": "on"},
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    generated = secret_decrypt(_tenant_a(world).alert_webhook_secret_encrypted)
    assert f'id="new-secret">{generated}<' in response.content.decode()
    assert generated not in client.get("/budgets/settings/").content.decode()


def test_the_console_answers_422_with_the_guards_reason_and_a_bad_time_zone(world: World, settings: Any) -> None:
    settings.EGRESS_ALLOWLIST = []
    client = host_client(HOST_A, world.user("owner"))
    refused = client.post(
        "/budgets/settings/",
        {"time_zone": "UTC", "alert_webhook_url": "http://169.254.169.254/", "alert_webhook_secret": SECRET},
    )
    assert refused.status_code == 422
    assert "The webhook URL is refused" in refused.content.decode() and "metadata" in refused.content.decode()
    bad_zone = client.post("/budgets/settings/", {"time_zone": "Nowhere/City", "alert_webhook_url": ""})
    assert bad_zone.status_code == 422
    assert "is not an IANA time zone name" in bad_zone.content.decode()
    assert (_tenant_a(world).time_zone, _tenant_a(world).alert_webhook_url) == ("UTC", "")


def test_the_console_test_button_sends_a_signed_alert_and_shows_the_result(
    world: World, receiver: dict[str, Any]
) -> None:
    client = host_client(HOST_A, world.user("owner"))
    client.post(
        "/budgets/settings/",
        {"time_zone": "UTC", "alert_webhook_url": receiver["url"], "alert_webhook_secret": SECRET},
    )
    response = client.post("/budgets/settings/", {"action": "test"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert 'data-testid="test-outcome"' in response.content.decode()
    assert "Test alert delivered: the webhook answered 204." in response.content.decode()
    assert json.loads(response["HX-Trigger"])["toast"]["level"] == "success"
    (request,) = receiver["requests"]
    _assert_signed(request, SECRET)
    # Without JavaScript: post/redirect/get with the result as a flash message.
    plain = client.post("/budgets/settings/", {"action": "test"}, follow=True)
    assert "Test alert delivered" in plain.content.decode()


@pytest.mark.parametrize("persona", ["viewer", "operator", "auditor"])
def test_the_console_page_is_for_owners_and_admins(world: World, persona: str) -> None:
    client = host_client(HOST_A, world.user(persona))
    assert client.get("/budgets/settings/").status_code == 403
    assert client.post("/budgets/settings/", {"time_zone": "Europe/Paris"}).status_code == 403
    assert _tenant_a(world).time_zone == "UTC"


def test_the_outsider_cannot_open_tenant_a_console_settings(world: World) -> None:
    client = host_client(HOST_A, world.user("outsider"))
    assert client.get("/budgets/settings/").status_code in (302, 403, 404)
    client.post("/budgets/settings/", {"time_zone": "Europe/Paris"})
    assert _tenant_a(world).time_zone == "UTC"


def test_the_budgets_page_links_the_settings_for_writers_only(world: World) -> None:
    assert (
        'data-testid="billing-settings-link"'
        in host_client(HOST_A, world.user("admin")).get("/budgets/").content.decode()
    )
    assert (
        'data-testid="billing-settings-link"'
        not in host_client(HOST_A, world.user("operator")).get("/budgets/").content.decode()
    )


@pytest.mark.parametrize("body", [[None, None], 5, "x", None])
def test_a_body_that_is_not_an_object_is_422(world: World, api_a: Client, body: Any) -> None:
    response = api_a.put(PATH, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == "validation_failed"


@pytest.mark.parametrize(
    "body", [{"alert_webhook_secret_generate": "yes"}, {"time_zone": 5}, {"alert_webhook_url": ["x"]}]
)
def test_fields_of_the_wrong_type_are_422_not_coerced(world: World, api_a: Client, body: dict[str, Any]) -> None:
    assert _put(api_a, body).status_code == 422
