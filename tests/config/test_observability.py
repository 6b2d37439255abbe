"""Request ids, probes, metrics, structured logs, Sentry, body limits and the API's error body."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sentry_sdk
import structlog
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client
from django_tenants.utils import schema_context

from compliance import selectors as audit_selectors
from compliance.models import AuditEvent
from config.logging import _SHARED_PROCESSORS
from tenants.models import Invitation
from tests.conftest import HOST_A, World, api_client, host_client

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def _error(response: Any) -> dict[str, Any]:
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details", "request_id"}
    assert body["error"]["request_id"] == response["X-Request-ID"]
    return body["error"]  # type: ignore[no-any-return]


# --- X-Request-ID -------------------------------------------------------------------------


@pytest.mark.parametrize("supplied", ["abc-123", "0af7651916cd43dd8448eb211c80319c", "trace.1:span_2", "x" * 128])
def test_a_sane_request_id_is_returned_unchanged(world: World, supplied: str) -> None:
    response = api_client(HOST_A, world.key_a).get("/api/v1/me", HTTP_X_REQUEST_ID=supplied)
    assert response.status_code == 200
    assert response["X-Request-ID"] == supplied


@pytest.mark.parametrize("supplied", ["abc\nSet-Cookie: x=1", "abc\r\ndef", "x" * 300, "x" * 129,
                                      "spaces are not ok", "<script>", ""])
def test_a_malicious_request_id_is_replaced(world: World, supplied: str) -> None:
    response = api_client(HOST_A, world.key_a).get("/api/v1/me", HTTP_X_REQUEST_ID=supplied)
    assert response.status_code == 200
    assert HEX_ID.match(response["X-Request-ID"])
    assert response["X-Request-ID"] != supplied


def test_each_request_gets_its_own_generated_id(world: World) -> None:
    client = api_client(HOST_A, world.key_a)
    ids = {client.get("/api/v1/me")["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3 and all(HEX_ID.match(i) for i in ids)


@pytest.mark.parametrize(("host", "path", "persona", "status"), [
    (HOST_A, "/", "owner", 200),
    (HOST_A, "/audit/", "viewer", 403),
    (HOST_A, "/no-such-page/", "owner", 404),
    (HOST_A, "/members/", None, 302),
    (HOST_A, "/api/v1/me", None, 401),
    (HOST_A, "/api/v1/no-such-endpoint", "owner", 404),
    ("localhost", "/", None, 200),
    ("nobody.localhost", "/", None, 404),
    ("localhost", "/healthz", None, 200),
])
def test_every_response_carries_the_request_id(world: World, host: str, path: str, persona: str | None,
                                               status: int) -> None:
    client = host_client(host, world.user(persona) if persona else None)
    response = client.get(path, HTTP_X_REQUEST_ID="req-every-1")
    assert response.status_code == status
    assert response["X-Request-ID"] == "req-every-1"


def test_the_api_error_bodys_request_id_is_the_headers(world: World) -> None:
    supplied = api_client(HOST_A, None).get("/api/v1/me", HTTP_X_REQUEST_ID="req-err-1")
    assert _error(supplied)["request_id"] == "req-err-1"
    generated = api_client(HOST_A, None).get("/api/v1/me", HTTP_X_REQUEST_ID="bad\nid")
    assert HEX_ID.match(_error(generated)["request_id"])


def test_an_audit_event_written_by_a_request_carries_its_request_id(world: World) -> None:
    response = api_client(HOST_A, world.key_a).post(
        "/api/v1/members/invitations", {"email": "traced@example.test", "role": "viewer"},
        content_type="application/json", HTTP_X_REQUEST_ID="req-audited-1",
    )
    assert response.status_code == 201, response.content
    with schema_context(world.tenant_a.schema_name):
        event = AuditEvent.objects.order_by("-seq").first()
    assert event is not None and event.action == "member.invited"
    assert event.request_id == "req-audited-1"


# --- Probes and metrics -------------------------------------------------------------------


@pytest.mark.parametrize("host", [HOST_A, "localhost", "nobody.localhost", "10.0.0.1", "evil.example.com"])
def test_healthz_answers_on_every_host(host: str) -> None:
    response = Client(HTTP_HOST=host).get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_healthz_touches_no_database(django_assert_num_queries: Any, db: Any) -> None:
    with django_assert_num_queries(0):
        assert Client(HTTP_HOST="10.0.0.1").get("/healthz").status_code == 200


def test_probes_answer_only_get_and_head(world: World) -> None:
    assert Client(HTTP_HOST="localhost").head("/healthz").status_code == 200
    # A POST is not a probe: it goes on to normal routing (here: the public host has no such page).
    assert Client(HTTP_HOST="localhost").post("/healthz").status_code == 404


@pytest.mark.parametrize("host", [HOST_A, "localhost", "10.0.0.1"])
def test_readyz_reports_database_and_redis_ok(world: World, host: str) -> None:
    response = Client(HTTP_HOST=host).get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] is True and body["checks"]["database"]["error"] is None
    assert body["checks"]["redis"]["ok"] is True and body["checks"]["redis"]["error"] is None


def test_readyz_answers_503_naming_redis_when_it_is_unreachable(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, socket_timeout=1)
    monkeypatch.setattr("config.redis.redis_client", lambda: closed)
    response = Client(HTTP_HOST="10.0.0.1").get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"]["ok"] is False
    assert "ConnectionError" in body["checks"]["redis"]["error"]
    assert body["checks"]["database"]["ok"] is True


def test_metrics_are_prometheus_text(world: World) -> None:
    api_client(HOST_A, world.key_a).get("/api/v1/me")
    response = Client(HTTP_HOST="10.0.0.1").get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert "django_http_requests" in text
    assert re.search(r"^# TYPE django_http_requests_\w+ counter$", text, re.MULTILINE)


# --- Structured logs ----------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log line, rendered as JSON by the project's processors, at INFO and above."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        foreign_pre_chain=_SHARED_PROCESSORS,
    ))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_requests_log_lines_carry_request_id_tenant_and_user(world: World, json_logs: io.StringIO) -> None:
    owner = world.user("owner")
    response = host_client(HOST_A, owner).get("/", HTTP_X_REQUEST_ID="req-log-1")
    assert response.status_code == 200
    lines = [line for line in _lines(json_logs) if line.get("request_id") == "req-log-1"]
    events = {line["event"] for line in lines}
    assert {"request_started", "request_finished"} <= events
    for line in lines:
        assert line["tenant"] == "acme"
        assert line["user_id"] == owner.pk
        assert "timestamp" in line and "level" in line


def test_a_replaced_request_id_is_the_one_logged(world: World, json_logs: io.StringIO) -> None:
    response = api_client(HOST_A, world.key_a).get("/api/v1/me", HTTP_X_REQUEST_ID="evil\ninjected")
    finished = [line for line in _lines(json_logs) if line["event"] == "request_finished"]
    assert finished and finished[-1]["request_id"] == response["X-Request-ID"]
    assert "injected" not in json_logs.getvalue()
    assert finished[-1]["tenant"] == "acme" and finished[-1]["user_id"] is None


def test_a_services_log_line_inside_a_request_carries_the_context(world: World, json_logs: io.StringIO) -> None:
    api_client(HOST_A, world.key_a).post(
        "/api/v1/members/invitations", {"email": "logged@example.test", "role": "viewer"},
        content_type="application/json", HTTP_X_REQUEST_ID="req-log-2",
    )
    audit = [line for line in _lines(json_logs) if line["event"] == "audit_event"]
    assert audit and audit[-1]["request_id"] == "req-log-2" and audit[-1]["tenant"] == "acme"
    assert audit[-1]["schema"] == world.tenant_a.schema_name


# --- Sentry -------------------------------------------------------------------------------


def test_sentry_is_not_initialised_without_a_dsn() -> None:
    if settings.SENTRY_DSN:
        pytest.skip("SENTRY_DSN is set in this environment")
    assert sentry_sdk.get_client().is_active() is False


# --- Body limits and the error body -------------------------------------------------------


def test_a_json_body_over_the_limit_gets_413_and_writes_nothing(world: World) -> None:
    limit = settings.API_MAX_BODY_BYTES
    body = json.dumps({"email": "huge@example.test", "role": "viewer", "note": "x" * limit})
    assert len(body) > limit
    response = api_client(HOST_A, world.key_a).post("/api/v1/members/invitations", body,
                                                   content_type="application/json")
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "payload_too_large"
    assert error["details"] == {"limit_bytes": limit}
    assert not Invitation.objects.filter(email="huge@example.test").exists()


def test_a_json_body_at_the_limit_is_read(world: World) -> None:
    limit = settings.API_MAX_BODY_BYTES
    head = json.dumps({"email": "edge@example.test", "role": "viewer", "note": ""})
    body = head[:-2] + "x" * (limit - len(head)) + head[-2:]
    assert len(body) == limit
    response = api_client(HOST_A, world.key_a).post("/api/v1/members/invitations", body,
                                                   content_type="application/json")
    assert response.status_code == 201, response.content[:300]
    assert Invitation.objects.filter(email="edge@example.test").exists()


def _asgi_post(host: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """POST ``body`` through Django's ASGI handler in 64 KiB chunks with no Content-Length
    (``Transfer-Encoding: chunked``), as daphne delivers such a request."""
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "client": ["127.0.0.1", 40000], "server": [host, 80],
        "headers": [(b"host", host.encode()), (b"transfer-encoding", b"chunked"), *headers],
    }

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stays connected until the response is sent
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # As Django's own test clients do: keep the test's connection (and its transaction) open.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        async_to_sync(ASGIHandler())(scope, receive, send)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_chunked_body_without_content_length_is_bounded_too(world: World) -> None:
    limit = settings.API_MAX_BODY_BYTES
    body = json.dumps({"email": "chunked@example.test", "role": "viewer", "note": "x" * (2 * limit)}).encode()
    status, content = _asgi_post(HOST_A, "/api/v1/members/invitations", body, [
        (b"content-type", b"application/json"), (b"authorization", f"Bearer {world.key_a}".encode()),
    ])
    assert status == 413
    assert json.loads(content)["error"]["code"] == "payload_too_large"
    assert not Invitation.objects.filter(email="chunked@example.test").exists()


def test_a_small_chunked_body_is_read(world: World) -> None:
    body = json.dumps({"email": "small-chunked@example.test", "role": "viewer"}).encode()
    status, content = _asgi_post(HOST_A, "/api/v1/members/invitations", body, [
        (b"content-type", b"application/json"), (b"authorization", f"Bearer {world.key_a}".encode()),
    ])
    assert status == 201, content[:300]
    assert Invitation.objects.filter(email="small-chunked@example.test").exists()


def test_an_oversized_page_post_gets_a_plain_413(world: World) -> None:
    client = host_client(HOST_A, world.user("admin"))
    response = client.post("/members/", {"email": "big@example.test", "role": "viewer",
                                         "pad": "x" * settings.API_MAX_BODY_BYTES})
    assert response.status_code == 413
    assert not Invitation.objects.filter(email="big@example.test").exists()


def _oversized_console_upload(world: World, **headers: str) -> Any:
    """POST a 2 MB file to a collection's console upload with ``KB_MAX_UPLOAD_MB`` at 1."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from knowledge.models import Document
    from knowledge.services import collection_create
    from tenants.principal import Principal

    with schema_context(world.tenant_a.schema_name):
        collection = collection_create(principal=Principal.system("t", tenant=world.tenant_a),
                                       name=f"Limits {len(headers)}")
    client = host_client(HOST_A, world.user("owner"))
    response = client.post(f"/kb/collections/{collection.pk}/upload/",
                           {"files": [SimpleUploadedFile("big.txt", b"x " * 1_048_576)]}, **headers)
    with schema_context(world.tenant_a.schema_name):
        assert not Document.objects.filter(collection=collection).exists()
    return client, collection, response


