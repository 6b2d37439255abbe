"""Console pages of agents and chat: list, create, edit, publish, rollback, diff, sessions, chat."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django_tenants.utils import schema_context

from agents.chat_html import event_fragment
from agents.models import Agent, AgentVersion, ChatSession, Message, Turn
from agents.services import agent_create, agent_version_create, agent_version_publish, chat_session_create
from knowledge.models import Collection
from knowledge.services import collection_create
from tenants.models import Membership
from tenants.principal import Principal
from tests.conftest import HOST_B, World, host_client

pytestmark = pytest.mark.django_db

VERSION_POST = {
    "system_prompt": "You answer questions about refunds.", "rules": "Be brief.", "tier": "standard",
    "endpoint_id": "", "temperature": "0.3", "max_output_tokens": "400", "history_window": "10",
    "retrieval_top_k": "4", "retrieval_mode": "hybrid", "output_format": "text", "output_schema": "", "note": "",
}


def _system(world: World) -> Principal:
    return Principal.system("tests", tenant=world.tenant_a)


def _agent(world: World, slug: str = "helpdesk", *, publish: bool = True, **config: Any) -> Agent:
    with schema_context(world.tenant_a.schema_name):
        principal = _system(world)
        agent = agent_create(principal=principal, slug=slug, name=slug.title(),
                             config={"system_prompt": "Answer briefly.", **config})
        if publish:
            agent_version_publish(principal=principal, version=agent.versions.get())
        return Agent.objects.get(pk=agent.pk)


def _member(world: World, persona: str) -> Principal:
    membership = Membership.objects.select_related("user", "tenant").get(user=world.user(persona),
                                                                         tenant=world.tenant_a)
    return Principal.for_member(membership)


def _session(world: World, agent: Agent, persona: str = "operator") -> ChatSession:
    with schema_context(world.tenant_a.schema_name):
        return chat_session_create(principal=_member(world, persona), agent=agent, title="Refunds")


# --- Agents -------------------------------------------------------------------------------

def test_an_owner_creates_an_agent_with_every_version_field(world: World, client_a: Any) -> None:
    with schema_context(world.tenant_a.schema_name):
        collection = collection_create(principal=_system(world), name="Policies")
    schema = '{"type": "object", "properties": {"answer": {"type": "string"}}}'
    response = client_a("owner").post("/agents/new/", {
        **VERSION_POST, "slug": "refunds", "name": "Refunds bot", "description": "Answers refund questions.",
        "collection_ids": [str(collection.pk)], "output_format": "json_schema", "output_schema": schema,
        "tier": "light", "retrieval_max_chunks_per_document": "2"})
    assert response.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        agent = Agent.objects.get(slug="refunds")
        version = agent.versions.get()
    assert response["Location"] == f"/agents/{agent.pk}/"
    assert agent.status == Agent.Status.DRAFT and agent.active_version is None
    assert (version.tier, version.temperature, version.max_output_tokens, version.history_window) == \
        ("light", 0.3, 400, 10)
    assert version.collection_ids == [collection.pk] and version.retrieval_top_k == 4
    assert version.retrieval_max_chunks_per_document == 2
    assert version.output_schema == {"type": "object", "properties": {"answer": {"type": "string"}}}
    page = client_a("owner").get(f"/agents/{agent.pk}/").content.decode()
    assert "Publish v1" in page and "Draft" in page


def test_the_create_form_shows_the_services_errors_on_their_fields(world: World, client_a: Any) -> None:
    _agent(world, "taken")
    client = client_a("owner")
    duplicate = client.post("/agents/new/", {**VERSION_POST, "slug": "taken", "name": "Again"})
    assert duplicate.status_code == 422 and 'data-testid="error-slug"' in duplicate.content.decode()
    bad_schema = client.post("/agents/new/", {**VERSION_POST, "slug": "fresh", "name": "Fresh",
                                              "output_format": "json_schema", "output_schema": '{"type": 5}'})
    assert bad_schema.status_code == 422 and 'data-testid="error-output_schema"' in bad_schema.content.decode()
    not_json = client.post("/agents/new/", {**VERSION_POST, "slug": "fresh", "name": "Fresh",
                                            "output_format": "json_schema", "output_schema": "{nope"})
    assert not_json.status_code == 422 and "Not valid JSON" in not_json.content.decode()
    with schema_context(world.tenant_a.schema_name):
        assert not Agent.objects.filter(slug="fresh").exists()


def test_edit_is_prefilled_and_saves_a_new_version_that_publish_and_rollback_switch(
        world: World, client_a: Any) -> None:
    agent = _agent(world)
    with schema_context(world.tenant_a.schema_name):
        collection = collection_create(principal=_system(world), name="Policies")
    client = client_a("operator")
    form = client.get(f"/agents/{agent.pk}/edit/").content.decode()
    assert "Answer briefly." in form and "Save new version" in form
    saved = client.post(f"/agents/{agent.pk}/edit/", {**VERSION_POST, "system_prompt": "Answer in detail.",
                                                      "collection_ids": [str(collection.pk)],
                                                      "retrieval_max_chunks_per_document": "1",
                                                      "note": "More detail"})
    assert saved.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        assert list(AgentVersion.objects.filter(agent=agent).values_list("number", "note")) == \
            [(2, "More detail"), (1, "Initial version")]
        assert Agent.objects.get(pk=agent.pk).active_version.number == 1  # type: ignore[union-attr]
    page = client.get(f"/agents/{agent.pk}/").content.decode()
    assert "Publish v2" in page
    assert client.post(f"/agents/{agent.pk}/versions/2/publish/").status_code == 302
    with schema_context(world.tenant_a.schema_name):
        assert Agent.objects.get(pk=agent.pk).active_version.number == 2  # type: ignore[union-attr]
    page = client.get(f"/agents/{agent.pk}/").content.decode()
    assert "Roll back to v1" in page
    assert "top-k 4 (at most 1 per document), hybrid" in page
    # Through htmx the agent's state fragment comes back, with a toast.
    rolled = client.post(f"/agents/{agent.pk}/versions/1/publish/", HTTP_HX_REQUEST="true")
    assert rolled.status_code == 200 and b"<html" not in rolled.content and b'id="agent-state"' in rolled.content
    assert "Rolled back to version 1" in rolled["HX-Trigger"]
    with schema_context(world.tenant_a.schema_name):
        assert Agent.objects.get(pk=agent.pk).active_version.number == 1  # type: ignore[union-attr]


def test_pause_resume_and_retire(world: World, client_a: Any) -> None:
    agent = _agent(world)
    client = client_a("owner")
    url = f"/agents/{agent.pk}/status/"
    for status in ("paused", "active", "retired"):
        assert client.post(url, {"status": status}).status_code == 302
        with schema_context(world.tenant_a.schema_name):
            assert Agent.objects.get(pk=agent.pk).status == status
    page = client.get(f"/agents/{agent.pk}/").content.decode()
    assert "Edit (new version)" not in page and "Publish v1" not in page
    assert client.post(url, {"status": "active"}).status_code == 409


def test_the_diff_shows_changed_fields_as_a_table_and_collapses_the_rest(world: World, client_a: Any) -> None:
    agent = _agent(world, system_prompt="Line one.\nLine two.\nLine three.")
    with schema_context(world.tenant_a.schema_name):
        agent_version_create(principal=_system(world), agent=agent,
                             config={"system_prompt": "Line one.\nLine 2.\nLine three.", "temperature": 0.9})
        agent_version_create(principal=_system(world), agent=agent,
                             config={"tier": "heavy", "retrieval_max_chunks_per_document": 3})
    html = client_a("viewer").get(f"/agents/{agent.pk}/diff/", {"a": 1, "b": 3}).content.decode()
    table = html[html.index('data-testid="diff-table"'):html.index('data-testid="unchanged-fields"')]
    assert 'data-field="system_prompt"' in table and 'data-field="temperature"' in table
    assert 'data-field="tier"' in table and 'data-field="rules"' not in table
    capped = table[table.index('data-field="retrieval_max_chunks_per_document"'):]
    assert "(no limit)\n</pre>" in capped[:600] and 'text-wrap">3\n</pre>' in capped[:600]
    assert "Line two." in table and "Line 2." in table and 'class="diff-replace"' in table
    assert 'class="diff-equal"' in table  # the unchanged lines around the change
    unchanged = html[html.index('data-testid="unchanged-fields"'):]
    assert "<details" in html and 'data-field="rules"' in unchanged and 'data-field="retrieval_mode"' in unchanged
    assert client_a("viewer").get(f"/agents/{agent.pk}/diff/", {"a": 1, "b": 9}).status_code == 404


def test_a_viewer_reads_everything_but_cannot_write(world: World, client_a: Any) -> None:
    agent = _agent(world)
    viewer = client_a("viewer")
    listing = viewer.get("/agents/").content.decode()
    assert "Helpdesk" in listing and "New agent" not in listing
    detail = viewer.get(f"/agents/{agent.pk}/").content.decode()
    assert "Answer briefly." in detail
    assert "Edit (new version)" not in detail and "Pause" not in detail and "/publish/" not in detail
    assert viewer.get("/agents/new/").status_code == 403
    assert viewer.get(f"/agents/{agent.pk}/edit/").status_code == 403
    assert viewer.post("/agents/new/", {**VERSION_POST, "slug": "mine", "name": "Mine"}).status_code == 403
    assert viewer.post(f"/agents/{agent.pk}/edit/", VERSION_POST).status_code == 403
    assert viewer.post(f"/agents/{agent.pk}/versions/1/publish/").status_code == 403
    assert viewer.post(f"/agents/{agent.pk}/status/", {"status": "paused"}).status_code == 403
    with schema_context(world.tenant_a.schema_name):
        assert Agent.objects.get(pk=agent.pk).status == Agent.Status.ACTIVE
        assert not Agent.objects.filter(slug="mine").exists()


def test_the_outsider_gets_nothing_of_tenant_a(world: World) -> None:
    agent = _agent(world)
    session = _session(world, agent)
    outsider = host_client("acme.localhost", world.user("outsider"))
    for url in ("/agents/", f"/agents/{agent.pk}/", f"/chat/{session.pk}/", "/chat/"):
        assert outsider.get(url).status_code == 403
    assert outsider.post(f"/agents/{agent.pk}/status/", {"status": "paused"}).status_code == 403
    # On their own tenant's host, tenant A's ids do not exist.
    at_home = host_client(HOST_B, world.user("outsider"))
    assert at_home.get(f"/agents/{agent.pk}/").status_code == 404
    assert at_home.get(f"/chat/{session.pk}/").status_code == 404


def test_the_agent_list_keeps_its_query_count(world: World, client_a: Any,
                                              django_assert_max_num_queries: Any) -> None:
    _agent(world, "first")
    client = client_a("owner")
    with django_assert_max_num_queries(12) as few:
        assert client.get("/agents/").status_code == 200
    baseline = len(few.captured_queries)
    for n in range(15):
        _agent(world, f"agent-{n}", publish=n % 2 == 0)
    with django_assert_max_num_queries(baseline):
        html = client.get("/agents/").content.decode()
    assert html.count("<tr id=\"agent-") == 16
    fragment = client.get("/agents/", {"status": "draft"}, HTTP_HX_REQUEST="true")
    assert b"<html" not in fragment.content and fragment.content.count(b"<tr id=\"agent-") == 7


# --- Chat ---------------------------------------------------------------------------------

def test_new_chat_opens_a_session_with_an_active_agent(world: World, client_a: Any) -> None:
    agent = _agent(world)
    draft = _agent(world, "draft", publish=False)
    client = client_a("viewer")
    page = client.get("/chat/").content.decode()
    assert f'value="{agent.pk}"' in page and f'value="{draft.pk}"' not in page
    response = client.post("/chat/", {"agent": agent.pk, "title": "Trip"})
    with schema_context(world.tenant_a.schema_name):
        session = ChatSession.objects.get(title="Trip")
    assert response.status_code == 302 and response["Location"] == f"/chat/{session.pk}/"
    assert session.user_id == world.user("viewer").pk
    assert client.post("/chat/", {"agent": draft.pk}).status_code == 422


def test_the_sessions_list_shows_only_the_callers_sessions_and_keeps_its_query_count(
        world: World, client_a: Any, django_assert_max_num_queries: Any) -> None:
    agent = _agent(world)
    mine = _session(world, agent, "operator")
    theirs = _session(world, agent, "owner")
    client = client_a("operator")
    with django_assert_max_num_queries(12) as few:
        html = client.get("/chat/").content.decode()
    baseline = len(few.captured_queries)
    assert f"/chat/{mine.pk}/" in html and f"/chat/{theirs.pk}/" not in html
    for _ in range(10):
        _session(world, _agent(world, f"other-{_}"), "operator")
    with django_assert_max_num_queries(baseline):
        html = client.get("/chat/").content.decode()
    assert html.count("<tr id=\"session-") == 11
    assert client.get(f"/chat/{theirs.pk}/").status_code == 404


def _turn_with_answer(world: World, session: ChatSession, question: str, answer: str, **turn: Any) -> Turn:
    with schema_context(world.tenant_a.schema_name):
        user = Message.objects.create(session=session, role=Message.Role.USER, content=question)
        reply = Message.objects.create(session=session, role=Message.Role.ASSISTANT, content=answer,
                                       citations=turn.pop("citations", []))
        version = session.agent.active_version
        assert version is not None
        return Turn.objects.create(session=session, agent_version=version, user_message=user,
                                   assistant_message=reply, status=Turn.Status.COMPLETED,
                                   deadline=user.created_at, **turn)


def test_the_chat_page_renders_history_sources_and_scores(world: World, client_a: Any) -> None:
    agent = _agent(world)
    session = _session(world, agent)
    source = {"n": 1, "chunk_id": 77, "document_id": 5, "title": "Refund policy", "page_number": 2,
              "heading_path": ["Refunds"], "score": 0.91}
    turn = _turn_with_answer(world, session, "How long?", "**30 days** [1]", citations=[source],
                             retrieved=[{**source, "vector_score": 0.8, "keyword_score": 3.5, "text": "30 days."}],
                             input_tokens=42, output_tokens=6)
    html = client_a("operator").get(f"/chat/{session.pk}/").content.decode()
    assert f'id="turn-{turn.pk}-body"' in html and "<strong>30 days</strong>" in html
    assert f'id="turn-{turn.pk}-status"' in html and f'id="turn-{turn.pk}-sources"' in html
    assert 'href="/kb/documents/5/#chunk-77"' in html
    assert "0.9100" in html and "0.8000" in html and "3.5000" in html
    assert 'ws-connect="/ws/chat/' in html and 'hx-ext="ws"' in html and "ext-ws.min.js" in html
    assert f'action="/chat/{session.pk}/send"' in html
    assert "Refunds</span>" in html


def test_a_source_does_not_repeat_its_title_as_its_first_heading(world: World, client_a: Any) -> None:
    session = _session(world, _agent(world))
    sources = [{"n": 1, "chunk_id": 7, "document_id": 5, "title": "Leave policy", "page_number": None,
                "heading_path": ["Leave policy", "Vacation"], "score": 0.9},
               {"n": 2, "chunk_id": 8, "document_id": 5, "title": "Leave policy", "page_number": None,
                "heading_path": ["Leave policy"], "score": 0.8}]
    _turn_with_answer(world, session, "Days off?", "25 [1]", citations=sources)
    html = client_a("operator").get(f"/chat/{session.pk}/").content.decode()
    assert '<span class="text-body-secondary">Vacation</span>' in html
    assert "Leave policy › Vacation" not in html
    assert 'text-body-secondary">Leave policy' not in html


def test_assistant_output_is_inert_on_the_chat_page(world: World, client_a: Any) -> None:
    agent = _agent(world)
    session = _session(world, agent)
    evil = "<script>alert(1)</script>\n\n[x](javascript:alert(1))\n\n<img src=x onerror=alert(1)>"
    _turn_with_answer(world, session, "<b>hi</b>", evil)
    with schema_context(world.tenant_a.schema_name):
        Message.objects.create(session=session, role=Message.Role.ASSISTANT, content=evil)  # a lone message too
    html = client_a("operator").get(f"/chat/{session.pk}/").content.decode()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"""href\s*=\s*["']?\s*javascript:""", html, re.IGNORECASE)
    assert "<img" not in html and "onerror=alert(1)>" not in html
    assert "<b>hi</b>" not in html and "&lt;b&gt;hi&lt;/b&gt;" in html
    # The socket's fragments are as inert.
    fragment = event_fragment({"event": "turn.completed", "turn_id": 1, "content": evil, "citations": []})
    assert "<script>alert" not in fragment and "<img" not in fragment
    assert not re.search(r"""href\s*=\s*["']?\s*javascript:""", fragment, re.IGNORECASE)
    delta = event_fragment({"event": "token.delta", "turn_id": 1, "offset": 0, "text": "<img src=x onerror=1>"})
    assert "<img" not in delta


