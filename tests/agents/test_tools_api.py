"""The tools REST API: create, read, change, delete, builtins, validation, the egress guard at save,
secrets never returned, tools in use, permissions and isolation, tools on agent versions, query
counts (Django test client; DNS answered by the test)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import connection
from django.test import Client, override_settings
from django_tenants.utils import schema_context

from agents.models import Tool
from compliance.models import AuditEvent
from config.crypto import secret_decrypt
from config.egress import resolver_override
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client

pytestmark = pytest.mark.django_db

SECRET = "Bearer tok-PLAINTEXT-never-shown-4242"
PUBLIC = "93.184.216.34"
# "sample.example.test" is what a placeholder in a host would become when checked: it resolves
# publicly, so only the placeholder rule refuses it.
DNS: dict[str, list[str]] = {
    "tickets.example.test": [PUBLIC],
    "sample.example.test": [PUBLIC],
    "intranet.example.test": ["10.1.2.3"],
}
PARAMETERS = {
    "type": "object",
    "properties": {"ticket_id": {"type": "string"}, "title": {"type": "string"}},
    "required": ["ticket_id"],
}


@pytest.fixture(autouse=True)
def _dns() -> Iterator[None]:
    def resolve(host: str, port: int) -> list[str]:
        if host not in DNS:
            raise OSError(f"{host} does not resolve")
        return DNS[host]

    with resolver_override(resolve):
        yield


def _body(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "get_ticket",
        "description": "Read one ticket.",
        "parameters": PARAMETERS,
        "method": "GET",
        "url": "https://tickets.example.test/tickets/{ticket_id}?expand=1",
        "headers": {"Accept": "application/json"},
        "secret_headers": {"Authorization": SECRET},
        **overrides,
    }


def _post(client: Client, path: str, body: Any) -> Any:
    return client.post(path, body, content_type="application/json")


def _patch(client: Client, path: str, body: Any) -> Any:
    return client.patch(path, body, content_type="application/json")


def _create(client: Client, **overrides: Any) -> dict[str, Any]:
    response = _post(client, "/api/v1/tools", _body(**overrides))
    assert response.status_code == 201, response.content
    return response.json()  # type: ignore[no-any-return]


def _error(response: Any) -> dict[str, Any]:
    return response.json()["error"]  # type: ignore[no-any-return]


def _audit(world: World, tool_id: int) -> list[AuditEvent]:
    with schema_context(world.tenant_a.schema_name):
        return list(AuditEvent.objects.filter(target_type="tool", target_id=str(tool_id)).order_by("pk"))


def _key(world: World, scopes: list[str]) -> str:
    key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a), tenant=world.tenant_a, name="scoped", scopes=scopes
    ).secret
    connection.set_schema_to_public()
    return key


def _agent_with(client: Client, slug: str, tools: list[str], *, publish: bool = True) -> dict[str, Any]:
    response = _post(client, "/api/v1/agents", {"slug": slug, "name": slug.title(), "config": {"tools": tools}})
    assert response.status_code == 201, response.content
    if publish:
        assert _post(client, f"/api/v1/agents/{response.json()['id']}/versions/1/publish", {}).status_code == 200
    return response.json()  # type: ignore[no-any-return]


# --- CRUD -------------------------------------------------------------------------------------


def test_a_tool_is_created_read_listed_changed_and_deleted(world: World, api_a: Client) -> None:
    created = _create(api_a)
    assert created["kind"] == "http" and created["name"] == "get_ticket" and created["method"] == "GET"
    assert created["side_effect"] == "read" and created["requires_approval"] is False
    assert created["parameters"] == PARAMETERS and created["headers"] == {"Accept": "application/json"}
    assert created["secret_header_names"] == ["Authorization"] and created["used_by"] == []
    assert created["timeout_seconds"] == 10.0 and created["max_response_bytes"] == 65536
    assert api_a.get(f"/api/v1/tools/{created['id']}").json() == created

    listed = api_a.get("/api/v1/tools").json()
    kinds = {t["name"]: t["kind"] for t in listed["items"]}
    assert kinds == {"kb_search": "builtin", "current_time": "builtin", "calculator": "builtin", "get_ticket": "http"}

    changed = _patch(
        api_a,
        f"/api/v1/tools/{created['id']}",
        {
            "description": "Read a ticket.",
            "side_effect": "write",
            "method": "post",
            "body_template": {"id": "{ticket_id}"},
        },
    )
    assert changed.status_code == 200, changed.content
    body = changed.json()
    assert body["description"] == "Read a ticket." and body["method"] == "POST"
    assert body["side_effect"] == "write" and body["requires_approval"] is True  # the write default
    assert body["body_template"] == {"id": "{ticket_id}"}
    assert body["url"] == created["url"] and body["secret_header_names"] == ["Authorization"]  # kept

    assert api_a.delete(f"/api/v1/tools/{created['id']}").status_code == 204
    assert api_a.get(f"/api/v1/tools/{created['id']}").status_code == 404
    actions = [e.action for e in _audit(world, created["id"])]
    assert actions == ["tool.created", "tool.updated", "tool.deleted"]


def test_a_change_that_changes_nothing_is_not_audited(world: World, api_a: Client) -> None:
    created = _create(api_a)
    same = _patch(api_a, f"/api/v1/tools/{created['id']}", {"description": "Read one ticket.", "method": "GET"})
    assert same.status_code == 200
    assert [e.action for e in _audit(world, created["id"])] == ["tool.created"]


def test_approval_defaults_follow_the_side_effect_and_a_waiver_is_audited(world: World, api_a: Client) -> None:
    write = _create(api_a, name="create_ticket", side_effect="write", method="POST")
    assert write["requires_approval"] is True
    read = _create(api_a, name="list_tickets")
    assert read["requires_approval"] is False
    waived = _create(api_a, name="close_ticket", side_effect="write", method="POST", requires_approval=False)
    assert waived["requires_approval"] is False
    assert [e.action for e in _audit(world, waived["id"])] == ["tool.created", "tool.approval_waived"]
    assert [e.action for e in _audit(world, write["id"])] == ["tool.created"]
    # Turning approval off later on a write tool is audited the same way.
    _patch(api_a, f"/api/v1/tools/{write['id']}", {"requires_approval": False})
    assert [e.action for e in _audit(world, write["id"])] == ["tool.created", "tool.updated", "tool.approval_waived"]


def test_a_taken_name_is_a_conflict(world: World, api_a: Client) -> None:
    first = _create(api_a)
    again = _post(api_a, "/api/v1/tools", _body())
    assert again.status_code == 409 and _error(again)["code"] == "duplicate_tool"
    other = _create(api_a, name="other_tool")
    renamed = _patch(api_a, f"/api/v1/tools/{other['id']}", {"name": first["name"]})
    assert renamed.status_code == 409 and _error(renamed)["code"] == "duplicate_tool"


# --- Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": ""}, "name"),
        ({"name": "kb_search"}, "name"),
        ({"kind": "builtin"}, "kind"),
        ({"parameters": {"type": 5}}, "parameters"),
        ({"parameters": {"type": "string"}}, "parameters"),
        (
            {
                "parameters": {
                    "type": "object",
                    "properties": {f"p{n}": {"type": "string", "description": "d" * 200} for n in range(120)},
                }
            },
            "parameters",
        ),
        ({"side_effect": "delete"}, "side_effect"),
        ({"timeout_seconds": 0.4}, "timeout_seconds"),
        ({"timeout_seconds": 121}, "timeout_seconds"),
        ({"max_response_bytes": 0}, "max_response_bytes"),
        ({"max_response_bytes": 10**12}, "max_response_bytes"),
        ({"method": "TRACE"}, "method"),
        ({"url": "ftp://tickets.example.test/x"}, "url"),
        ({"url": ""}, "url"),
        ({"url": "https://tickets.example.test/{missing}"}, "url"),
        ({"url": "https://tickets.example.test/{ticket_id"}, "url"),
        ({"headers": {"X-Evil": "a\r\nInjected: yes"}}, "headers"),
        ({"headers": {"Host": "elsewhere.test"}}, "headers"),
        ({"headers": {"Transfer-Encoding": "chunked"}}, "headers"),
        ({"headers": {"Content-Length": "3"}}, "headers"),
        ({"headers": {"bad header": "x"}}, "headers"),
        ({"secret_headers": {"Connection": "close"}}, "secret_headers"),
        ({"secret_headers": {"accept": "x"}}, "secret_headers"),  # also a plain header
        ({"body_template": {"id": "{ticket_id}"}}, "body_template"),  # GET takes no body
        ({"method": "POST", "body_template": {"id": "{nope}"}}, "body_template"),
        ({"method": "POST", "body_template": {"title": "Ticket {nope}"}}, "body_template"),
    ],
)
def test_each_bad_field_is_named(world: World, api_a: Client, overrides: dict[str, Any], field: str) -> None:
    response = _post(api_a, "/api/v1/tools", _body(**overrides))
    assert response.status_code == 422, response.content
    error = _error(response)
    assert error["code"] == "invalid_tool" and error["details"]["field"] == field
    with schema_context(world.tenant_a.schema_name):
        assert not Tool.objects.filter(kind="http").exists()


def test_malformed_bodies_are_422_not_500(world: World, api_a: Client) -> None:
    assert _post(api_a, "/api/v1/tools", _body(headers={"X": 5})).status_code == 422
    assert _post(api_a, "/api/v1/tools", _body(extra="field")).status_code == 422
    nul = _post(api_a, "/api/v1/tools", _body(description="a\u0000b"))
    assert nul.status_code == 422 and _error(nul)["code"] == "invalid_characters"
    created = _create(api_a)
    for patch in ({"name": None}, {"side_effect": None}, {"timeout_seconds": None}, {"url": None}, {"kind": "builtin"}):
        response = _patch(api_a, f"/api/v1/tools/{created['id']}", patch)
        assert response.status_code == 422, (patch, response.content)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/tickets",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/tickets",
        "https://intranet.example.test/tickets",
        "https://{ticket_id}.example.test/tickets",
        "https://tickets.example.test:{ticket_id}/tickets",
        "{ticket_id}://tickets.example.test/",
    ],
)
def test_the_egress_guard_refuses_private_addresses_and_placeholder_hosts_at_save(
    world: World, api_a: Client, url: str
) -> None:
    response = _post(api_a, "/api/v1/tools", _body(url=url))
    assert response.status_code == 422, response.content
    error = _error(response)
    assert error["code"] == ("egress_denied" if not url.startswith("{") else "invalid_tool")
    assert error["details"]["field"] == "url"
    created = _create(api_a)
    changed = _patch(api_a, f"/api/v1/tools/{created['id']}", {"url": url})
    assert changed.status_code == 422 and _error(changed)["details"]["field"] == "url"
    assert api_a.get(f"/api/v1/tools/{created['id']}").json()["url"] == created["url"]


# --- Secrets ----------------------------------------------------------------------------------


def test_secret_headers_are_encrypted_and_never_returned_or_audited(world: World, api_a: Client) -> None:
    created = _post(api_a, "/api/v1/tools", _body())
    assert SECRET not in created.content.decode()
    tool_id = created.json()["id"]
    assert SECRET not in api_a.get(f"/api/v1/tools/{tool_id}").content.decode()
    assert SECRET not in api_a.get("/api/v1/tools").content.decode()
    with schema_context(world.tenant_a.schema_name):
        stored = Tool.objects.get(pk=tool_id).secret_headers_encrypted
    assert SECRET not in stored and json.loads(secret_decrypt(stored)) == {"Authorization": SECRET}

    kept = _patch(api_a, f"/api/v1/tools/{tool_id}", {"description": "changed"}).json()
    assert kept["secret_header_names"] == ["Authorization"]
    replaced = _patch(api_a, f"/api/v1/tools/{tool_id}", {"secret_headers": {"X-Api-Key": "k-" + SECRET}})
    assert replaced.json()["secret_header_names"] == ["X-Api-Key"] and SECRET not in replaced.content.decode()
    cleared = _patch(api_a, f"/api/v1/tools/{tool_id}", {"secret_headers": {}}).json()
    assert cleared["secret_header_names"] == []
    with schema_context(world.tenant_a.schema_name):
        assert Tool.objects.get(pk=tool_id).secret_headers_encrypted == ""
    events = _audit(world, tool_id)
    assert [e.action for e in events] == ["tool.created", "tool.updated", "tool.updated", "tool.updated"]
    for event in events:
        assert SECRET not in json.dumps(event.payload)
    # Under a key the audit redaction keeps (it hides any key naming a secret).
    assert events[0].payload["write_only_header_names"] == ["Authorization"]
    assert events[2].payload["write_only_header_names"] == ["X-Api-Key"]
    assert events[3].payload["write_only_header_names"] == []


# --- Builtins ---------------------------------------------------------------------------------


def test_builtins_are_listed_and_cannot_be_changed_or_deleted(world: World, api_a: Client) -> None:
    listed = {t["name"]: t for t in api_a.get("/api/v1/tools").json()["items"]}
    calculator = listed["calculator"]
    assert calculator["kind"] == "builtin" and calculator["parameters"]["required"] == ["expression"]
    changed = _patch(api_a, f"/api/v1/tools/{calculator['id']}", {"description": "mine now"})
    assert changed.status_code == 409 and _error(changed)["code"] == "builtin_tool"
    deleted = api_a.delete(f"/api/v1/tools/{calculator['id']}")
    assert deleted.status_code == 409 and _error(deleted)["code"] == "builtin_tool"
    assert api_a.get(f"/api/v1/tools/{calculator['id']}").json() == calculator


# --- In use -----------------------------------------------------------------------------------


def test_a_tool_an_active_version_lists_cannot_be_deleted_until_the_agent_retires(world: World, api_a: Client) -> None:
    tool = _create(api_a)
    agent = _agent_with(api_a, "helpdesk", ["get_ticket", "calculator"])
    assert api_a.get(f"/api/v1/tools/{tool['id']}").json()["used_by"] == ["helpdesk"]
    refused = api_a.delete(f"/api/v1/tools/{tool['id']}")
    assert refused.status_code == 409
    assert _error(refused)["code"] == "tool_in_use" and _error(refused)["details"]["agents"] == ["helpdesk"]
    _post(api_a, f"/api/v1/agents/{agent['id']}/status", {"status": "retired"})
    assert api_a.delete(f"/api/v1/tools/{tool['id']}").status_code == 204


def test_a_tool_any_version_lists_cannot_be_renamed(world: World, api_a: Client) -> None:
    tool = _create(api_a)
    _agent_with(api_a, "drafty", ["get_ticket"], publish=False)
    refused = _patch(api_a, f"/api/v1/tools/{tool['id']}", {"name": "fetch_ticket"})
    assert refused.status_code == 409
    assert _error(refused)["code"] == "tool_in_use" and _error(refused)["details"]["agents"] == ["drafty"]
    # Not active anywhere: deleting it is allowed (the draft's version keeps a name that names nothing).
    assert api_a.delete(f"/api/v1/tools/{tool['id']}").status_code == 204
    unused = _create(api_a, name="unused")
    assert _patch(api_a, f"/api/v1/tools/{unused['id']}", {"name": "renamed"}).json()["name"] == "renamed"


# --- Permissions and isolation ----------------------------------------------------------------


def test_a_viewer_reads_but_cannot_write_and_an_auditor_reads(world: World, api_a: Client) -> None:
    tool = _create(api_a)
    viewer = host_client(HOST_A, world.user("viewer"))
    assert viewer.get("/api/v1/tools").status_code == 200
    assert viewer.get(f"/api/v1/tools/{tool['id']}").status_code == 200
    writes = [
        _post(viewer, "/api/v1/tools", _body(name="mine")),
        _patch(viewer, f"/api/v1/tools/{tool['id']}", {"description": "x"}),
        viewer.delete(f"/api/v1/tools/{tool['id']}"),
        _post(viewer, f"/api/v1/tools/{tool['id']}/test", {"arguments": {"ticket_id": "1"}}),
    ]
    assert [r.status_code for r in writes] == [403, 403, 403, 403]
    auditor = host_client(HOST_A, world.user("auditor"))
    assert auditor.get(f"/api/v1/tools/{tool['id']}").json()["name"] == "get_ticket"
    assert _patch(auditor, f"/api/v1/tools/{tool['id']}", {"description": "x"}).status_code == 403
    reader = api_client(HOST_A, _key(world, ["tools:read"]))
    assert reader.get("/api/v1/tools").status_code == 200
    assert _post(reader, "/api/v1/tools", _body(name="mine")).status_code == 403
    writer = api_client(HOST_A, _key(world, ["tools:write"]))  # the answer needs tools:read
    assert _post(writer, "/api/v1/tools", _body(name="ghost")).status_code == 403
    with schema_context(world.tenant_a.schema_name):
        assert not Tool.objects.filter(name__in=["mine", "ghost"]).exists()
        assert Tool.objects.get(pk=tool["id"]).description == "Read one ticket."


def test_the_outsider_cannot_see_or_touch_tenant_a_tools(world: World, api_a: Client) -> None:
    tool = _create(api_a, name="acme_only")
    with schema_context(world.tenant_b.schema_name):
        assert not Tool.objects.filter(pk=tool["id"]).exists()
    outsider = api_client(HOST_B, world.key_b)
    assert outsider.get(f"/api/v1/tools/{tool['id']}").status_code == 404
    assert _patch(outsider, f"/api/v1/tools/{tool['id']}", {"description": "x"}).status_code == 404
    assert outsider.delete(f"/api/v1/tools/{tool['id']}").status_code == 404
    assert _post(outsider, f"/api/v1/tools/{tool['id']}/test", {"arguments": {}}).status_code == 404
    names = [t["name"] for t in outsider.get("/api/v1/tools").json()["items"]]
    assert "acme_only" not in names and "calculator" in names
    # Tenant B's key on tenant A's host is not a credential there.
    assert api_client(HOST_A, world.key_b).get("/api/v1/tools").status_code == 401


# --- Versions with tools ----------------------------------------------------------------------


def test_versions_take_tools_and_tool_choice(world: World, api_a: Client) -> None:
    _create(api_a)
    agent = _agent_with(api_a, "helpdesk", [], publish=False)
    versions = f"/api/v1/agents/{agent['id']}/versions"
    created = _post(
        api_a, versions, {"config": {"tools": ["get_ticket", "calculator", "get_ticket"], "tool_choice": "required"}}
    )
    assert created.status_code == 201, created.content
    assert created.json()["tools"] == ["get_ticket", "calculator"] and created.json()["tool_choice"] == "required"
    # A new version starts from the latest one.
    following = _post(api_a, versions, {"config": {"temperature": 0.5}}).json()
    assert following["tools"] == ["get_ticket", "calculator"] and following["tool_choice"] == "required"

    unknown = _post(api_a, versions, {"config": {"tools": ["get_ticket", "nope", "nada"]}})
    assert unknown.status_code == 422
    assert _error(unknown)["code"] == "invalid_version" and _error(unknown)["details"]["missing"] == ["nope", "nada"]
    required = _post(api_a, versions, {"config": {"tools": [], "tool_choice": "required"}})
    assert required.status_code == 422 and _error(required)["details"]["field"] == "tool_choice"
    named = _post(api_a, versions, {"config": {"tools": ["get_ticket"], "tool_choice": "get_ticket"}})
    assert named.status_code == 201 and named.json()["tool_choice"] == "get_ticket"
    not_listed = _post(api_a, versions, {"config": {"tools": ["get_ticket"], "tool_choice": "calculator"}})
    assert not_listed.status_code == 422 and _error(not_listed)["details"]["field"] == "tool_choice"
    bad_choice = _post(api_a, versions, {"config": {"tool_choice": "sometimes"}})
    assert bad_choice.status_code == 422 and _error(bad_choice)["details"]["field"] == "tool_choice"
    too_many = _post(api_a, versions, {"config": {"tools": [f"t{n}" for n in range(33)]}})
    assert too_many.status_code == 422 and _error(too_many)["details"]["field"] == "tools"
    fresh = _post(api_a, "/api/v1/agents", {"slug": "other", "name": "Other", "config": {"tools": ["ghost"]}})
    assert fresh.status_code == 422 and _error(fresh)["details"]["missing"] == ["ghost"]
    # Tenant B's tools are not tenant A's.
    outsider = api_client(HOST_B, world.key_b)
    foreign = _post(outsider, "/api/v1/agents", {"slug": "b-agent", "name": "B", "config": {"tools": ["get_ticket"]}})
    assert foreign.status_code == 422 and _error(foreign)["details"]["missing"] == ["get_ticket"]


# --- Pages and query counts -------------------------------------------------------------------


def test_the_list_pages_by_keyset_and_keeps_its_query_count(
    world: World, api_a: Client, django_assert_max_num_queries: Any
) -> None:
    _create(api_a, name="tool-0")
    _agent_with(api_a, "agent-0", ["tool-0"])
    with django_assert_max_num_queries(12) as few:
        assert api_a.get("/api/v1/tools").status_code == 200
    baseline = len(few.captured_queries)
    for n in range(1, 12):
        _create(api_a, name=f"tool-{n}")
        _agent_with(api_a, f"agent-{n}", [f"tool-{n}", "calculator"])
    with django_assert_max_num_queries(baseline):
        items = api_a.get("/api/v1/tools").json()["items"]
    assert len(items) == 15 and {t["name"]: t["used_by"] for t in items}["tool-3"] == ["agent-3"]
    first = api_a.get("/api/v1/tools?limit=10").json()
    second = api_a.get(f"/api/v1/tools?limit=10&cursor={first['next_cursor']}").json()
    assert len(first["items"]) == 10 and len(second["items"]) == 5 and second["next_cursor"] is None
    assert {t["id"] for t in first["items"]}.isdisjoint({t["id"] for t in second["items"]})
    assert _error(api_a.get("/api/v1/tools?cursor=garbage"))["code"] == "invalid_cursor"


# --- Test runs --------------------------------------------------------------------------------


class _Service(ThreadingHTTPServer):
    """A tenant's ticket service, in the test's process: records each request and answers with
    ``status`` and a JSON body that echoes the X-Api-Key header (to show it is scrubbed)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.status = 200
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
                service.seen.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                body = json.dumps(
                    {"id": self.path.rsplit("/", 1)[-1], "title": "Broken screen", "key": self.headers.get("X-Api-Key")}
                ).encode()
                self.send_response(service.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                return

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def service() -> Iterator[_Service]:
    server = _Service()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{server.port}"]):
            yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_test_run_calls_the_service_once_and_keeps_the_secret_hidden(
    world: World, api_a: Client, service: _Service
) -> None:
    tool = _create(
        api_a, url=f"http://127.0.0.1:{service.port}/tickets/{{ticket_id}}", secret_headers={"X-Api-Key": SECRET}
    )
    response = _post(api_a, f"/api/v1/tools/{tool['id']}/test", {"arguments": {"ticket_id": "42"}})
    assert response.status_code == 200, response.content
    outcome = response.json()
    assert outcome["status"] == "ok" and outcome["error_code"] == ""
    assert "Broken screen" in outcome["output"] and outcome["response"]["status"] == 200
    assert outcome["request"]["method"] == "GET" and outcome["request"]["url"].endswith("/tickets/42")
    assert "X-Api-Key" in outcome["request"]["headers"] and SECRET not in response.content.decode()
    assert len(service.seen) == 1 and service.seen[0]["path"] == "/tickets/42"
    assert service.seen[0]["headers"]["X-Api-Key"] == SECRET and service.seen[0]["headers"]["Accept"] == (
        "application/json"
    )
    tested = [e for e in _audit(world, tool["id"]) if e.action == "tool.tested"]
    assert len(tested) == 1
    assert tested[0].payload["arguments"] == {"ticket_id": "42"} and tested[0].payload["status"] == "ok"
    assert SECRET not in json.dumps(tested[0].payload)


def test_a_test_run_refuses_arguments_the_schema_refuses_and_reports_the_services_failure(
    world: World, api_a: Client, service: _Service
) -> None:
    tool = _create(api_a, url=f"http://127.0.0.1:{service.port}/tickets/{{ticket_id}}")
    path = f"/api/v1/tools/{tool['id']}/test"
    missing = _post(api_a, path, {"arguments": {}})
    assert missing.status_code == 422 and _error(missing)["code"] == "invalid_arguments"
    wrong = _post(api_a, path, {"arguments": {"ticket_id": 42}})
    assert wrong.status_code == 422 and _error(wrong)["details"]["field"] == "arguments"
    assert service.seen == []
    service.status = 500
    failed = _post(api_a, path, {"arguments": {"ticket_id": "7"}})
    assert failed.status_code == 200
    assert failed.json()["status"] == "error" and failed.json()["error_code"] == "http_error"
    assert len(service.seen) == 1


def test_a_builtin_can_be_test_run(world: World, api_a: Client) -> None:
    calculator = {t["name"]: t for t in api_a.get("/api/v1/tools").json()["items"]}["calculator"]
    response = _post(api_a, f"/api/v1/tools/{calculator['id']}/test", {"arguments": {"expression": "(2 + 3) * 4"}})
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert "20" in response.json()["output"] and response.json()["request"] is None
