"""Benchmark: what the tool loop adds to a turn, and how fast an approved call resumes its turn.

Prints figures; asserts nothing. Sets itself up like ``bench_chat.py``: a fresh database
``bench_tools`` on the embedded PostgreSQL (or ``BENCH_DATABASE_URL``), its own Redis database
(``BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/13``), ``daphne`` and a Celery worker
(thread pool, as the Procfile has) as subprocesses, the scripted model server
(``tests.scripted_llm``) in a process of its own, and a small ticket service (the write tool's
target, answering at once) in this process, named by ``EGRESS_ALLOWLIST``.

1. Tool-loop overhead: each turn's first model call streams one ``calculator`` call (a builtin
   read tool: no network, answers in well under a millisecond), the second a short text answer.
   Overhead = (arrival of the turn's second model request at the scripted server) - (the server
   wrote the first call's last tool-call delta), both read by the server process
   (``time.time()``). It covers the end of the stream, the ``ToolCall`` row, argument parsing,
   the execution, the usage and audit events, the ``tool.call`` / ``tool.result`` publishes, the
   next prompt and the next HTTP request. At 1 turn (sequential) and at 20 concurrent turns (the
   server holds the 20 first answers until all 20 requests are in, then releases them together:
   the worst case, all tool calls at once). Target: p95 <= 25 ms.
2. Approval-to-resume latency: a turn calls ``create_ticket`` (HTTP write, requires approval)
   and parks; the client (a WebSocket on the chat socket, ``?format=json``) sees
   ``approval.requested``; an approver (another member, role ``approver``) decides it with
   ``agents.approval_services.approval_decide``. Latency = (client receives the resumed answer's
   first ``token.delta``) - (the decision committed: an ``on_commit`` callback registered before
   the decision's own, so before the resume task is sent). The scripted model's own first-token
   time (its configured delay, measured at the server) is reported separately and subtracted.
   Target: p95 <= 300 ms plus the model's first-token time. One approval at a time.

Both parts also split the time into steps (from the rows' timestamps, the same clock).

Usage: ``.venv/bin/python tests/bench/bench_tools.py [--turns-1 N] [--rounds-20 N] [--approvals N]
[--model-ttft-ms MS]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")
# Own Redis database and key prefix, so that no other worker takes the bench's turns.
os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
os.environ["CACHE_KEY_PREFIX"] = "benchtools"

from tests.bench.bench_retrieval import prepare_database  # noqa: E402  (after the environment is set)
from tests.bench.live import (  # noqa: E402
    ServerProcess,
    free_port,
    percentiles,
    start_daphne,
    start_workers,
    stop,
)
from tests.scripted_llm import ScriptedCall, ScriptedLLM, Step  # noqa: E402

MARKER_RE = re.compile(r"\[bench:([0-9a-f]{12})\]")
LOOP_MODEL = "bench-loop"
APPROVE_MODEL = "bench-approve"
WRITE_TOOL = "create_ticket"
WAIT_S = 30.0


# --- The scripted model, timed per turn -------------------------------------------------------


class GatedStep:
    """A ``Step`` whose "first-token delay" waits at the server's gate: the answers of a round's
    concurrent turns are held until all of them have arrived, then written together. (The
    scripted server reads ``first_token_delay`` once per request, just before writing.)"""

    def __init__(self, owner: TimedToolLLM, step: Step) -> None:
        self.owner = owner
        self.tokens = step.tokens
        self.tool_calls = step.tool_calls
        self.delay = step.first_token_delay

    @property
    def first_token_delay(self) -> float:
        gate = self.owner.gate
        if gate is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                gate.wait(timeout=10)
        return self.delay


class TimedToolLLM(ScriptedLLM):
    """``ScriptedLLM`` recording, per turn (the ``[bench:<hex>]`` marker in the user's message),
    when each model request arrived, when each tool-calling answer wrote its last tool-call
    delta and when each text answer wrote its first token. Each request runs in its own handler
    thread, so the thread identifies the request."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: threading.Barrier | None = None
        self.turns: dict[str, dict[str, list[float]]] = {}
        self._current: dict[int, str] = {}
        owner = self

        def marked(body: dict[str, Any]) -> str:
            # The question is the last user message (earlier turns of the session come before it).
            for message in reversed(body.get("messages") or []):
                if message.get("role") == "user":
                    found = MARKER_RE.search(str(message.get("content") or ""))
                    if found:
                        return found.group(1)
            return ""

        def record(kind: str, at: float) -> None:
            marker = owner._current.get(threading.get_ident())
            if marker:
                owner.turns.setdefault(marker, {}).setdefault(kind, []).append(at)

        class Requests(list):  # type: ignore[type-arg]
            def append(self, body: Any) -> None:
                super().append(body)
                owner._current[threading.get_ident()] = marked(body)

        class Arrivals(list):  # type: ignore[type-arg]
            def append(self, item: Any) -> None:
                super().append(item)
                record("arrived", float(item[1]))

        class ToolDeltas(list):  # type: ignore[type-arg]
            def append(self, item: Any) -> None:
                super().append(item)
                record("last_tool_delta", float(item[1]))

        class FirstTokens(list):  # type: ignore[type-arg]
            def append(self, sent: Any) -> None:
                super().append(sent)
                record("first_token", float(sent))

        self.requests = Requests()
        self.request_arrived = Arrivals()
        self.last_tool_delta_sent = ToolDeltas()
        self.first_token_sent = FirstTokens()

    def _handler(self) -> Any:
        base = super()._handler()
        owner = self

        class Timed(base):  # type: ignore[misc,valid-type]
            def do_GET(self) -> None:
                path = self.path.rstrip("/")
                if path.endswith("/_turns"):
                    self._json(200, owner.turns)
                elif "/_gate/" in path:
                    parties = int(path.rsplit("/", 1)[1])
                    owner.gate = threading.Barrier(parties) if parties > 1 else None
                    self._json(200, {"gate": parties})
                else:
                    super().do_GET()

            def do_POST(self) -> None:
                try:
                    super().do_POST()
                finally:
                    owner._current.pop(threading.get_ident(), None)

        return Timed


def serve_scripted(args: argparse.Namespace) -> None:
    """``--serve-scripted``: run the timed scripted server until terminated; print its port first."""
    server = TimedToolLLM()
    calc = Step(tool_calls=[ScriptedCall("calculator", json.dumps({"expression": "6*7"}))])
    server.script(LOOP_MODEL, steps=[GatedStep(server, calc), Step(tokens=["It is ", "42."])], steps_by="tool_rounds")
    ticket = Step(tool_calls=[ScriptedCall(WRITE_TOOL, json.dumps({"title": "Broken screen"}))])
    answer = Step(tokens=[f" t{i:02d}" for i in range(20)], first_token_delay=args.model_ttft_ms / 1000)
    server.script(APPROVE_MODEL, steps=[ticket, answer], steps_by="tool_rounds", token_interval=0.005)
    print(server.port, flush=True)
    server._server.serve_forever()


class RemoteModel(ServerProcess):
    """The ``TimedToolLLM`` in a process of its own (``bench_tools.py --serve-scripted``)."""

    def __init__(self, *, model_ttft_ms: float, log: Path) -> None:
        argv = [sys.executable, __file__, "--serve-scripted", "--model-ttft-ms", str(model_ttft_ms)]
        super().__init__(argv, log)
        self.api_base = f"http://127.0.0.1:{self.port}/v1"

    def turns(self) -> dict[str, dict[str, list[float]]]:
        return dict(self.get_json("/v1/_turns"))

    def gate(self, parties: int) -> None:
        self.get_json(f"/v1/_gate/{parties}")


# --- The ticket service (the write tool's target) ----------------------------------------------


def ticket_service() -> ThreadingHTTPServer:
    """``POST /tickets`` answers 201 with a new ticket id at once; runs in a thread of this process."""
    counter = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            return

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            counter["n"] += 1
            data = json.dumps({"id": counter["n"], "status": "open"}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- Rows -------------------------------------------------------------------------------------


@dataclass
class Setup:
    schema: str
    host: str
    cookie: str
    owner: Any  # Principal of the tenant's owner (asks)
    approver: Any  # Principal of a member with the approver role (decides)
    agents: dict[str, int] = field(default_factory=dict)  # model -> agent id


def build_world(api_base: str, ticket_port: int) -> Setup:
    """A tenant with its owner signed in and an approver; the ``create_ticket`` HTTP tool; one
    agent per scripted model, offered ``calculator`` and ``create_ticket`` respectively."""
    from django.db import connection
    from django.test import Client
    from django_tenants.utils import schema_context

    from agents.models import Tool
    from agents.services import agent_create, agent_version_publish
    from config.crypto import secret_encrypt
    from tenants.models import Domain, Membership, ModelEndpoint, User
    from tenants.principal import Principal
    from tenants.services.provisioning import tenant_create

    system = Principal.system("bench")
    tenant = tenant_create(
        actor=system, slug="benchtools", name="Bench tools", owner_email="owner@bench.example"
    ).tenant
    host = Domain.objects.get(tenant=tenant, is_primary=True).domain
    owner = User.objects.get(email="owner@bench.example")
    approver = User.objects.create_user(email="approver@bench.example", password=uuid.uuid4().hex)
    Membership.objects.create(user=approver, tenant=tenant, role="approver")
    client = Client()
    client.force_login(owner)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    with schema_context(tenant.schema_name):
        members = Membership.objects.select_related("user", "tenant")
        setup = Setup(
            schema=tenant.schema_name,
            host=host,
            cookie=cookie,
            owner=Principal.for_member(members.get(user=owner, tenant=tenant)),
            approver=Principal.for_member(members.get(user=approver, tenant=tenant)),
        )
        Tool.objects.create(
            name=WRITE_TOOL,
            kind=Tool.Kind.HTTP,
            method="POST",
            url=f"http://127.0.0.1:{ticket_port}/tickets",
            side_effect="write",
            requires_approval=True,
            timeout_seconds=5.0,
            description="Open a ticket",
            parameters={
                "type": "object",
                "properties": {"title": {"type": "string"}},
                "required": ["title"],
                "additionalProperties": False,
            },
            body_template={"title": "{title}"},
        )
        principal = Principal.system("bench", tenant=tenant)
        for model, tools in ((LOOP_MODEL, ["calculator"]), (APPROVE_MODEL, [WRITE_TOOL])):
            endpoint = ModelEndpoint.objects.create(
                name=model,
                model=f"openai/{model}",
                api_base=api_base,
                tier="light",
                priority=1,
                api_key_encrypted=secret_encrypt(""),
                context_window=8192,
                timeout_seconds=30.0,
            )
            agent = agent_create(
                principal=principal,
                slug=model,
                name=model,
                config={"system_prompt": "Use the tools.", "tier": "light", "endpoint_id": endpoint.pk,
                        "tools": tools},
            )
            agent_version_publish(principal=principal, version=agent.versions.get())
            setup.agents[model] = agent.pk
    connection.set_schema_to_public()  # type: ignore[attr-defined]  # django-tenants' wrapper
    return setup


def sessions_create(setup: Setup, model: str, count: int) -> list[int]:
    from django_tenants.utils import schema_context

    from agents.models import Agent
    from agents.services import chat_session_create

    with schema_context(setup.schema):
        agent = Agent.objects.get(pk=setup.agents[model])
        return [chat_session_create(principal=setup.owner, agent=agent).pk for _ in range(count)]


# --- 1. Tool-loop overhead ----------------------------------------------------------------------


@dataclass
class LoopSample:
    overhead: float  # ms, last tool-call delta -> next model request
    to_row: float  # ms, last tool-call delta -> ToolCall row (stream end, metering of the first call)
    to_start: float  # ms, row -> execution started (parse, validate)
    execute: float  # ms, execution (started -> finished, recorded)
    to_request: float  # ms, finished -> next model request (record, events, HTTP request)


def loop_round(setup: Setup, server: RemoteModel, session_ids: list[int]) -> list[LoopSample]:
    """One turn per session, sent together (the server's gate holds their first answers until all
    arrived); returns each completed turn's sample."""
    from django_tenants.utils import schema_context

    from agents.models import ChatSession, ToolCall, Turn
    from agents.services import chat_message_send

    server.gate(len(session_ids))
    markers: dict[int, str] = {}
    with schema_context(setup.schema):
        for session_id in session_ids:
            marker = uuid.uuid4().hex[:12]
            session = ChatSession.objects.get(pk=session_id)
            turn = chat_message_send(principal=setup.owner, session=session, content=f"[bench:{marker}] 6*7?")
            markers[turn.pk] = marker
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if not Turn.objects.filter(pk__in=markers, status__in=Turn.UNFINISHED).exists():
                break
            time.sleep(0.05)
        done = set(Turn.objects.filter(pk__in=markers, status=Turn.Status.COMPLETED).values_list("pk", flat=True))
        calls = {c.turn_id: c for c in ToolCall.objects.filter(turn_id__in=done)}
    if len(done) < len(markers):
        print(f"    ({len(markers) - len(done)} of {len(markers)} turns did not complete)", flush=True)
    turns = server.turns()
    samples = []
    for turn_id in done:
        seen, call = turns.get(markers[turn_id], {}), calls.get(turn_id)
        if call is None or len(seen.get("arrived", [])) < 2 or not seen.get("last_tool_delta"):
            continue
        delta, arrived = seen["last_tool_delta"][0], seen["arrived"][1]
        created, started, finished = (t.timestamp() for t in (call.created_at, call.started_at, call.finished_at))
        samples.append(
            LoopSample(
                overhead=(arrived - delta) * 1000,
                to_row=(created - delta) * 1000,
                to_start=(started - created) * 1000,
                execute=(finished - started) * 1000,
                to_request=(arrived - finished) * 1000,
            )
        )
    return samples


def loop_level(setup: Setup, server: RemoteModel, concurrent: int, rounds: int) -> list[LoopSample]:
    ids = sessions_create(setup, LOOP_MODEL, concurrent)
    out: list[LoopSample] = []
    for _ in range(rounds):
        out += loop_round(setup, server, ids)
    return out


def print_loop(label: str, samples: list[LoopSample]) -> None:
    if not samples:
        print(f"   {label}: no completed turns", flush=True)
        return

    def pp(values: list[float]) -> str:
        p50, p95 = percentiles(values)
        return f"{p50:6.1f} / {p95:6.1f}"

    print(
        f"   {label:<24} {len(samples):>5} | {pp([s.overhead for s in samples])} | {pp([s.to_row for s in samples])}"
        f" | {pp([s.to_start for s in samples])} | {pp([s.execute for s in samples])}"
        f" | {pp([s.to_request for s in samples])}",
        flush=True,
    )


# --- 2. Approval to resume --------------------------------------------------------------------


@dataclass
class ResumeSample:
    latency: float  # ms, decision committed -> first token of the resumed answer at the client
    model_ttft: float  # ms, the scripted model's own: request arrived -> first token written
    dispatch: float  # ms, committed -> the worker claimed the turn (task sent, received, claim)
    to_tool: float  # ms, claim -> the call claimed (restore the loop state, turn.started)
    execute: float  # ms, the HTTP tool call through the egress guard, recorded
    to_request: float  # ms, call finished -> the model's request arrived
    relay: float  # ms, the model wrote the first token -> the client received it


def _ws(port: int, setup: Setup, session_id: int) -> Any:
    import socket

    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    return connect(
        f"ws://{setup.host}:{port}/ws/chat/{session_id}/?format=json",
        sock=sock,
        additional_headers={"Cookie": setup.cookie, "Origin": f"http://{setup.host}:{port}"},
        open_timeout=WAIT_S,
    )


def _until(ws: Any, names: set[str]) -> dict[str, Any]:
    while True:
        event = json.loads(ws.recv(timeout=WAIT_S))
        if event["event"] in names:
            return dict(event)
        if event["event"] in ("turn.failed", "turn.cancelled", "error"):
            raise RuntimeError(f"the turn ended: {event}")


def decide(setup: Setup, approval_id: int) -> float:
    """Approve ``approval_id`` as the approver; returns when the decision committed
    (``time.time()``, taken by an on-commit callback that runs before the decision's own)."""
    from django.db import transaction
    from django_tenants.utils import schema_context

    from agents.models import ApprovalRequest

    # By name: the module arrives with the approvals part (``resume_part`` skips without it).
    approval_decide = importlib.import_module("agents.approval_services").approval_decide
    committed: list[float] = []
    with schema_context(setup.schema):
        approval = ApprovalRequest.objects.get(pk=approval_id)
        with transaction.atomic():
            transaction.on_commit(lambda: committed.append(time.time()))
            approval_decide(principal=setup.approver, approval=approval, decision="approved")
    return committed[0]


def resume_once(port: int, setup: Setup, server: RemoteModel, session_id: int) -> ResumeSample:
    from django.conf import settings
    from django_tenants.utils import schema_context

    from agents.models import ToolCall, Turn

    marker = uuid.uuid4().hex[:12]
    with _ws(port, setup, session_id) as ws:
        ws.send(json.dumps({"content": f"[bench:{marker}] Open a ticket: my laptop screen is broken"}))
        requested = _until(ws, {"approval.requested"})
        committed = decide(setup, int(requested["approval_id"]))
        _until(ws, {"token.delta"})
        first_delta = time.time()
        _until(ws, {"turn.completed"})
    seen = server.turns()[marker]
    arrived, first_token = seen["arrived"][1], seen["first_token"][0]
    with schema_context(setup.schema):
        turn = Turn.objects.get(pk=requested["turn_id"])
        call = ToolCall.objects.get(turn=turn)
    claimed = turn.deadline.timestamp() - settings.CHAT_TURN_DEADLINE_SECONDS  # the claim sets the deadline
    started, finished = call.started_at.timestamp(), call.finished_at.timestamp()
    return ResumeSample(
        latency=(first_delta - committed) * 1000,
        model_ttft=(first_token - arrived) * 1000,
        dispatch=(claimed - committed) * 1000,
        to_tool=(started - claimed) * 1000,
        execute=(finished - started) * 1000,
        to_request=(arrived - finished) * 1000,
        relay=(first_delta - first_token) * 1000,
    )


def print_resume(samples: list[ResumeSample]) -> None:
    def pp(values: list[float]) -> str:
        p50, p95 = percentiles(values)
        return f"p50 {p50:7.1f}  p95 {p95:7.1f}"

    rows = [
        ("decision committed -> first token at the client", [s.latency for s in samples]),
        ("  minus the model's own first-token time", [s.latency - s.model_ttft for s in samples]),
        ("the model's own first-token time", [s.model_ttft for s in samples]),
        ("steps: commit -> turn claimed (dispatch)", [s.dispatch for s in samples]),
        ("       claim -> call claimed (restore)", [s.to_tool for s in samples]),
        ("       HTTP tool call, recorded", [s.execute for s in samples]),
        ("       call recorded -> model request", [s.to_request for s in samples]),
        ("       model's first token -> client", [s.relay for s in samples]),
    ]
    for label, values in rows:
        print(f"   {label:<50} {pp(values)} ms", flush=True)


def loop_part(setup: Setup, server: RemoteModel, args: argparse.Namespace) -> None:
    # Warm-up: each worker thread opens its database connection on its first turn.
    loop_level(setup, server, 20, 1)
    loop_level(setup, server, 1, 3)
    print("\n1. Tool-loop overhead (calculator call -> next model request), ms; target p95 <= 25", flush=True)
    print(
        f"   {'':<24} {'turns':>5} | {'overhead p50/p95':>15} | {'->row':>15} | {'->exec start':>15} | "
        f"{'execute':>15} | {'->next request':>15}",
        flush=True,
    )
    print_loop("1 turn at a time", loop_level(setup, server, 1, args.turns_1))
    print_loop("20 concurrent turns", loop_level(setup, server, 20, args.rounds_20))
    server.gate(1)


def resume_part(port: int, setup: Setup, server: RemoteModel, args: argparse.Namespace) -> None:
    print(f"\n2. Approval to resume, {args.approvals} approvals one at a time", flush=True)
    if importlib.util.find_spec("agents.approval_services") is None:
        print("   skipped: agents.approval_services (approval_decide) is not on this branch yet.", flush=True)
        return
    ids = sessions_create(setup, APPROVE_MODEL, args.approvals + 2)
    for session_id in ids[:2]:  # warm-up
        resume_once(port, setup, server, session_id)
    print_resume([resume_once(port, setup, server, session_id) for session_id in ids[2:]])
    print("   target: p95 <= 300 ms plus the model's own first-token time", flush=True)


# --- Main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns-1", type=int, default=30, help="sequential turns at 1 turn")
    parser.add_argument("--rounds-20", type=int, default=3, help="rounds of 20 concurrent turns")
    parser.add_argument("--approvals", type=int, default=20)
    parser.add_argument("--model-ttft-ms", type=float, default=100.0, help="scripted first-token delay")
    parser.add_argument("--worker-concurrency", type=int, default=64, help="Celery threads (the Procfile's 64)")
    parser.add_argument("--parts", default="1,2", help="which parts to run")
    parser.add_argument("--serve-scripted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_scripted:
        serve_scripted(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tickets = ticket_service()
    ticket_port = int(tickets.server_address[1])
    # The worker and daphne read the allowlist from the environment they inherit.
    os.environ["EGRESS_ALLOWLIST"] = f"127.0.0.1:{ticket_port}"
    prepare_database("bench_tools", reuse=False)
    import django

    django.setup()
    import redis
    from django.core.management import call_command

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()  # the bench's own database
    print("Preparing bench_tools (migrations)...", flush=True)
    call_command("migrate_schemas", interactive=False, verbosity=0)

    log_dir = ROOT / "var" / "bench_tools"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = RemoteModel(model_ttft_ms=args.model_ttft_ms, log=log_dir / "scripted.log")
    setup = build_world(server.api_base, ticket_port)
    port = free_port()
    # The Procfile's pool sizes (web 20, celery 16): the default of 10 would make 20 concurrent
    # turns wait for connections.
    os.environ["DATABASE_POOL_MAX_SIZE"] = "20"
    daphne = start_daphne(port, log_dir / "daphne.log")
    os.environ.update(DATABASE_POOL_MAX_SIZE="16", DATABASE_POOL_TIMEOUT_SECONDS="30")
    workers = start_workers(1, args.worker_concurrency, log_dir / "celery.log")
    print(
        f"daphne :{port}, celery --pool threads --concurrency {args.worker_concurrency}, scripted model "
        f"(resumed answer's first token after {args.model_ttft_ms:.0f} ms). Logs in {log_dir}",
        flush=True,
    )
    try:
        parts = set(args.parts.split(","))
        if "1" in parts:
            loop_part(setup, server, args)
        if "2" in parts:
            resume_part(port, setup, server, args)
    finally:
        for worker in workers:
            stop(worker)
        stop(daphne)
        server.stop()
        tickets.shutdown()
        from django.db import connections

        connections.close_all()


if __name__ == "__main__":
    main()
