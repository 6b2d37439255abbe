"""What the REST API does with bodies it cannot use: a non-JSON media type (415), NUL characters
and unpaired surrogates (422 ``invalid_characters``), and overlong upload filenames (kept,
shortened): never a 500, always the API's error body."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from agents.models import Agent, Message
from agents.services import agent_create, agent_version_publish
from knowledge.models import Collection, Document
from tenants.principal import Principal
from tests.conftest import World

pytestmark = pytest.mark.django_db

NUL = "a\x00b"
# A JSON text whose string decodes to an unpaired high surrogate (json.dumps cannot make one from
# a str without escaping it, so it is written by hand).
LONE_SURROGATE_JSON = '"lone \\ud800 half"'


def _post_raw(client: Client, path: str, body: str, content_type: str = "application/json") -> Any:
    return client.generic("POST", path, body.encode(), content_type=content_type)


def _assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"]
    return body  # type: ignore[no-any-return]


def _active_agent(world: World) -> int:
    with schema_context(world.tenant_a.schema_name):
        principal = Principal.system("tests", tenant=world.tenant_a)
        agent = agent_create(principal=principal, slug="nul-desk", name="Nul desk")
        agent_version_publish(principal=principal, version=agent.versions.get())
        agent_id = agent.pk
    connection.set_schema_to_public()
    return agent_id


def _session(world: World, api_a: Client) -> int:
    agent_id = _active_agent(world)
    response = api_a.post("/api/v1/sessions", {"agent_id": agent_id}, content_type="application/json")
    assert response.status_code == 201, response.content
    return int(response.json()["id"])


def test_it_refuses_a_nul_in_a_chat_message(world: World, api_a: Client) -> None:
    session_id = _session(world, api_a)
    response = api_a.post(f"/api/v1/sessions/{session_id}/messages", {"content": NUL},
                          content_type="application/json")
    body = _assert_error(response, 422, "invalid_characters")
    assert body["error"]["details"]["field"] == "body.content"
    with schema_context(world.tenant_a.schema_name):
        assert not Message.objects.filter(session_id=session_id).exists()


def test_it_refuses_a_lone_surrogate_in_a_chat_message(world: World, api_a: Client) -> None:
    session_id = _session(world, api_a)
    response = _post_raw(api_a, f"/api/v1/sessions/{session_id}/messages", '{"content": ' + LONE_SURROGATE_JSON + '}')
    _assert_error(response, 422, "invalid_characters")


def test_it_refuses_a_nul_in_a_collection_name(world: World, api_a: Client) -> None:
    response = api_a.post("/api/v1/knowledge/collections", {"name": NUL}, content_type="application/json")
    _assert_error(response, 422, "invalid_characters")
    with schema_context(world.tenant_a.schema_name):
        assert not Collection.objects.exists()


def test_it_refuses_a_nul_in_an_agent_description(world: World, api_a: Client) -> None:
    response = api_a.post("/api/v1/agents", {"slug": "nul", "name": "Nul", "description": NUL},
                          content_type="application/json")
    _assert_error(response, 422, "invalid_characters")
    patched = api_a.patch("/api/v1/agents/1", {"description": NUL}, content_type="application/json")
    _assert_error(patched, 422, "invalid_characters")
    with schema_context(world.tenant_a.schema_name):
        assert not Agent.objects.filter(slug="nul").exists()


def test_it_refuses_a_nul_in_a_search_query(world: World, api_a: Client) -> None:
    collection = api_a.post("/api/v1/knowledge/collections", {"name": "Searchable"}, content_type="application/json")
    response = api_a.post("/api/v1/knowledge/search", {"query": NUL, "collection_ids": [collection.json()["id"]]},
                          content_type="application/json")
    _assert_error(response, 422, "invalid_characters")


def test_it_refuses_a_nul_in_a_query_string(world: World, api_a: Client) -> None:
    _assert_error(api_a.get("/api/v1/agents", {"status": NUL}), 422, "invalid_characters")
    _assert_error(api_a.get("/api/v1/knowledge/collections", {"cursor": NUL}), 422, "invalid_characters")


def test_it_refuses_a_nul_in_a_version_output_schema(world: World, api_a: Client) -> None:
    """``\\u0000`` in JSON is a NUL after parsing: PostgreSQL's jsonb refuses it as well."""
    response = _post_raw(api_a, "/api/v1/agents", '{"slug": "schema", "name": "S", "config": {"output_format": '
                                                  '"json_schema", "output_schema": {"title": "x\\u0000"}}}')
    _assert_error(response, 422, "invalid_characters")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_it_refuses_a_json_body_sent_as_another_media_type(world: World, api_a: Client, content_type: str) -> None:
    response = _post_raw(api_a, "/api/v1/knowledge/collections", '{"name": "Plain"}', content_type=content_type)
    body = _assert_error(response, 415, "unsupported_media_type")
    assert body["error"]["details"]["content_type"] == content_type
    with schema_context(world.tenant_a.schema_name):
        assert not Collection.objects.filter(name="Plain").exists()


def test_it_takes_json_with_a_charset_or_a_json_suffix(world: World, api_a: Client) -> None:
    charset = _post_raw(api_a, "/api/v1/knowledge/collections", '{"name": "Charset"}',
                        content_type="application/json; charset=utf-8")
    assert charset.status_code == 201, charset.content
    suffixed = _post_raw(api_a, "/api/v1/knowledge/collections", '{"name": "Suffix"}',
                         content_type="application/merge-patch+json")
    assert suffixed.status_code == 201, suffixed.content


