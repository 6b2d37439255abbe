"""The tool loop's surfaces through the live server and Celery worker: SSE relays tool events
and ends at ``approval.requested``; the waiting POST answers 202 with the parked turn; the
OpenAI-compatible endpoint runs the loop server side and streams only the answer's text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django_tenants.utils import schema_context

from agents.models import Tool
from agents.services import agent_create, agent_version_publish
from tenants.models import ModelEndpoint
from tenants.principal import Principal
from tests.agents.conftest import committed, endpoint_create, sse_events
from tests.live import Portal
from tests.scripted_llm import ScriptedCall, ScriptedLLM, Step

pytestmark = pytest.mark.django_db(transaction=False)


@pytest.fixture
def live(portal: Portal, celery_worker: Any) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"http://127.0.0.1:{portal.port}",
        timeout=60,
        headers={"Host": f"acme.localhost:{portal.port}", "Authorization": f"Bearer {portal.world.key_a}"},
    ) as client:
        yield client


_endpoints: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _endpoints_removed(django_db_blocker: Any) -> Iterator[None]:
    """The platform endpoints this module commits go at its end: a later test's tier must not
    fall back to them."""
    yield
    with django_db_blocker.unblock():
        committed(lambda: ModelEndpoint.objects.filter(pk__in=_endpoints).delete())


def _agent(portal: Portal, llm: ScriptedLLM, steps: list[Step]) -> tuple[str, str]:
    """A committed agent offered ``calculator`` and a write tool needing approval (unique name,
    aimed at a closed port: it must never be called); returns (slug, write tool name)."""
    name = f"live-loop-{uuid.uuid4().hex[:8]}"
    write = f"create_{uuid.uuid4().hex[:8]}"
    llm.script(name, steps=steps)
    tenant = portal.world.tenant_a

    def create() -> None:
        endpoint = endpoint_create(name=name, model=name, api_base=llm.api_base, tier="light", priority=9000)
        _endpoints.append(endpoint.pk)
        with schema_context(tenant.schema_name):
            Tool.objects.create(
                name=write,
                kind=Tool.Kind.HTTP,
                method="POST",
                url="http://127.0.0.1:9/t",
                side_effect="write",
                requires_approval=True,
                parameters={"type": "object", "properties": {"title": {"type": "string"}}},
            )
            system = Principal.system("tests", tenant=tenant)
            agent = agent_create(
                principal=system,
                slug=name,
                name=name,
                config={"system_prompt": "Use the tools.", "tier": "light", "endpoint_id": endpoint.pk,
                        "tools": ["calculator", write]},
            )
            agent_version_publish(principal=system, version=agent.versions.get())

    committed(create)
    return name, write


def _steps(write: str | None = None) -> list[Step]:
    calc = ScriptedCall("calculator", json.dumps({"expression": "6*7"}))
    return [Step(tool_calls=[calc]), Step(tool_calls=[ScriptedCall(write or "x", '{"title": "Broken screen"}')])]


def _session(live: httpx.Client, slug: str) -> int:
    response = live.post("/api/v1/sessions", json={"agent": slug})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_sse_relays_tool_events_and_ends_at_the_approval_request(
    live: httpx.Client, portal: Portal, scripted_llm: ScriptedLLM
) -> None:
    slug, write = _agent(portal, scripted_llm, [])
    scripted_llm.script(slug, steps=_steps(write))
    session_id = _session(live, slug)
    with live.stream(
        "POST", f"/api/v1/sessions/{session_id}/messages", json={"content": "Open a ticket", "stream": True}
    ) as response:
        events = sse_events(response.read().decode())

    names = [e["event"] for e in events]
    assert names[-1] == "approval.requested", names
    assert names.count("tool.call") == 2 and "tool.result" in names
    result = next(e for e in events if e["event"] == "tool.result")
    assert result["status"] == "ok" and "42" in result["excerpt"]
    assert events[-1]["tool"] == write and events[-1]["arguments"] == {"title": "Broken screen"}
    turn = live.get(f"/api/v1/sessions/{session_id}/turns/{events[-1]['turn_id']}").json()
    assert turn["status"] == "awaiting_approval" and turn["approval_id"] == events[-1]["approval_id"]
    assert [(c["tool"], c["status"]) for c in turn["tool_calls"]] == [
        ("calculator", "ok"),
        (write, "awaiting_approval"),
    ]


def test_a_waiting_post_answers_202_with_the_parked_turn(
    live: httpx.Client, portal: Portal, scripted_llm: ScriptedLLM
) -> None:
    slug, write = _agent(portal, scripted_llm, [])
    scripted_llm.script(slug, steps=_steps(write))
    session_id = _session(live, slug)

    response = live.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "Open a ticket"})

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "awaiting_approval" and body["approval_id"]
    again = live.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "Hello?"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "turn_in_progress"


def test_the_openai_endpoint_runs_the_loop_and_streams_only_the_answer(
    live: httpx.Client, portal: Portal, scripted_llm: ScriptedLLM
) -> None:
    slug, write = _agent(portal, scripted_llm, [])
    scripted_llm.script(slug, steps=[_steps()[0], Step(tokens=["It is ", "42."])])

    with live.stream(
        "POST",
        "/api/v1/openai/chat/completions",
        json={"model": slug, "stream": True, "messages": [{"role": "user", "content": "6*7?"}]},
    ) as response:
        chunks = sse_events(response.read().decode())

    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    assert text == "It is 42."
    assert all("tool_calls" not in c["choices"][0]["delta"] for c in chunks if c.get("choices"))

    scripted_llm.script(slug, steps=_steps(write))
    parked = live.post(
        "/api/v1/openai/chat/completions",
        json={"model": slug, "messages": [{"role": "user", "content": "Open a ticket"}]},
    )
    assert parked.status_code == 409
    error = parked.json()["error"]
    assert error["code"] == "awaiting_approval" and error["details"]["approval_id"]
