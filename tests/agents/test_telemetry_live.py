"""Traces and metrics across real processes: a daphne server and a Celery worker started with
``TELEMETRY_SPANS_FILE`` (each writes its finished spans as JSON lines) and one
``PROMETHEUS_MULTIPROC_DIR``, on their own Redis key prefix (their own queues), against the test
database. A REST turn must be one trace in both processes, the worker's log lines must carry
its trace id, and the web's ``/metrics`` must show what the worker recorded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django_tenants.utils import schema_context
from prometheus_client.parser import text_string_to_metric_families

from agents.models import Agent, Turn
from config.redis import redis_client
from config.telemetry import spans_read
from tenants.models import ModelEndpoint
from tests.agents.conftest import calculator_agent_committed, chat_session_commit, committed, sse_events, ws_connect
from tests.conftest import World
from tests.live import (
    LIVE_DATABASE_ENV,
    REPO,
    STARTUP_TIMEOUT_S,
    _close_server_connections,
    _database_url,
    _free_port,
    _stop,
    _wait_until_healthy,
)
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db(transaction=False)

SPAN_WAIT_S = 30.0
ASGI_TRACED = importlib.util.find_spec("opentelemetry.instrumentation.asgi") is not None


@dataclasses.dataclass(frozen=True)
class Traced:
    port: int
    world: World
    web_spans: Path
    worker_spans: Path
    worker_log: Path
    prefix: str  # the processes' CACHE_KEY_PREFIX


@pytest.fixture(scope="module")
def traced_portal(django_db_setup: World, django_db_blocker: Any,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """daphne and a Celery worker with tracing to files and shared multiprocess metrics."""
    base = tmp_path_factory.mktemp("otel")
    metrics_dir = base / "prometheus"
    metrics_dir.mkdir()
    port = _free_port()
    prefix = f"{settings.CACHE_KEY_PREFIX}otel"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    env.update({"DATABASE_URL": _database_url(), "PUBLIC_PORT": str(port), "CACHE_KEY_PREFIX": prefix,
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "LOG_LEVEL": "INFO", **LIVE_DATABASE_ENV})
    web_log, worker_log = base / "daphne.log", base / "celery.log"
    traced = Traced(port=port, world=django_db_setup, web_spans=base / "web.jsonl",
                    worker_spans=base / "worker.jsonl", worker_log=worker_log, prefix=prefix)
    daphne = Path(sys.executable).with_name("daphne")
    celery = Path(sys.executable).with_name("celery")
    with web_log.open("wb") as out:
        web = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [str(daphne), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
            cwd=REPO, env={**env, "TELEMETRY_SPANS_FILE": str(traced.web_spans)}, stdout=out, stderr=subprocess.STDOUT)
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [str(celery), "-A", "config", "worker", "-Q", "llm.light,llm.standard,llm.heavy,default",
             "--pool", "threads", "--concurrency", "4", "--without-heartbeat", "--without-gossip",
             "--without-mingle", "--loglevel", "INFO"],
            cwd=REPO, env={**env, "TELEMETRY_SPANS_FILE": str(traced.worker_spans)}, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(web, port, web_log)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while b"ready." not in worker_log.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{worker_log.read_text(errors='replace')}")
            time.sleep(0.1)  # polling the worker's start-up, not asserting on time
        yield traced
    finally:
        _stop(worker)
        _stop(web)
        redis_client().delete(f"{prefix}:endpoint-health")
        _close_server_connections(django_db_blocker)


_endpoints: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _endpoints_removed(django_db_blocker: Any) -> Iterator[None]:
    yield
    with django_db_blocker.unblock():
        committed(lambda: ModelEndpoint.objects.filter(pk__in=_endpoints).delete())


@pytest.fixture
def api(traced_portal: Traced) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{traced_portal.port}", timeout=60,
                      headers={"Host": f"acme.localhost:{traced_portal.port}",
                               "Authorization": f"Bearer {traced_portal.world.key_a}"}) as client:
        yield client


def _agent(traced: Traced, llm: ScriptedLLM) -> str:
    """A committed agent that calls ``calculator`` once, then answers (``calculator_agent_committed``)."""
    return calculator_agent_committed(tenant=traced.world.tenant_a, llm=llm, prefix="otel", endpoints=_endpoints)


def _session(api: httpx.Client, slug: str) -> int:
    response = api.post("/api/v1/sessions", json={"agent": slug})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _spans_until(path: Path, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The spans of ``path`` once ``done(spans)`` holds (spans are written as they end)."""
    deadline = time.monotonic() + SPAN_WAIT_S
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        spans = spans_read(str(path)) if path.exists() else []
        if done(spans):
            return spans
        time.sleep(0.1)  # polling for the exporter's writes, not asserting on time
    return spans