def test_socket_fragments_target_the_turn_ids(world: World) -> None:
    accepted = event_fragment({"event": "message.accepted", "turn_id": 9, "user_message_id": 3, "content": "Hi?"})
    assert 'id="chat-log" hx-swap-oob="beforeend"' in accepted
    for part in ("turn-9-body", "turn-9-text", "turn-9-status", "turn-9-sources", "turn-9-question"):
        assert f'id="{part}"' in accepted
    assert 'name="action" value="cancel"' in accepted and 'name="turn_id" value="9"' in accepted
    failed = event_fragment({"event": "turn.failed", "turn_id": 9, "error": {"code": "x", "message": "Boom"}})
    assert "Boom" in failed and 'data-retry="9"' in failed and 'hx-swap-oob="true"' in failed
    cites = event_fragment({"event": "citations", "turn_id": 9, "citations": [
        {"n": 1, "chunk_id": 4, "document_id": 2, "title": "Doc"}], "retrieved": [
        {"n": 1, "chunk_id": 4, "document_id": 2, "title": "Doc", "score": 0.5, "vector_score": 0.4,
         "keyword_score": None}]})
    assert 'href="/kb/documents/2/#chunk-4"' in cites and "0.4000" in cites
    # Text from offset 0 (the snapshot a reconnecting socket gets) replaces; later deltas append.
    assert 'hx-swap-oob="innerHTML">Hello' in event_fragment(
        {"event": "token.delta", "turn_id": 9, "offset": 0, "text": "Hello"})
    assert 'hx-swap-oob="beforeend">, world' in event_fragment(
        {"event": "token.delta", "turn_id": 9, "offset": 5, "text": ", world"})


