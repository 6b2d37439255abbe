"""Probing model endpoints: against the scripted model server (a real HTTP server), a closed port,
and a private address the egress guard refuses; the health hash; the staff and tenant "Test
endpoint" buttons and their audit events."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from config.crypto import secret_encrypt
from config.metrics import endpoint_health_key
from config.redis import redis_client
from tenants.models import EgressAllowRule, ModelEndpoint, Tenant
from tenants.services.endpoint_probe import model_endpoint_probe, platform_endpoints_probe
from tests.conftest import HOST_A, HOST_B, World, host_client, verified_staff_client
from tests.scripted_llm import ScriptedLLM


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens


def _endpoint(
    name: str, api_base: str, *, model: str = "probe-ok", tenant: Tenant | None = None, enabled: bool = True
) -> ModelEndpoint:
    return ModelEndpoint.objects.create(
        name=name,
        model=f"openai/{model}",
        api_base=api_base,
        tenant=tenant,
        api_key_encrypted=secret_encrypt("sk-probe"),
        timeout_seconds=5,
        enabled=enabled,
    )


def _health() -> dict[str, dict[str, Any]]:
    raw = redis_client().hgetall(endpoint_health_key())
    return {k.decode(): json.loads(v) for k, v in raw.items()}  # type: ignore[union-attr]


@pytest.fixture
def clean_health() -> Iterator[None]:
    redis_client().delete(endpoint_health_key())
    yield
    redis_client().delete(endpoint_health_key())


# --- The probe ---------------------------------------------------------------------------------


def test_a_platform_endpoint_on_the_scripted_server_is_ok_and_recorded(
    world: World, scripted_llm: ScriptedLLM, clean_health: None
) -> None:
    scripted_llm.script("probe-ok", tokens=["OK"])
    endpoint = _endpoint("probe platform", scripted_llm.api_base)
    result = model_endpoint_probe(endpoint=endpoint)
    assert result.ok and result.error == "" and result.error_code == ""
    assert result.latency_ms is not None and result.latency_ms >= 0
    sent = scripted_llm.requests_for("probe-ok")[-1]
    assert sent["max_tokens"] == 1 and sent["stream"] is True
    health = _health()[str(endpoint.pk)]
    assert health == {
        "ok": True,
        "latency_ms": result.latency_ms,
        "checked_at": result.checked_at.isoformat(),
        "name": "probe platform",
        "tier": "standard",
        "error": "",
    }
    assert endpoint.timeout_seconds == 5  # the probe's shorter timeout stayed on its own copy


def test_a_probe_is_left_out_of_the_model_call_metrics(
    world: World, scripted_llm: ScriptedLLM, clean_health: None
) -> None:
    from config.metrics import MODEL_CALL_SECONDS

    def calls() -> float:
        sample = [s for m in MODEL_CALL_SECONDS.collect() for s in m.samples
                  if s.name.endswith("_count") and s.labels.get("endpoint") == "probe metrics"]
        return sample[0].value if sample else 0.0

    scripted_llm.script("probe-ok", tokens=["OK"])
    endpoint = _endpoint("probe metrics", scripted_llm.api_base)
    assert model_endpoint_probe(endpoint=endpoint).ok
    assert calls() == 0.0


def test_a_closed_port_fails_with_a_clear_error(world: World, clean_health: None) -> None:
    endpoint = _endpoint("probe closed", f"http://127.0.0.1:{_closed_port()}/v1")
    result = model_endpoint_probe(endpoint=endpoint)
    assert not result.ok and result.latency_ms is None
    assert result.error_code == "model_unreachable"
    assert "could not be reached" in result.error and "refused" in result.error.lower()
    health = _health()[str(endpoint.pk)]
    assert health["ok"] is False and health["latency_ms"] is None and "could not be reached" in health["error"]


def test_a_server_error_is_reported(world: World, scripted_llm: ScriptedLLM, clean_health: None) -> None:
    scripted_llm.script("probe-500", failure="status:500")
    result = model_endpoint_probe(endpoint=_endpoint("probe 500", scripted_llm.api_base, model="probe-500"))
    assert not result.ok and result.error_code == "model_error" and "HTTP 500" in result.error


def test_a_tenants_private_address_is_refused_unless_allowlisted(
    world: World, scripted_llm: ScriptedLLM, clean_health: None
) -> None:
    scripted_llm.script("probe-ok", tokens=["OK"])
    endpoint = _endpoint("probe tenant", scripted_llm.api_base, tenant=world.tenant_a)
    before = len(scripted_llm.requests_for("probe-ok"))
    with override_settings(EGRESS_ALLOWLIST=[]):
        refused = model_endpoint_probe(endpoint=endpoint)
    assert not refused.ok and refused.error_code == "egress_denied"
    assert "loopback" in refused.error and "allowlist" in refused.error
    assert len(scripted_llm.requests_for("probe-ok")) == before  # no request left
    rule = EgressAllowRule.objects.create(target="127.0.0.1", port=scripted_llm.port, description="tests: probe")
    allowed = model_endpoint_probe(endpoint=endpoint)
    assert allowed.ok, allowed.error
    assert len(scripted_llm.requests_for("probe-ok")) == before + 1
    rule.delete()
    assert str(endpoint.pk) not in _health()  # a tenant's probes are not platform health


def test_the_beat_task_probes_enabled_platform_endpoints_and_prunes_the_hash(
    world: World, scripted_llm: ScriptedLLM, clean_health: None
) -> None:
    from tenants.tasks import model_endpoints_probe

    scripted_llm.script("probe-ok", tokens=["OK"])
    ModelEndpoint.objects.filter(tenant__isnull=True).update(enabled=False)  # only this test's endpoints count
    up = _endpoint("beat up", scripted_llm.api_base)
    down = _endpoint("beat down", f"http://127.0.0.1:{_closed_port()}/v1")
    off = _endpoint("beat off", scripted_llm.api_base, enabled=False)
    own = _endpoint("beat own", scripted_llm.api_base, tenant=world.tenant_a)
    redis_client().hset(endpoint_health_key(), "999999", json.dumps({"ok": True}))  # a deleted endpoint
    assert model_endpoints_probe() == {"ok": 1, "failed": 1, "removed": 1}
    health = _health()
    assert set(health) == {str(up.pk), str(down.pk)}
    assert health[str(up.pk)]["ok"] is True and health[str(down.pk)]["ok"] is False
    assert str(off.pk) not in health and str(own.pk) not in health
    assert platform_endpoints_probe()["removed"] == 0


def test_the_beat_schedule_sends_the_probe_once_to_the_public_schema() -> None:
    from django.conf import settings

    entry = settings.CELERY_BEAT_SCHEDULE["model-endpoints-probe"]
    assert entry["task"] == "tenants.model_endpoints_probe"
    assert entry["tenant_schemas"] == ["public"] and entry["schedule"] == 60.0


# --- Staff button ------------------------------------------------------------------------------


def test_staff_test_a_platform_endpoint_from_the_ops_page(
    world: World, scripted_llm: ScriptedLLM, clean_health: None
) -> None:
    scripted_llm.script("probe-ok", tokens=["OK"])
    endpoint = _endpoint("staff probe", scripted_llm.api_base)
    client = verified_staff_client(world)
    fragment = client.post(f"/admin/ops/endpoints/{endpoint.pk}/test/", HTTP_HX_REQUEST="true")
    assert fragment.status_code == 200
    assert fragment.content.decode().startswith("ok, ") and "<html" not in fragment.content.decode()
    event = AuditEvent.objects.get(action="model_endpoint.tested", target_id=str(endpoint.pk))
    assert event.payload["ok"] is True and event.actor_label == "staff@platform.test"
    # Without JavaScript: back to the page, which shows the recorded probe.
    page = client.post(f"/admin/ops/endpoints/{endpoint.pk}/test/", follow=True)
    assert "staff probe: ok in" in page.content.decode().lower()  # the admin capitalizes messages
    assert "ok, " in page.content.decode().split(f'id="probe-{endpoint.pk}"')[1].split("</td>")[0]


def test_staff_cannot_test_a_tenants_endpoint_here(world: World) -> None:
    own = _endpoint("staff own", "http://127.0.0.1:9/v1", tenant=world.tenant_a)
    response = verified_staff_client(world).post(f"/admin/ops/endpoints/{own.pk}/test/")
    assert response.status_code == 404
    assert not AuditEvent.objects.filter(action="model_endpoint.tested").exists()


# --- Tenant button -------------------------------------------------------------------------------


def test_an_owner_tests_an_own_endpoint(world: World, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script("probe-ok", tokens=["OK"])
    endpoint = _endpoint("tenant probe", scripted_llm.api_base, tenant=world.tenant_a)
    client = host_client(HOST_A, world.user("owner"))
    listing = client.get("/models/").content.decode()
    assert f'data-testid="endpoint-test-{endpoint.pk}"' in listing
    with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{scripted_llm.port}"]):
        fragment = client.post(f"/models/{endpoint.pk}/test/", HTTP_HX_REQUEST="true")
    assert fragment.status_code == 200
    html = fragment.content.decode()
    assert 'data-testid="endpoint-probe-result"' in html and "ok" in html and "<html" not in html
    with schema_context(world.tenant_a.schema_name):
        event = AuditEvent.objects.get(action="model_endpoint.tested", target_id=str(endpoint.pk))
    assert event.payload["ok"] is True and event.payload["name"] == "tenant probe"


def test_an_owner_sees_why_a_refused_endpoint_fails(world: World, scripted_llm: ScriptedLLM) -> None:
    endpoint = _endpoint("tenant refused", scripted_llm.api_base, tenant=world.tenant_a)
    client = host_client(HOST_A, world.user("owner"))
    with override_settings(EGRESS_ALLOWLIST=[]):
        fragment = client.post(f"/models/{endpoint.pk}/test/", HTTP_HX_REQUEST="true").content.decode()
        page = client.post(f"/models/{endpoint.pk}/test/", follow=True).content.decode()
    assert "egress_denied" in fragment and "loopback" in fragment
    assert "failed" in page and "loopback" in page


def test_a_viewer_may_not_test_an_endpoint(world: World, scripted_llm: ScriptedLLM) -> None:
    endpoint = _endpoint("tenant viewer", scripted_llm.api_base, tenant=world.tenant_a)
    before = len(scripted_llm.requests)
    client = host_client(HOST_A, world.user("viewer"))
    assert f"endpoint-test-{endpoint.pk}" not in client.get("/models/").content.decode()
    assert client.post(f"/models/{endpoint.pk}/test/").status_code == 403
    assert len(scripted_llm.requests) == before


def test_another_tenants_endpoint_and_the_platforms_are_not_found(world: World, scripted_llm: ScriptedLLM) -> None:
    theirs = _endpoint("tenant b probe", scripted_llm.api_base, tenant=world.tenant_b)
    platform = _endpoint("platform probe", scripted_llm.api_base)
    before = len(scripted_llm.requests)
    owner_a = host_client(HOST_A, world.user("owner"))
    assert owner_a.post(f"/models/{theirs.pk}/test/").status_code == 404
    assert owner_a.post(f"/models/{platform.pk}/test/").status_code == 404
    # The outsider owns B but reaches A's endpoint only through A's host, where they are no member.
    mine = _endpoint("tenant a own", scripted_llm.api_base, tenant=world.tenant_a)
    assert host_client(HOST_B, world.user("outsider")).post(f"/models/{mine.pk}/test/").status_code == 404
    assert len(scripted_llm.requests) == before