def test_a_console_upload_past_the_limit_goes_back_to_its_page_with_the_reason(world: World, settings: Any) -> None:
    settings.KB_MAX_UPLOAD_MB = 1
    referer = f"http://{HOST_A}/kb/collections/0/"
    client, collection, response = _oversized_console_upload(world, HTTP_REFERER=referer)
    assert response.status_code == 303 and response["Location"] == referer
    page = client.get(f"/kb/collections/{collection.pk}/").content.decode()
    assert "That upload is 2.0 MB; one upload takes at most 1 MB. Upload fewer or smaller files" in page


@pytest.mark.parametrize("headers", [{}, {"HTTP_REFERER": "https://evil.example/kb/"}])
def test_an_oversized_upload_from_elsewhere_gets_a_plain_413(world: World, settings: Any,
                                                             headers: dict[str, str]) -> None:
    settings.KB_MAX_UPLOAD_MB = 1
    _client, _collection, response = _oversized_console_upload(world, **headers)
    assert response.status_code == 413 and response["Content-Type"].startswith("text/plain")
    assert b"one upload takes at most 1 MB" in response.content


@pytest.mark.parametrize("path", ["/api/v1/no-such-endpoint", "/api/v2/me", "/api/", "/api/v1/audit/events/x/y"])
def test_an_unknown_api_path_gets_the_404_error_body(world: World, path: str) -> None:
    response = api_client(HOST_A, world.key_a).get(path)
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_an_unknown_host_gets_the_404_error_body_under_api(world: World) -> None:
    response = api_client("nobody.localhost", world.key_a).get("/api/v1/me")
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_a_wrong_method_gets_405_with_the_error_body(world: World) -> None:
    response = api_client(HOST_A, world.key_a).put("/api/v1/me", "{}", content_type="application/json")
    assert response.status_code == 405
    assert _error(response)["code"] == "method_not_allowed"
    assert "GET" in response["Allow"]