def test_the_plain_post_fallback_sends_and_stops(world: World, client_a: Any, settings: Any) -> None:
    agent = _agent(world)
    session = _session(world, agent)
    client = client_a("operator")
    sent = client.post(f"/chat/{session.pk}/send", {"content": "Where is my refund?"})
    assert sent.status_code == 302 and sent["Location"] == f"/chat/{session.pk}/"
    with schema_context(world.tenant_a.schema_name):
        turn = Turn.objects.get(session=session)
    page = client.get(f"/chat/{session.pk}/").content.decode()
    assert "Where is my refund?" in page and 'data-testid="stop"' in page
    busy = client.post(f"/chat/{session.pk}/send", {"content": "Again?"}, follow=True)
    assert "still being written" in busy.content.decode()
    assert client.post(f"/chat/{session.pk}/cancel", {"turn_id": turn.pk}).status_code == 302
    with schema_context(world.tenant_a.schema_name):
        assert Turn.objects.get(pk=turn.pk).status == Turn.Status.CANCELLED
    assert client_a("owner").post(f"/chat/{session.pk}/send", {"content": "Mine?"}).status_code == 404


def test_the_navigation_lists_agents_and_chat(world: World, client_a: Any) -> None:
    html = client_a("viewer").get("/agents/").content.decode()
    assert 'href="/agents/"' in html and 'href="/chat/"' in html and 'aria-current="page" href="/agents/"' in html
    auditor = client_a("auditor").get("/agents/").content.decode()
    assert 'href="/chat/"' not in auditor