def test_it_answers_a_body_that_is_not_json_with_400(world: World, api_a: Client) -> None:
    _assert_error(_post_raw(api_a, "/api/v1/knowledge/collections", "{name"), 400, "bad_request")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/octet-stream"])
def test_it_refuses_an_upload_that_is_not_multipart(world: World, api_a: Client, content_type: str) -> None:
    collection = api_a.post("/api/v1/knowledge/collections", {"name": f"Raw {content_type}"},
                            content_type="application/json").json()
    response = _post_raw(api_a, f"/api/v1/knowledge/collections/{collection['id']}/documents", "Vacation: 25 days.",
                         content_type=content_type)
    body = _assert_error(response, 415, "unsupported_media_type")
    assert body["error"]["details"]["content_type"] == content_type


def test_multipart_uploads_still_work(world: World, api_a: Client) -> None:
    collection = api_a.post("/api/v1/knowledge/collections", {"name": "Uploads"}, content_type="application/json")
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = api_a.post(f"/api/v1/knowledge/collections/{collection.json()['id']}/documents",
                          {"files": [SimpleUploadedFile("notes.txt", b"Refunds take five days.")]})
    assert response.status_code == 201, response.content


@pytest.mark.parametrize("stem", ["a" * 1000, "é" * 1000, "日本" * 400])
def test_an_overlong_upload_filename_is_shortened_keeping_its_extension(world: World, api_a: Client,
                                                                        stem: str) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    collection = api_a.post("/api/v1/knowledge/collections", {"name": "Long names"}, content_type="application/json")
    response = api_a.post(f"/api/v1/knowledge/collections/{collection.json()['id']}/documents",
                          {"files": [SimpleUploadedFile(f"{stem}.md", f"# {stem[:3]}\n\nShort.".encode())]})
    assert response.status_code == 201, response.content
    created = response.json()["created"][0]
    assert created["original_filename"].endswith(".md") and len(created["original_filename"]) <= 255
    with schema_context(world.tenant_a.schema_name):
        document = Document.objects.get(pk=created["id"])
        stored = document.file.name.rsplit("/", 1)[-1]
        assert stored.endswith(".md") and len(stored.encode()) <= 255
        assert document.file.read() == f"# {stem[:3]}\n\nShort.".encode()


def test_control_characters_are_dropped_from_an_upload_filename(world: World, api_a: Client) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    collection = api_a.post("/api/v1/knowledge/collections", {"name": "Odd names"}, content_type="application/json")
    response = api_a.post(f"/api/v1/knowledge/collections/{collection.json()['id']}/documents",
                          {"files": [SimpleUploadedFile("re\x00port\x1b.txt", b"Plain text.")]})
    assert response.status_code == 201, response.content
    assert response.json()["created"][0]["original_filename"] == "report.txt"


# --- The console's forms, which call the same services --------------------------------------

CONSOLE_VERSION_POST = {"system_prompt": "Be brief.", "tier": "standard", "temperature": "0.2",
                        "max_output_tokens": "400", "history_window": "10", "retrieval_top_k": "4",
                        "retrieval_mode": "hybrid", "output_format": "text"}


def test_the_console_refuses_a_nul_in_a_collection_name(world: World, client_a: Any) -> None:
    response = client_a("operator").post("/kb/", {"name": NUL, "description": ""})
    assert response.status_code == 422
    with schema_context(world.tenant_a.schema_name):
        assert not Collection.objects.exists()


def test_the_console_refuses_a_nul_in_an_agent_description(world: World, client_a: Any) -> None:
    response = client_a("operator").post("/agents/new/", {**CONSOLE_VERSION_POST, "slug": "nul", "name": "Nul",
                                                         "description": NUL})
    assert response.status_code == 422
    with schema_context(world.tenant_a.schema_name):
        assert not Agent.objects.filter(slug="nul").exists()


def test_the_console_refuses_an_escaped_nul_in_an_output_schema(world: World, client_a: Any) -> None:
    """The form's text holds no NUL, but the JSON it parses to does (``\\u0000``)."""
    response = client_a("operator").post("/agents/new/", {
        **CONSOLE_VERSION_POST, "slug": "escaped", "name": "Escaped", "output_format": "json_schema",
        "output_schema": '{"type": "object", "title": "x\\u0000"}'})
    assert response.status_code == 422
    assert "NUL character" in response.content.decode()
    with schema_context(world.tenant_a.schema_name):
        assert not Agent.objects.filter(slug="escaped").exists()


# --- Date-time query parameters -----------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/audit/events", "/api/v1/usage/events"])
def test_date_filters_take_iso_8601_only_and_any_offset(world: World, api_a: Client, path: str) -> None:
    # PostgreSQL refuses a +22:14 offset: it was a 500; the bound is compared in UTC now.
    assert api_a.get(path, {"from": "5000-09-26T03:57:50.0+22:14"}).status_code == 200
    _assert_error(api_a.get(path, {"from": "0001-01-01T00:00:00+01:00"}), 422, "validation_failed")  # year 0
    _assert_error(api_a.get(path, {"to": "0.5"}), 422, "validation_failed")  # was read as a Unix time
