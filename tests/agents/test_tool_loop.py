"""The tool loop: a scripted model calling tools, in the worker's code path (``turn_run`` and
``turn_resume`` run in this process, in the test's transaction), against a real HTTP tool server
reached through the staff egress allowlist. Every call is a ``ToolCall`` row; invalid calls are
never executed; writes park the turn until a decision; an approved call runs exactly once.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context

from agents.models import Agent, ApprovalRequest, Tool, ToolCall, Turn
from agents.runtime.orchestrator import turn_resume, turn_run
from agents.services import (
    agent_create,
    agent_version_publish,
    chat_message_send,
    chat_session_create,
    turn_cancel,
    turns_sweep,
)
from billing.models import UsageEvent
from compliance.models import AuditEvent
from config.errors import Conflict
from tenants.models import Membership, ModelEndpoint
from tenants.principal import Principal
from tests.agents.conftest import endpoint_create
from tests.conftest import World
from tests.scripted_llm import ScriptedCall, ScriptedLLM, Step

pytestmark = pytest.mark.django_db


# --- A tool service -------------------------------------------------------------------------


@dataclass
class ToolServer:
    """An HTTP service for HTTP tools: records every request; ``delay`` seconds before answering."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    delay: float = 0.0
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def tool_server(settings: Any) -> Iterator[ToolServer]:
    state = ToolServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            return

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            state.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "body": body,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
            time.sleep(state.delay)  # the scripted slowness of a tool, not a timing assertion
            data = json.dumps({"tickets": [{"id": 7, "title": "Laptop screen"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.server = server
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.EGRESS_ALLOWLIST = [f"127.0.0.1:{state.port}"]
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# --- An agent on the scripted model, and a turn run in this process ----------------------------


@dataclass
class Setup:
    world: World
    llm: ScriptedLLM
    model: str
    agent: Agent
    principal: Principal

    def ask(self, question: str = "Open a ticket for my broken laptop screen") -> Turn:
        session = chat_session_create(principal=self.principal, agent=Agent.objects.get(pk=self.agent.pk))
        return chat_message_send(principal=self.principal, session=session, content=question, enqueue=False)

    def requests(self) -> list[dict[str, Any]]:
        return self.llm.requests_for(self.model)


@pytest.fixture
def make_setup(world: World, scripted_llm: ScriptedLLM) -> Iterator[Callable[..., Setup]]:
    """``make_setup(steps, tools=[...], tool_choice="auto")``: in tenant A's schema, an agent on
    its own scripted model answering with ``steps``, offered ``tools`` (names)."""
    tenant = world.tenant_a
    with schema_context(tenant.schema_name):

        def make(steps: list[Step], *, tools: list[str], tool_choice: str = "auto") -> Setup:
            model = f"loop-{uuid.uuid4().hex[:10]}"
            scripted_llm.script(model, steps=steps)
            endpoint = endpoint_create(
                name=model, model=model, api_base=scripted_llm.api_base, tier="light", priority=9000
            )
            membership = Membership.objects.select_related("user", "tenant").get(
                user=world.user("operator"), tenant=tenant
            )
            principal = Principal.for_member(membership)
            system = Principal.system("tests", tenant=tenant)
            agent = agent_create(
                principal=system,
                slug=model,
                name=model,
                config={"system_prompt": "Use the tools.", "tier": "light", "endpoint_id": endpoint.pk,
                        "tools": tools, "tool_choice": tool_choice},
            )
            agent_version_publish(principal=system, version=agent.versions.get())
            return Setup(world=world, llm=scripted_llm, model=model, agent=agent, principal=principal)

        yield make


def http_tool(
    name: str,
    url: str,
    *,
    method: str = "GET",
    side_effect: str = "read",
    requires_approval: bool = False,
    timeout_seconds: float = 5.0,
) -> Tool:
    return Tool.objects.create(
        name=name,
        kind=Tool.Kind.HTTP,
        method=method,
        url=url,
        side_effect=side_effect,
        requires_approval=requires_approval,
        timeout_seconds=timeout_seconds,
        description=f"{name} tool",
        parameters={
            "type": "object",
            "properties": {"title": {"type": "string"}},
            "required": ["title"],
            "additionalProperties": False,
        },
        body_template={"title": "{title}"} if method == "POST" else None,
    )


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in request["messages"] if m.get("role") == "tool"]


ANSWER = Step(tokens=["Done", "."])


def calc(expression: str = "6*7") -> ScriptedCall:
    return ScriptedCall("calculator", json.dumps({"expression": expression}))


# --- Read calls ------------------------------------------------------------------------------


def test_a_read_call_runs_and_its_fenced_result_reaches_the_next_model_call(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup([Step(tool_calls=[calc()]), Step(tokens=["It is ", "42."])], tools=["calculator"])
    turn = setup.ask("What is 6*7?")

    assert turn_run(turn.pk) == "completed"

    first, second = setup.requests()
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator"]
    assert first["tool_choice"] == "auto"
    assistant = second["messages"][-2]
    assert assistant["role"] == "assistant" and assistant["tool_calls"][0]["function"]["name"] == "calculator"
    (result,) = tool_messages(second)
    assert result["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert "42" in result["content"] and "TOOL RESULT" in result["content"] and "untrusted" in result["content"]
    turn.refresh_from_db()
    assert turn.status == Turn.Status.COMPLETED
    assert turn.assistant_message is not None and turn.assistant_message.content == "It is 42."
    (call,) = ToolCall.objects.filter(turn=turn)
    assert (call.status, call.tool_name, call.arguments, call.sequence) == (
        ToolCall.Status.OK,
        "calculator",
        {"expression": "6*7"},
        1,
    )
    assert "42" in call.output_excerpt and call.duration_ms is not None
    assert UsageEvent.objects.filter(turn_id=turn.pk, kind=UsageEvent.Kind.TOOL_CALL).count() == 1
    # Both model calls are metered.
    assert UsageEvent.objects.filter(turn_id=turn.pk, kind=UsageEvent.Kind.LLM_INPUT_TOKENS).count() == 2
    assert AuditEvent.objects.filter(action="tool_call.executed", target_id=str(call.pk)).exists()


def test_an_http_read_tool_sends_one_request(make_setup: Callable[..., Setup], tool_server: ToolServer) -> None:
    http_tool("list_tickets", tool_server.url("/tickets?q={title}"))
    setup = make_setup(
        [Step(tool_calls=[ScriptedCall("list_tickets", '{"title": "screen"}')]), ANSWER], tools=["list_tickets"]
    )
    turn = setup.ask()

    assert turn_run(turn.pk) == "completed"

    (request,) = tool_server.requests
    assert request["path"] == "/tickets?q=screen"
    call = ToolCall.objects.get(turn=turn)
    assert call.status == ToolCall.Status.OK
    assert "Laptop screen" in tool_messages(setup.requests()[1])[0]["content"]


@pytest.mark.parametrize(
    ("name", "arguments", "code"),
    [
        ("calculator", '{"expression": "6*', "invalid_json"),
        ("calculator", '{"expression": 42}', "invalid_arguments"),
        ("no_such_tool", "{}", "unknown_tool"),
        ("current_time", "{}", "tool_not_allowed"),
    ],
)
def test_an_invalid_call_is_never_executed_and_the_model_is_told(
    make_setup: Callable[..., Setup], name: str, arguments: str, code: str
) -> None:
    setup = make_setup([Step(tool_calls=[ScriptedCall(name, arguments)]), ANSWER], tools=["calculator"])
    turn = setup.ask()

    assert turn_run(turn.pk) == "completed"

    call = ToolCall.objects.get(turn=turn)
    assert (call.status, call.error_code, call.arguments_raw) == (ToolCall.Status.INVALID, code, arguments)
    assert call.duration_ms is None and call.started_at is None  # never executed
    (told,) = tool_messages(setup.requests()[1])
    assert told["content"].startswith(f"Error ({code}):")
    turn.refresh_from_db()
    assert turn.loop_state == {"model_calls": 2, "tool_calls": 1, "invalid_calls": 1}
    assert not UsageEvent.objects.filter(turn_id=turn.pk, kind=UsageEvent.Kind.TOOL_CALL).exists()
    assert AuditEvent.objects.filter(action="tool_call.refused", target_id=str(call.pk)).exists()


def test_the_loop_stops_at_the_tool_call_bound_with_a_readable_answer(
    make_setup: Callable[..., Setup], settings: Any
) -> None:
    settings.AGENT_MAX_TOOL_CALLS = 3
    # The model asks for two calls per answer, forever.
    setup = make_setup([Step(tool_calls=[calc("1+1"), calc("2+2")])], tools=["calculator"])
    turn = setup.ask()

    assert turn_run(turn.pk) == "completed"

    assert ToolCall.objects.filter(turn=turn).count() == 3
    assert len(setup.requests()) == 2  # the fourth call is not run and the model not asked again
    turn.refresh_from_db()
    assert turn.assistant_message is not None
    assert "stopped after 3 tool calls" in turn.assistant_message.content


def test_a_tool_that_times_out_is_an_error_the_model_reads(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    tool_server.delay = 2.0
    http_tool("slow", tool_server.url("/slow"), timeout_seconds=0.3)
    setup = make_setup([Step(tool_calls=[ScriptedCall("slow", '{"title": "x"}')]), ANSWER], tools=["slow"])
    turn = setup.ask()

    assert turn_run(turn.pk) == "completed"

    call = ToolCall.objects.get(turn=turn)
    assert (call.status, call.error_code) == (ToolCall.Status.ERROR, "tool_timeout")
    assert "tool_timeout" in tool_messages(setup.requests()[1])[0]["content"]


def test_an_http_tool_aimed_at_a_private_address_is_refused_by_the_guard(
    make_setup: Callable[..., Setup], tool_server: ToolServer, settings: Any
) -> None:
    settings.EGRESS_ALLOWLIST = []
    http_tool("internal", tool_server.url("/admin"))
    setup = make_setup([Step(tool_calls=[ScriptedCall("internal", '{"title": "x"}')]), ANSWER], tools=["internal"])
    turn = setup.ask()

    assert turn_run(turn.pk) == "completed"

    assert tool_server.requests == []
    call = ToolCall.objects.get(turn=turn)
    assert (call.status, call.error_code) == (ToolCall.Status.ERROR, "egress_denied")


# --- Approval --------------------------------------------------------------------------------


def _write_setup(make_setup: Callable[..., Setup], tool_server: ToolServer, after: list[Step] | None = None) -> Setup:
    http_tool("create_ticket", tool_server.url("/tickets"), method="POST", side_effect="write", requires_approval=True)
    setup = make_setup(
        [
            Step(tool_calls=[ScriptedCall("create_ticket", '{"title": "Broken screen"}')]),
            *(after or [Step(tokens=["Ticket ", "opened."])]),
        ],
        tools=["create_ticket", "calculator"],
    )
    return setup


def _decide(turn: Turn, status: str, *, reason: str = "", by: str = "Admin") -> ApprovalRequest:
    """Write a decision the way ``approval_decide`` does (request and call), without its checks."""
    approval = ApprovalRequest.objects.get(turn=turn)
    ApprovalRequest.objects.filter(pk=approval.pk).update(
        status=status, decided_at=timezone.now(), reason=reason, decided_by_label=by
    )
    ToolCall.objects.filter(pk=approval.tool_call_id).update(status=status)
    return ApprovalRequest.objects.get(pk=approval.pk)


def test_a_write_call_parks_the_turn_and_sends_nothing(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    setup = _write_setup(make_setup, tool_server)
    turn = setup.ask()

    assert turn_run(turn.pk) == "awaiting_approval"

    assert tool_server.requests == []
    assert len(setup.requests()) == 1
    turn.refresh_from_db()
    assert turn.status == Turn.Status.AWAITING_APPROVAL
    call = ToolCall.objects.get(turn=turn)
    assert call.status == ToolCall.Status.AWAITING_APPROVAL
    approval = ApprovalRequest.objects.get(turn=turn)
    assert (approval.status, approval.tool_name, approval.arguments) == (
        ApprovalRequest.Status.PENDING,
        "create_ticket",
        {"title": "Broken screen"},
    )
    assert approval.tool_call_id == call.pk
    assert approval.requested_by_user_id == setup.world.user("operator").pk
    assert approval.excerpt[-1] == {"role": "user", "content": "Open a ticket for my broken laptop screen"}
    assert approval.expires_at > timezone.now()
    assert turn.loop_state["messages"][-1]["tool_calls"][0]["function"]["name"] == "create_ticket"
    assert turn.loop_state["pending_calls"] == []
    assert AuditEvent.objects.filter(action="approval.requested", target_id=str(approval.pk)).exists()
    # The session takes no new message meanwhile.
    with pytest.raises(Conflict) as refused:
        chat_message_send(principal=setup.principal, session=turn.session, content="Hello?", enqueue=False)
    assert refused.value.code == "turn_in_progress"


def test_an_approved_call_runs_exactly_once_and_the_turn_completes(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    setup = _write_setup(make_setup, tool_server)
    turn = setup.ask()
    turn_run(turn.pk)
    assert turn_resume(turn.pk) == "skipped"  # pending: nothing to resume
    _decide(turn, "approved")

    assert turn_resume(turn.pk) == "completed"
    assert turn_resume(turn.pk) == "skipped"  # a redelivered task

    (request,) = tool_server.requests
    assert (request["method"], request["path"], json.loads(request["body"])) == (
        "POST",
        "/tickets",
        {"title": "Broken screen"},
    )
    call = ToolCall.objects.get(turn=turn)
    # Stable for the call, so the service can drop a repeat.
    assert request["headers"]["idempotency-key"] == f"{setup.world.tenant_a.schema_name}:{turn.pk}:{call.pk}"
    assert call.status == ToolCall.Status.OK
    turn.refresh_from_db()
    assert turn.status == Turn.Status.COMPLETED
    assert turn.assistant_message is not None and turn.assistant_message.content == "Ticket opened."
    resumed = setup.requests()[1]
    assert "Laptop screen" in tool_messages(resumed)[0]["content"]


def test_a_rejected_call_is_not_sent_and_the_model_is_told_by_whom_and_why(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    setup = _write_setup(make_setup, tool_server, after=[Step(tokens=["I could not open it."])])
    turn = setup.ask()
    turn_run(turn.pk)
    _decide(turn, "rejected", reason="Use the hardware form", by="Ada Admin")

    assert turn_resume(turn.pk) == "completed"

    assert tool_server.requests == []
    (told,) = tool_messages(setup.requests()[1])
    assert "rejected by Ada Admin: Use the hardware form" in told["content"]
    assert ToolCall.objects.get(turn=turn).status == ToolCall.Status.REJECTED


def test_the_calls_after_a_parked_one_run_after_the_decision(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    http_tool("create_ticket", tool_server.url("/tickets"), method="POST", side_effect="write", requires_approval=True)
    setup = make_setup(
        [Step(tool_calls=[ScriptedCall("create_ticket", '{"title": "A"}'), calc("1+2")]), ANSWER],
        tools=["create_ticket", "calculator"],
    )
    turn = setup.ask()
    turn_run(turn.pk)
    turn.refresh_from_db()
    assert len(turn.loop_state["pending_calls"]) == 1
    _decide(turn, "approved")

    assert turn_resume(turn.pk) == "completed"

    calls = list(ToolCall.objects.filter(turn=turn).order_by("sequence"))
    assert [(c.tool_name, c.status) for c in calls] == [("create_ticket", "ok"), ("calculator", "ok")]
    assert [m["tool_call_id"] for m in tool_messages(setup.requests()[1])] == [c.call_id for c in calls]


def test_a_lost_resume_task_is_recovered_by_the_sweeper(
    make_setup: Callable[..., Setup], tool_server: ToolServer, monkeypatch: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from agents import tasks

    sent: list[list[int]] = []
    # The broker is the process boundary: record what the sweeper sends instead of queueing it.
    monkeypatch.setattr(tasks.turn_resume_task, "apply_async", lambda args, queue: sent.append(args))
    setup = _write_setup(make_setup, tool_server)
    turn = setup.ask()
    turn_run(turn.pk)
    approval = _decide(turn, "approved")  # ... and its resume task is lost
    assert approval.decided_at is not None

    assert turns_sweep(now=approval.decided_at).resumed == 0  # within the grace period
    with django_capture_on_commit_callbacks(execute=True):
        result = turns_sweep(now=approval.decided_at + dt.timedelta(seconds=60))

    assert result.resumed == 1 and sent == [[turn.pk]]
    assert turn_resume(turn.pk) == "completed"
    assert len(tool_server.requests) == 1
    assert turns_sweep(now=timezone.now() + dt.timedelta(seconds=60)).resumed == 0


def test_a_call_stuck_running_when_its_worker_died_is_never_run_again(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    setup = _write_setup(make_setup, tool_server)
    turn = setup.ask()
    turn_run(turn.pk)
    _decide(turn, "approved")
    # A worker claimed the turn and the call, then died before recording anything.
    long_ago = timezone.now() - dt.timedelta(minutes=5)
    Turn.objects.filter(pk=turn.pk).update(status=Turn.Status.RUNNING, heartbeat_at=long_ago)
    ToolCall.objects.filter(turn=turn).update(status=ToolCall.Status.RUNNING)

    assert turns_sweep().failed == 1
    assert turn_resume(turn.pk) == "skipped"

    assert tool_server.requests == []
    call = ToolCall.objects.get(turn=turn)
    assert (call.status, call.error_code) == (ToolCall.Status.ERROR, "worker_lost")
    turn.refresh_from_db()
    assert (turn.status, turn.error_code) == (Turn.Status.FAILED, "worker_lost")


def test_an_approved_call_another_worker_claimed_is_not_run_again(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    setup = _write_setup(make_setup, tool_server)
    turn = setup.ask()
    turn_run(turn.pk)
    _decide(turn, "approved")
    # The call was claimed already (approved -> running) by a task that got no further.
    ToolCall.objects.filter(turn=turn).update(status=ToolCall.Status.RUNNING)

    assert turn_resume(turn.pk) == "completed"

    assert tool_server.requests == []
    (told,) = tool_messages(setup.requests()[1])
    assert "unknown" in told["content"] and "not run again" in told["content"]


def test_cancelling_a_parked_turn_cancels_its_approval_and_rejects_its_call(
    make_setup: Callable[..., Setup], tool_server: ToolServer
) -> None:
    setup = _write_setup(make_setup, tool_server)
    turn = setup.ask()
    turn_run(turn.pk)

    turn_cancel(principal=setup.principal, turn=turn)

    turn.refresh_from_db()
    assert turn.status == Turn.Status.CANCELLED and turn.finished_at is not None
    assert ApprovalRequest.objects.get(turn=turn).status == ApprovalRequest.Status.CANCELLED
    assert ToolCall.objects.get(turn=turn).status == ToolCall.Status.REJECTED
    _decide(turn, "approved")  # a decision racing the cancel changes nothing
    assert turn_resume(turn.pk) == "skipped"
    assert tool_server.requests == []


# --- Both streaming paths read streamed tool calls --------------------------------------------


@pytest.mark.parametrize("path", ["direct", "litellm"])
def test_both_stream_paths_assemble_streamed_tool_calls(scripted_llm: ScriptedLLM, path: str) -> None:
    from agents.runtime import llm
    from config.crypto import secret_encrypt
    from tenants.models import ModelEndpoint

    name = f"calls-{uuid.uuid4().hex[:8]}"
    arguments = '{"expression": "(2 + 3) * 4 / 5", "note": "a long enough argument to split"}'
    scripted_llm.script(
        name,
        steps=[
            Step(
                tokens=["Let me check."],
                tool_calls=[
                    ScriptedCall("calculator", arguments, id="call_a"),
                    ScriptedCall("current_time", "{}", id="call_b"),
                ],
            )
        ],
    )
    endpoint = ModelEndpoint(
        name=name,
        model=f"openai/{name}",
        api_base=scripted_llm.api_base,
        api_key_encrypted=secret_encrypt(""),
        timeout_seconds=10,
    )
    stream = llm._stream_direct if path == "direct" else llm._stream_one
    result = llm.StreamResult(endpoint=endpoint)
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    stream(
        endpoint,
        [{"role": "user", "content": "hi"}],
        temperature=0.0,
        max_tokens=50,
        response_format=None,
        on_delta=lambda text: None,
        should_stop=lambda: False,
        result=result,
        tools=tools,
        tool_choice="required",
    )

    assert result.finish_reason == "tool_calls"
    assert result.text == "Let me check."
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_a", "calculator", arguments),
        ("call_b", "current_time", "{}"),
    ]
    sent = scripted_llm.requests_for(name)[-1]
    assert sent["tools"] == tools and sent["tool_choice"] == "required"


# --- Query count -------------------------------------------------------------------------------


def test_a_turn_with_one_read_call_makes_a_bounded_number_of_queries(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup([Step(tool_calls=[calc()]), ANSWER], tools=["calculator"])
    turn = setup.ask()

    with CaptureQueriesContext(connection) as queries:
        assert turn_run(turn.pk) == "completed"

    # Claim, prepare, one call (row, parse, record with usage and audit), two meterings, finish.
    assert len(queries) <= 60, "\n".join(q["sql"][:120] for q in queries.captured_queries)


# --- Two resume tasks at once ------------------------------------------------------------------


def test_two_resume_tasks_at_once_execute_the_approved_call_once(
    world: World, scripted_llm: ScriptedLLM, tool_server: ToolServer, portal: Any
) -> None:
    """Committed rows (unique names), then two threads, each on its own database connection, call
    ``turn_resume`` for the same turn at the same moment (a barrier): a redelivered task racing
    the original one, or the sweeper's re-enqueue racing a slow task."""
    from tests.agents.conftest import committed

    tenant = world.tenant_a
    model = f"race-{uuid.uuid4().hex[:10]}"
    write = f"create_{uuid.uuid4().hex[:8]}"
    scripted_llm.script(
        model, steps=[Step(tool_calls=[ScriptedCall(write, '{"title": "Broken screen"}')]), Step(tokens=["Opened."])]
    )

    def park() -> int:
        endpoint = endpoint_create(name=model, model=model, api_base=scripted_llm.api_base, tier="light", priority=9000)
        with schema_context(tenant.schema_name):
            http_tool(write, tool_server.url("/tickets"), method="POST", side_effect="write", requires_approval=True)
            system = Principal.system("tests", tenant=tenant)
            agent = agent_create(
                principal=system,
                slug=model,
                name=model,
                config={"system_prompt": "Use the tools.", "tier": "light", "endpoint_id": endpoint.pk,
                        "tools": [write]},
            )
            agent_version_publish(principal=system, version=agent.versions.get())
            membership = Membership.objects.select_related("user", "tenant").get(
                user=world.user("operator"), tenant=tenant
            )
            principal = Principal.for_member(membership)
            session = chat_session_create(principal=principal, agent=Agent.objects.get(pk=agent.pk))
            turn = chat_message_send(principal=principal, session=session, content="Open a ticket", enqueue=False)
            assert turn_run(turn.pk) == "awaiting_approval"
            _decide(turn, "approved")
            return int(turn.pk)

    turn_id = committed(park)
    barrier = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def resume(n: int) -> None:
        try:
            with schema_context(tenant.schema_name):
                barrier.wait(timeout=30)
                outcomes[n] = turn_resume(turn_id)
        except BaseException as exc:  # noqa: BLE001 - returned for the assertions
            outcomes[n] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=resume, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(tool_server.requests) == 1
    assert sorted(map(str, outcomes)) == ["completed", "skipped"]

    def rows() -> tuple[list[tuple[str, int | None]], int, int]:
        with schema_context(tenant.schema_name):
            calls = list(ToolCall.objects.filter(turn_id=turn_id).values_list("status", "duration_ms"))
            executed = AuditEvent.objects.filter(action="tool_call.executed", payload__turn_id=turn_id).count()
            metered = UsageEvent.objects.filter(turn_id=turn_id, kind=UsageEvent.Kind.TOOL_CALL).count()
            return calls, executed, metered

    calls, executed, metered = committed(rows)
    committed(lambda: ModelEndpoint.objects.filter(name=model).delete())
    assert [status for status, _ in calls] == [ToolCall.Status.OK]
    assert (executed, metered) == (1, 1)  # the call ran and was recorded once
