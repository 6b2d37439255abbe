"""Console pages of tools (list, create, edit, builtins read-only, delete, permissions) and the tools
of agent versions (form, detail, diff)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from django.test import override_settings
from django_tenants.utils import schema_context

from agents.models import Agent, AgentVersion, Tool
from agents.services import agent_create, agent_version_create, agent_version_publish
from agents.tool_services import tool_create
from compliance.models import AuditEvent
from config.crypto import secret_decrypt
from config.egress import resolver_override
from tenants.principal import Principal
from tests.conftest import HOST_B, World, host_client

pytestmark = pytest.mark.django_db

SECRET = "tok-PLAINTEXT-never-on-a-page-777"
PUBLIC = "93.184.216.34"
PARAMETERS = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
FORM = {
    "name": "search_tickets",
    "description": "Search tickets.",
    "side_effect": "read",
    "requires_approval": "",
    "method": "GET",
    "url": "https://tickets.example.test/search?q={q}",
    "timeout_seconds": "5",
    "max_response_bytes": "10000",
    "parameters": json.dumps(PARAMETERS),
    "headers": '{"Accept": "application/json"}',
    "secret_headers": json.dumps({"X-Api-Key": SECRET}),
    "body_template": "",
}
VERSION_POST = {
    "system_prompt": "Answer briefly.",
    "rules": "",
    "tier": "standard",
    "endpoint_id": "",
    "temperature": "0.2",
    "max_output_tokens": "400",
    "history_window": "10",
    "retrieval_top_k": "4",
    "retrieval_mode": "hybrid",
    "output_format": "text",
    "output_schema": "",
    "note": "",
    "tool_choice": "auto",
}


@pytest.fixture(autouse=True)
def _dns() -> Iterator[None]:
    with resolver_override(lambda host, port: [PUBLIC] if host.endswith(".example.test") else []):
        yield


def _system(world: World) -> Principal:
    return Principal.system("tests", tenant=world.tenant_a)


def _tool(world: World, name: str = "search_tickets", **fields: Any) -> Tool:
    with schema_context(world.tenant_a.schema_name):
        return tool_create(
            principal=_system(world),
            name=name,
            url="https://tickets.example.test/search?q={q}",
            parameters=PARAMETERS,
            secret_headers={"X-Api-Key": SECRET},
            **fields,
        )


def _agent(world: World, slug: str, tools: list[str], *, publish: bool = True) -> Agent:
    with schema_context(world.tenant_a.schema_name):
        agent = agent_create(
            principal=_system(world),
            slug=slug,
            name=slug.title(),
            config={"system_prompt": "Answer briefly.", "tools": tools},
        )
        if publish:
            agent_version_publish(principal=_system(world), version=agent.versions.get())
        return Agent.objects.get(pk=agent.pk)


# --- List -------------------------------------------------------------------------------------


def test_the_list_shows_builtins_and_tools_with_their_agents_and_keeps_its_query_count(
    world: World, client_a: Any, django_assert_max_num_queries: Any
) -> None:
    _tool(world, "tool-0")
    _agent(world, "agent-0", ["tool-0"])
    client = client_a("viewer")
    # Live tests commit tools of their own in tenant A: count from what is there.
    with schema_context(world.tenant_a.schema_name):
        before = Tool.objects.count()
    with django_assert_max_num_queries(15) as few:
        assert client.get("/tools/").status_code == 200
    baseline = len(few.captured_queries)
    for n in range(1, 10):
        _tool(world, f"tool-{n}", side_effect="write", method="POST")
        _agent(world, f"agent-{n}", [f"tool-{n}", "kb_search"])
    with django_assert_max_num_queries(baseline):
        html = client.get("/tools/").content.decode()
    assert html.count('<tr id="tool-') == before + 9
    row = html[html.index("<code>tool-3</code>") :]
    row = row[: row.index("</tr>")]
    assert "write" in row and "needs approval" in row and "agent-3" in row
    builtin = html[html.index("<code>kb_search</code>") :]
    builtin = builtin[: builtin.index("</tr>")]
    assert "builtin" in builtin and "agent-1" in builtin and "agent-9" in builtin
    assert "New HTTP tool" not in html  # a viewer cannot write
    fragment = client.get("/tools/", HTTP_HX_REQUEST="true")
    assert b"<html" not in fragment.content and fragment.content.count(b'<tr id="tool-') == before + 9


def test_the_navigation_lists_tools_for_those_who_may_read_them(world: World, client_a: Any) -> None:
    html = client_a("auditor").get("/agents/").content.decode()
    assert '<a class="nav-link" href="/tools/">Tools</a>' in html
    assert html.index(">Agents</a>") < html.index(">Tools</a>") < html.index(">Knowledge</a>")


# --- Create and edit ---------------------------------------------------------------------------


def test_an_operator_creates_a_tool_and_its_secrets_never_reach_a_page(world: World, client_a: Any) -> None:
    client = client_a("operator")
    form = client.get("/tools/new/").content.decode()
    assert 'name="parameters"' in form and 'name="secret_headers"' in form
    created = client.post("/tools/new/", FORM)
    assert created.status_code == 302, created.content.decode()
    with schema_context(world.tenant_a.schema_name):
        tool = Tool.objects.get(name="search_tickets")
        assert tool.requires_approval is False and tool.headers == {"Accept": "application/json"}
        assert json.loads(secret_decrypt(tool.secret_headers_encrypted)) == {"X-Api-Key": SECRET}
    page = client.get(created["Location"]).content.decode()
    assert SECRET not in page and "X-Api-Key" in page and "Replace secret headers" in page
    # Saving with the secret field blank keeps the stored secrets.
    saved = client.post(f"/tools/{tool.pk}/", {**FORM, "description": "Search all tickets.", "secret_headers": ""})
    assert saved.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        tool.refresh_from_db()
        assert tool.description == "Search all tickets."
        assert json.loads(secret_decrypt(tool.secret_headers_encrypted)) == {"X-Api-Key": SECRET}
    # A failed save does not echo the secret either.
    failed = client.post(
        f"/tools/{tool.pk}/",
        {**FORM, "timeout_seconds": "500", "secret_headers": json.dumps({"X-Api-Key": "new-" + SECRET})},
    )
    assert failed.status_code == 422 and SECRET not in failed.content.decode()
    cleared = client.post(f"/tools/{tool.pk}/", {**FORM, "secret_headers": "", "clear_secret_headers": "on"})
    assert cleared.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        tool.refresh_from_db()
        assert tool.secret_headers_encrypted == ""
        payloads = list(
            AuditEvent.objects.filter(target_type="tool", target_id=str(tool.pk)).values_list("payload", flat=True)
        )
    assert len(payloads) == 3 and all(SECRET not in json.dumps(p) for p in payloads)


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"parameters": "{not json"}, "parameters", "Not valid JSON"),
        ({"parameters": '{"type": "string"}'}, "parameters", "must describe an object"),
        ({"headers": '{"Host": "x"}'}, "headers", "cannot be set by a tool"),
        ({"url": "http://127.0.0.1/search?q={q}"}, "url", "loopback"),
        ({"url": "https://{q}.example.test/"}, "url", "never in the scheme, host or port"),
        ({"name": "kb_search"}, "name", "builtin"),
    ],
)
def test_the_form_shows_each_error_on_its_field(
    world: World, client_a: Any, changes: dict[str, str], field: str, message: str
) -> None:
    response = client_a("owner").post("/tools/new/", {**FORM, **changes})
    assert response.status_code == 422
    html = response.content.decode()
    error = html[html.index(f'data-testid="error-{field}"') :]
    assert message in error[:400]
    with schema_context(world.tenant_a.schema_name):
        assert not Tool.objects.filter(kind="http").exists()


def test_a_builtin_is_read_only(world: World, client_a: Any) -> None:
    with schema_context(world.tenant_a.schema_name):
        calculator = Tool.objects.get(name="calculator")
    client = client_a("owner")
    html = client.get(f"/tools/{calculator.pk}/").content.decode()
    assert (
        'data-testid="tool-readonly"' in html
        and "expression" in html
        and '<form method="post" action="/tools/' not in html
    )
    assert client.post(f"/tools/{calculator.pk}/", {**FORM, "name": "calculator"}).status_code == 409
    assert client.post(f"/tools/{calculator.pk}/delete/", {"confirm": "calculator"}).status_code == 302
    with schema_context(world.tenant_a.schema_name):
        assert Tool.objects.filter(pk=calculator.pk, description=calculator.description).exists()


def test_deleting_a_tool_in_use_shows_why_and_a_free_one_goes(world: World, client_a: Any) -> None:
    used = _tool(world)
    _agent(world, "helpdesk", ["search_tickets"])
    client = client_a("owner")
    refused = client.post(f"/tools/{used.pk}/delete/", {"confirm": "search_tickets"}, follow=True)
    html = refused.content.decode()
    assert "is used by the active version of helpdesk" in html
    unconfirmed = client.post(f"/tools/{used.pk}/delete/", {"confirm": "wrong"}, follow=True)
    assert "Type the tool&#x27;s name" in unconfirmed.content.decode()
    free = _tool(world, "free_tool")
    gone = client.post(f"/tools/{free.pk}/delete/", {"confirm": "free_tool"})
    assert gone.status_code == 302 and gone["Location"] == "/tools/"
    with schema_context(world.tenant_a.schema_name):
        assert Tool.objects.filter(pk=used.pk).exists() and not Tool.objects.filter(pk=free.pk).exists()


def test_a_viewer_reads_tools_but_cannot_write_and_the_outsider_sees_none(world: World, client_a: Any) -> None:
    tool = _tool(world)
    viewer = client_a("viewer")
    page = viewer.get(f"/tools/{tool.pk}/").content.decode()
    assert 'data-testid="tool-readonly"' in page and SECRET not in page and "X-Api-Key" in page
    assert viewer.get("/tools/new/").status_code == 403
    assert viewer.post("/tools/new/", {**FORM, "name": "mine"}).status_code == 403
    assert viewer.post(f"/tools/{tool.pk}/", FORM).status_code == 403
    assert viewer.post(f"/tools/{tool.pk}/delete/", {"confirm": tool.name}).status_code == 403
    assert viewer.get(f"/tools/{tool.pk}/test/").status_code == 403
    outsider = host_client("acme.localhost", world.user("outsider"))
    assert outsider.get("/tools/").status_code == 403
    at_home = host_client(HOST_B, world.user("outsider"))
    with schema_context(world.tenant_b.schema_name):
        assert not Tool.objects.filter(pk=tool.pk).exists()
    assert at_home.get(f"/tools/{tool.pk}/").status_code == 404
    assert "search_tickets" not in at_home.get("/tools/").content.decode()


# --- Agent versions ----------------------------------------------------------------------------


def test_the_version_form_offers_tools_with_side_effect_and_approval_and_saves_them(
    world: World, client_a: Any
) -> None:
    _tool(world, "create_ticket", side_effect="write", method="POST")
    _tool(world, "search_tickets")
    agent = _agent(world, "helpdesk", ["search_tickets"])
    client = client_a("operator")
    form = client.get(f"/agents/{agent.pk}/edit/").content.decode()
    assert "create_ticket (write, needs approval)" in form and "search_tickets (read)" in form
    assert "calculator (read)" in form
    checked = form[form.index('value="search_tickets"') - 200 : form.index('value="search_tickets"') + 100]
    assert "checked" in checked
    saved = client.post(
        f"/agents/{agent.pk}/edit/",
        {**VERSION_POST, "tools": ["search_tickets", "create_ticket"], "tool_choice": "required"},
    )
    assert saved.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        version = AgentVersion.objects.get(agent=agent, number=2)
    # The version's own order first, then the new ones.
    assert version.tools == ["search_tickets", "create_ticket"] and version.tool_choice == "required"
    named = client.post(
        f"/agents/{agent.pk}/edit/", {**VERSION_POST, "tools": ["create_ticket"], "tool_choice": "create_ticket"}
    )
    assert named.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        assert AgentVersion.objects.get(agent=agent, number=3).tool_choice == "create_ticket"
    refused = client.post(f"/agents/{agent.pk}/edit/", {**VERSION_POST, "tool_choice": "required"})
    assert refused.status_code == 422
    html = refused.content.decode()
    assert "needs at least one tool" in html[html.index('data-testid="error-tool_choice"') :][:300]


def test_the_diff_and_detail_show_tool_changes(world: World, client_a: Any) -> None:
    _tool(world, "search_tickets")
    _tool(world, "create_ticket", side_effect="write", method="POST")
    agent = _agent(world, "helpdesk", ["search_tickets", "calculator"])
    with schema_context(world.tenant_a.schema_name):
        version = agent_version_create(
            principal=_system(world),
            agent=agent,
            config={"tools": ["search_tickets", "create_ticket"], "tool_choice": "required"},
        )
        agent_version_publish(principal=_system(world), version=version)
    client = client_a("viewer")
    html = client.get(f"/agents/{agent.pk}/diff/", {"a": 1, "b": 2}).content.decode()
    summary = html[html.index('data-testid="tool-changes"') :]
    summary = summary[: summary.index("</p>")]
    assert "added <code>create_ticket</code>" in summary and "removed <code>calculator</code>" in summary
    table = html[html.index('data-testid="diff-table"') : html.index('data-testid="unchanged-fields"')]
    assert 'data-field="tools"' in table and 'data-field="tool_choice"' in table
    assert "required" in table[table.index('data-field="tool_choice"') :][:600]
    detail = client.get(f"/agents/{agent.pk}/").content.decode()
    tools = detail[detail.index('data-testid="active-tools"') :]
    assert "<code>create_ticket</code>" in tools[:300] and "tool choice required" in tools[:300]


# --- Test page --------------------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        _Echo.seen.append(self.path)
        body = json.dumps({"results": ["ticket 1"], "key": self.headers.get("X-Api-Key")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return


def test_the_test_page_runs_a_tool_once_and_shows_request_and_response(world: World, client_a: Any) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Echo.seen.clear()
    port = server.server_address[1]
    try:
        with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{port}"]):
            with schema_context(world.tenant_a.schema_name):
                tool = tool_create(
                    principal=_system(world),
                    name="search_tickets",
                    parameters=PARAMETERS,
                    url=f"http://127.0.0.1:{port}/search?q={{q}}",
                    secret_headers={"X-Api-Key": SECRET},
                )
            client = client_a("operator")
            form = client.get(f"/tools/{tool.pk}/test/").content.decode()
            assert "&quot;q&quot;: &quot;&quot;" in form  # the required argument, as a sample
            bad = client.post(f"/tools/{tool.pk}/test/", {"arguments": "{oops"})
            assert bad.status_code == 422 and "not valid JSON" in bad.content.decode()
            refused = client.post(f"/tools/{tool.pk}/test/", {"arguments": '{"q": 5}'})
            assert refused.status_code == 422 and 'data-testid="error-arguments"' in refused.content.decode()
            assert _Echo.seen == []
            ran = client.post(f"/tools/{tool.pk}/test/", {"arguments": '{"q": "screen"}'})
    finally:
        server.shutdown()
        server.server_close()
    html = ran.content.decode()
    assert ran.status_code == 200 and _Echo.seen == ["/search?q=screen"]
    assert 'data-testid="outcome-status"><span class="badge text-bg-success">ok' in html
    request = html[html.index('data-testid="outcome-request"') :]
    assert "/search?q=screen" in request[:800] and "X-Api-Key" in request[:800]
    assert "ticket 1" in html[html.index('data-testid="outcome-response"') :]
    assert SECRET not in html