def test_an_unhandled_exception_gets_500_without_a_traceback(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(**kwargs: Any) -> Any:
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(audit_selectors, "audit_event_list", explode)
    response = api_client(HOST_A, world.key_a).get("/api/v1/audit/events", HTTP_X_REQUEST_ID="req-crash-1")
    assert response.status_code == 500
    error = _error(response)
    assert error["code"] == "internal_error"
    assert error["request_id"] == "req-crash-1"
    text = response.content.decode()
    for leak in ("Traceback", "RuntimeError", "hunter2", "explode", ".py"):
        assert leak not in text


@pytest.mark.parametrize("body", ['{"email": "x@example.test", "role": ', "not json at all", "[1, 2", "\xff"])
def test_a_malformed_json_body_gets_a_4xx_error_body(world: World, body: str) -> None:
    response = api_client(HOST_A, world.key_a).post("/api/v1/members/invitations", body,
                                                   content_type="application/json")
    assert 400 <= response.status_code < 500
    assert _error(response)["code"] in {"bad_request", "validation_failed"}
    assert not Invitation.objects.filter(email="x@example.test").exists()


def test_a_json_body_of_the_wrong_shape_gets_422_naming_the_field(world: World) -> None:
    response = api_client(HOST_A, world.key_a).post("/api/v1/members/invitations", {"email": "y@example.test"},
                                                   content_type="application/json")
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "validation_failed"
    assert any("role" in d["loc"] for d in error["details"])
