"""A worker killed in the middle of a turn: its heartbeat stops and the sweeper frees the session.

Real processes: a Celery worker subprocess (thread pool, as the Procfile runs it) streams an answer
from the scripted model, slowly; while it streams, its heartbeat keeps the sweeper off the turn
even once the turn's first stamp is stale. Then the worker is killed with SIGKILL; the sweeper
fails the turn as ``worker_lost`` on the heartbeat rule (its deadline is ten minutes away), and
the session takes a new message. Rows are committed through connections of
their own (the worker is another process), in a tenant made for this test.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from django_tenants.utils import schema_context

from agents.models import ChatSession, Turn
from agents.services import agent_create, agent_version_publish, chat_message_send, chat_session_create, turns_sweep
from tenants.models import Membership
from tenants.principal import Principal
from tenants.services.provisioning import tenant_create
from tests.agents.conftest import committed, endpoint_create
from tests.scripted_llm import ScriptedLLM

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.django_db]

HEARTBEAT_SECONDS = 1.0
STALE_SECONDS = 5.0


def _database_url() -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    return f"postgresql://{db['USER']}@/{db['NAME']}?host={db['HOST']}&port={db['PORT']}"


def _start_worker(log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": _database_url(), "LOG_LEVEL": "WARNING",
           "CHAT_TURN_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}
    celery = Path(sys.executable).with_name("celery")
    with log.open("wb") as out:
        return subprocess.Popen(  # noqa: S603 (fixed argument list)
            [str(celery), "-A", "config", "worker", "-Q", "llm.light", "--pool", "threads", "--concurrency", "2",
             "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)  # polling the other processes, not asserting on time
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_s_turn_is_failed_by_its_silent_heartbeat_and_frees_the_session(
        scripted_llm: ScriptedLLM, settings: Any, tmp_path: Path) -> None:
    settings.CHAT_TURN_DEADLINE_SECONDS = 600  # the deadline cannot be what fails the turn
    settings.CHAT_TURN_HEARTBEAT_STALE_SECONDS = STALE_SECONDS
    model = f"heartbeat-{uuid.uuid4().hex[:8]}"
    # About ten minutes of tokens, two a second: the turn runs until its worker dies.
    scripted_llm.script(model, tokens=[" word"] * 1200, token_interval=0.5)

    def create() -> tuple[str, Principal, int]:
        tenant = tenant_create(actor=Principal.system("t"), slug=f"beat-{uuid.uuid4().hex[:8]}", name="Heartbeat",
                               owner_email=f"{model}@example.com").tenant
        endpoint = endpoint_create(name=model, model=model, api_base=scripted_llm.api_base, tier="light",
                                   priority=5000, timeout_seconds=10.0)
        with schema_context(tenant.schema_name):
            system = Principal.system("t", tenant=tenant)
            agent = agent_create(principal=system, slug="beating", name="Beating", config={
                "system_prompt": "Answer.", "tier": "light", "endpoint_id": endpoint.pk})
            agent = agent_version_publish(principal=system, version=agent.versions.get())
            owner = Principal.for_member(Membership.objects.select_related("user", "tenant").get(tenant=tenant))
            return tenant.schema_name, owner, chat_session_create(principal=owner, agent=agent).pk

    schema, owner, session_id = committed(create)

    def in_schema(function: Any) -> Any:
        """``function()`` in the tenant's schema on a connection of its own that autocommits, so the
        worker sees what it writes and it sees what the worker wrote."""
        def run() -> Any:
            with schema_context(schema):
                return function()
        return committed(run)

    def send(content: str, *, enqueue: bool = True) -> Turn:
        return in_schema(lambda: chat_message_send(principal=owner, session=ChatSession.objects.get(pk=session_id),
                                                   content=content, enqueue=enqueue))

    def turn() -> Turn:
        return in_schema(lambda: Turn.objects.filter(session_id=session_id).order_by("pk").first())

    def sweep() -> int:
        return int(in_schema(lambda: turns_sweep().failed))

    log = tmp_path / "celery.log"
    worker = _start_worker(log)
    try:
        _wait(lambda: b"ready." in log.read_bytes() or worker.poll() is not None, 60, "the worker to start")
        assert worker.poll() is None, log.read_text(errors="replace")
        send("Talk for a long time.")
        _wait(lambda: turn().status == Turn.Status.RUNNING, 60, "the worker to start the turn")
        started = turn().started_at
        assert started is not None
        # Alive: once the claim's own stamp is stale, only the worker's beats keep the turn.
        _wait(lambda: timezone.now() > started + dt.timedelta(seconds=STALE_SECONDS + 2 * HEARTBEAT_SECONDS),
              60, "the first stamp to go stale")
        assert sweep() == 0, "a live worker's turn was swept"
        live = turn()
        assert live.status == Turn.Status.RUNNING
        assert live.heartbeat_at is not None and live.heartbeat_at > started
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)

    # Dead: the stamps stop; the sweeper fails the turn once the last one is stale.
    _wait(lambda: sweep() == 1, 60, "the sweeper to fail the dead worker's turn")
    dead = turn()
    assert (dead.status, dead.error_code) == (Turn.Status.FAILED, "worker_lost")
    assert dead.error_message.endswith(".")
    assert dead.finished_at is not None and dead.finished_at < dead.deadline, "failed by the heartbeat rule"
    # The session is free: a new message is taken (not 409 turn_in_progress).
    assert send("Are you back?", enqueue=False).status == Turn.Status.QUEUED