def test_collections_are_offered_by_name_on_the_edit_form(world: World, client_a: Any) -> None:
    with schema_context(world.tenant_a.schema_name):
        collection = collection_create(principal=_system(world), name="Handbook")
        assert Collection.objects.filter(pk=collection.pk).exists()
    agent = _agent(world, collection_ids=[collection.pk])
    html = client_a("owner").get(f"/agents/{agent.pk}/edit/").content.decode()
    assert re.search(rf'value="{collection.pk}"[^>]*checked', html) and "Handbook" in html


def test_the_agent_page_names_its_pinned_endpoint(world: World, client_a: Any) -> None:
    from tenants.models import ModelEndpoint

    endpoint = ModelEndpoint.objects.create(name="Team GPU box", model="openai/box", api_base="http://10.0.0.9/v1",
                                            tenant=world.tenant_a)
    agent = _agent(world, endpoint_id=endpoint.pk)
    html = client_a("viewer").get(f"/agents/{agent.pk}/").content.decode()
    assert "pinned endpoint Team GPU box" in html and f"#{endpoint.pk}" not in html


def test_publishing_from_the_page_clears_the_created_as_a_draft_message(world: World, client_a: Any) -> None:
    client = client_a("owner")
    created = client.post("/agents/new/", {**VERSION_POST, "slug": "drafty", "name": "Drafty"}, follow=True)
    page = created.content.decode()
    messages = page.split('<div id="messages">', 1)[1].split("</div>\n", 1)[0]
    assert "created as a draft" in messages
    agent = _agent_by_slug(world, "drafty")
    published = client.post(f"/agents/{agent.pk}/versions/1/publish/", HTTP_HX_REQUEST="true")
    fragment = published.content.decode()
    # The new state, a toast, and the page's stale flash messages swapped out (htmx out-of-band).
    assert 'id="agent-state"' in fragment and "toast" in published["HX-Trigger"]
    assert '<div id="messages" hx-swap-oob="true"></div>' in fragment


def _agent_by_slug(world: World, slug: str) -> Agent:
    with schema_context(world.tenant_a.schema_name):
        return Agent.objects.get(slug=slug)