def _trace_of_turn(traced: Traced, turn_id: int, *, web_last: str = ""
                   ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The trace id of the worker's ``turn.run`` span of ``turn_id``, and the web's and the
    worker's spans of that trace; ``web_last``: the name of the web's span that ends last (by
    default its request span, or its task-sending span without the ASGI instrumentation)."""
    def turn_span(spans: list[dict[str, Any]]) -> dict[str, Any] | None:
        return next((s for s in spans if s["name"] == "turn.run"
                     and s["attributes"].get("portal.turn.id") == turn_id), None)

    worker = _spans_until(traced.worker_spans, lambda spans: turn_span(spans) is not None)
    found = turn_span(worker)
    assert found is not None, [s["name"] for s in worker]
    trace_id = found["context"]["trace_id"]
    # The task's span ends after the turn's: wait for it too.
    worker = _spans_until(traced.worker_spans, lambda spans: any(
        s["context"]["trace_id"] == trace_id and s["name"].startswith("run/") for s in spans))
    # The web's request span (traced under ASGI with the ASGI instrumentation) ends last.
    last = "SpanKind.SERVER" if ASGI_TRACED else "SpanKind.PRODUCER"
    web = _spans_until(traced.web_spans, lambda spans: any(
        s["context"]["trace_id"] == trace_id and (s["name"] == web_last if web_last else s["kind"] == last)
        for s in spans))
    return (trace_id, [s for s in web if s["context"]["trace_id"] == trace_id],
            [s for s in worker if s["context"]["trace_id"] == trace_id])


def _turn_id(traced: Traced, session_id: int) -> int:
    with schema_context(traced.world.tenant_a.schema_name):
        turn_id = Turn.objects.filter(session_id=session_id).values_list("pk", flat=True).order_by("-pk").first()
    assert turn_id is not None
    return int(turn_id)


def _assert_one_trace(traced: Traced, turn_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check that the turn's task, sent by the web, and everything the worker did for the turn
    are one trace; the web's and the worker's spans of it."""
    trace_id, web, worker = _trace_of_turn(traced, turn_id)
    # The web sent the turn's task within the trace; the worker's task span continues from it.
    sent = [s for s in web if s["name"] == "apply_async/agents.turn_run"]
    assert len(sent) == 1, [s["name"] for s in web]
    task = next(s for s in worker if s["name"] == "run/agents.turn_run")
    assert task["parent_id"] == sent[0]["context"]["span_id"]
    # The worker: the task, the turn, both model calls with their usage, the tool call.
    names = [s["name"] for s in worker]
    assert "run/agents.turn_run" in names and names.count("turn.run") == 1, names
    calls = [s for s in worker if s["name"] == "llm.call"]
    assert len(calls) == 2, names
    for call in calls:
        assert call["attributes"]["portal.tier"] == "light"
        assert call["attributes"]["gen_ai.usage.input_tokens"] == 42  # the scripted server's usage
        assert call["attributes"]["gen_ai.usage.output_tokens"] > 0
        assert call["attributes"]["portal.llm.ttft_ms"] >= 0
    tool = next(s for s in worker if s["name"] == "tool.call")
    assert tool["attributes"]["portal.tool"] == "calculator" and tool["attributes"]["portal.tool.status"] == "ok"
    # Every span of the worker that belongs to this turn hangs off the web's.
    ids = {s["context"]["span_id"] for s in web + worker}
    assert all(s["parent_id"] in ids for s in worker), [(s["name"], s["parent_id"]) for s in worker]
    return web, worker


def _waiting_turn(api: httpx.Client, traced: Traced, llm: ScriptedLLM) -> tuple[int, int]:
    """A REST turn whose POST waits for the answer; (session id, turn id)."""
    session_id = _session(api, _agent(traced, llm))
    response = api.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "What is 6 times 7?"})
    assert response.status_code == 200, response.text
    assert "42" in response.json()["content"]
    return session_id, int(response.json()["turn_id"])


def _streamed_turn(api: httpx.Client, traced: Traced, llm: ScriptedLLM) -> tuple[int, int]:
    """A REST turn streamed as Server-Sent Events, whose task is sent once the stream listens."""
    session_id = _session(api, _agent(traced, llm))
    with api.stream("POST", f"/api/v1/sessions/{session_id}/messages",
                    json={"content": "What is 6 times 7?", "stream": True}) as response:
        events = sse_events(response.read().decode())
    assert events[-1]["event"] == "turn.completed", events
    return session_id, _turn_id(traced, session_id)


TURNS = {"waiting": _waiting_turn, "streamed": _streamed_turn}


@pytest.mark.parametrize("kind", sorted(TURNS))
def test_a_rest_turn_is_one_trace_across_web_and_worker(
    api: httpx.Client, traced_portal: Traced, scripted_llm: ScriptedLLM, kind: str
) -> None:
    _, turn_id = TURNS[kind](api, traced_portal, scripted_llm)
    _assert_one_trace(traced_portal, turn_id)


@pytest.mark.parametrize("kind", sorted(TURNS))
def test_the_turns_trace_starts_at_its_request(
    api: httpx.Client, traced_portal: Traced, scripted_llm: ScriptedLLM, kind: str
) -> None:
    # Django's instrumentation traces ASGI requests only with the ASGI instrumentation installed.
    pytest.importorskip("opentelemetry.instrumentation.asgi")
    session_id, turn_id = TURNS[kind](api, traced_portal, scripted_llm)
    web, _ = _assert_one_trace(traced_portal, turn_id)
    roots = [s for s in web if s["parent_id"] is None]
    assert len(roots) == 1 and roots[0]["kind"] == "SpanKind.SERVER", [(s["name"], s["parent_id"]) for s in web]
    assert f"/api/v1/sessions/{session_id}/messages" in json.dumps(roots[0]["attributes"]), roots[0]["attributes"]


def test_a_socket_turn_is_one_trace_from_the_message_to_the_model_calls(
    traced_portal: Traced, scripted_llm: ScriptedLLM, member_cookie: Any
) -> None:
    slug = _agent(traced_portal, scripted_llm)
    tenant = traced_portal.world.tenant_a
    with schema_context(tenant.schema_name):
        agent_id = Agent.objects.get(slug=slug).pk
    session_id = chat_session_commit(tenant, traced_portal.world.user("operator"), agent_id)
    with ws_connect(traced_portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("operator")) as ws:
        ws.send(json.dumps({"content": "What is 6 times 7?"}))
        final = _socket_final(ws)
    assert final["event"] == "turn.completed" and "42" in final["content"], final

    trace_id, web, worker = _trace_of_turn(traced_portal, int(final["turn_id"]), web_last="chat.message")
    # The socket's message is the trace's root in the web; it sent the task that ran the turn.
    root = next(s for s in web if s["name"] == "chat.message")
    assert root["parent_id"] is None and root["attributes"]["portal.session.id"] == session_id
    sent = next(s for s in web if s["name"] == "apply_async/agents.chat_message_accept")
    assert sent["parent_id"] == root["context"]["span_id"]
    task = next(s for s in worker if s["name"] == "run/agents.chat_message_accept")
    assert task["parent_id"] == sent["context"]["span_id"]
    names = [s["name"] for s in worker]
    assert names.count("turn.run") == 1 and names.count("llm.call") == 2 and "tool.call" in names, names


def _socket_final(ws: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=deadline - time.monotonic()))
        if event["event"] in ("turn.completed", "turn.failed", "turn.cancelled", "error"):
            return event  # type: ignore[no-any-return]
    raise AssertionError("no final event on the socket")


def test_the_workers_log_lines_carry_the_turns_trace_id(
    api: httpx.Client, traced_portal: Traced, scripted_llm: ScriptedLLM
) -> None:
    _, turn_id = _waiting_turn(api, traced_portal, scripted_llm)
    trace_id, _, worker = _trace_of_turn(traced_portal, turn_id)

    lines = []
    for raw in traced_portal.worker_log.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("turn_id") == turn_id:
            lines.append(line)
    finished = [line for line in lines if line.get("event") == "turn_finished"]
    assert len(finished) == 1, lines
    assert finished[0]["trace_id"] == trace_id.removeprefix("0x")
    span_ids = {s["context"]["span_id"].removeprefix("0x") for s in worker}
    assert finished[0]["span_id"] in span_ids
    assert {line.get("trace_id") for line in lines} == {trace_id.removeprefix("0x")}


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items()))


def test_the_webs_metrics_show_what_the_worker_recorded(
    api: httpx.Client, traced_portal: Traced, scripted_llm: ScriptedLLM
) -> None:
    slug = _agent(traced_portal, scripted_llm)
    session_id = _session(api, slug)
    redis_client().hset(f"{traced_portal.prefix}:endpoint-health", "999001", json.dumps(
        {"ok": False, "latency_ms": None, "checked_at": "2026-01-01T00:00:00+00:00", "name": "otel probe",
         "tier": "heavy", "error": "connection refused"}))

    response = api.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "What is 6 times 7?"})
    assert response.status_code == 200, response.text
    metrics = api.get("/metrics")

    assert metrics.status_code == 200
    samples = _samples(metrics.text)
    # Recorded by the worker process, served by the web's: two model calls of this endpoint.
    assert _value(samples, "portal_model_call_seconds_count", tier="light", endpoint=slug) == 2
    assert _value(samples, "portal_model_ttft_seconds_count", tier="light", endpoint=slug) == 2
    assert _value(samples, "portal_model_tokens_total", tier="light", kind="prompt") >= 84
    assert _value(samples, "portal_model_tokens_total", tier="light", kind="completion") > 0
    assert _value(samples, "portal_turns_total", status="completed", error_code="") >= 1
    assert _value(samples, "portal_tool_calls_total", tool="calculator", status="ok") >= 1
    # State at scrape time.
    queues = {(labels["broker"], labels["queue"]) for labels, _ in samples["portal_queue_depth"]}
    assert queues == {("celery", "llm.light"), ("celery", "llm.standard"), ("celery", "llm.heavy"),
                      ("celery", "default"), ("rq", "ingest"), ("rq", "default")}
    assert _value(samples, "portal_model_endpoint_up", endpoint="otel probe", tier="heavy") == 0
    assert ({labels["status"] for labels, _ in samples["portal_ingestion_documents"]}
            >= {"pending", "processing", "indexed", "failed"})
    assert "portal_approvals_pending" in samples and "portal_approvals_oldest_pending_seconds" in samples
