"""What a turn costs before its first token: the statements of accepting and starting it, its
step marks, and how a running turn learns that it was cancelled."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import schema_context

from agents.models import Agent, Turn
from agents.runtime import cancel, events
from agents.runtime.orchestrator import turn_run, turn_run_started
from agents.runtime.timings import STEPS, marks_clean
from agents.services import (
    agent_create,
    agent_version_publish,
    chat_message_accept,
    chat_message_send,
    chat_session_create,
)
from config.redis import redis_client
from tenants.models import Membership
from tenants.principal import Principal
from tests.agents.conftest import endpoint_create
from tests.conftest import World
from tests.scripted_llm import ScriptedLLM

HANDBOOK = b"Refund policy\n\nCustomers may ask for a refund within 30 days of purchase.\n"
# Statements that carry no data: transaction and schema bookkeeping.
_BOOKKEEPING = re.compile(r"^(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE SAVEPOINT|SET |RESET |SELECT set_config)")


@pytest.fixture
def agent_of(world: World, scripted_llm: ScriptedLLM) -> Iterator[Callable[..., tuple[Agent, Principal]]]:
    """``agent_of(collections=bool)``: in tenant A's schema, a published agent on its own scripted
    model (optionally bound to a one-document collection) and the operator's principal."""
    tenant = world.tenant_a
    with schema_context(tenant.schema_name):

        def make(*, collections: bool = False) -> tuple[Agent, Principal]:
            from knowledge.ingestion import ingest_documents
            from knowledge.services import collection_create, document_upload

            model = f"start-{uuid.uuid4().hex[:10]}"
            scripted_llm.script(model, tokens=[" Thirty", " days", "."])
            endpoint = endpoint_create(name=model, model=model, api_base=scripted_llm.api_base, tier="light",
                                       priority=9000)
            system = Principal.system("tests", tenant=tenant)
            ids: list[int] = []
            if collections:
                collection = collection_create(principal=system, name=model)
                upload = document_upload(principal=system, collection=collection, filename="handbook.md",
                                         data=HANDBOOK, queue=False)
                assert ingest_documents([upload.documents[0].pk]).indexed == 1
                ids = [collection.pk]
            agent = agent_create(principal=system, slug=model, name=model, config={
                "system_prompt": "Answer briefly.", "tier": "light", "endpoint_id": endpoint.pk,
                "collection_ids": ids, "retrieval_top_k": 3})
            agent_version_publish(principal=system, version=agent.versions.get())
            membership = Membership.objects.select_related("user", "tenant", "tenant__plan").get(
                user=world.user("operator"), tenant=tenant)
            return Agent.objects.get(pk=agent.pk), Principal.for_member(membership)

        yield make


def _data_statements(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if not _BOOKKEEPING.match(q["sql"])]


def _repeated_reads(statements: list[str]) -> list[str]:
    reads = Counter(s for s in statements if s.startswith(("SELECT", "WITH")))
    return [s[:160] for s, n in reads.items() if n > 1]


@pytest.mark.parametrize("collections", [False, True], ids=["no-retrieval", "retrieval"])
def test_a_socket_turn_reads_each_thing_once_and_in_a_bounded_number_of_statements(
        agent_of: Callable[..., tuple[Agent, Principal]], collections: bool) -> None:
    agent, principal = agent_of(collections=collections)
    session = chat_session_create(principal=principal, agent=agent)
    with CaptureQueriesContext(connection) as accepting:
        turn = chat_message_accept(principal=principal, session_id=session.pk, content="How long is the refund window?",
                                   queue="llm.light")
    with CaptureQueriesContext(connection) as running:
        assert turn_run_started(turn, {}, tenant=principal.tenant) == "completed"
    accept = _data_statements(accepting)
    run = _data_statements(running)
    # Accept: the session locked with its agent and version, the unfinished-turn check, the
    # message, the turn (running), the session's title.
    assert len(accept) <= 5, "\n".join(s[:120] for s in accept)
    # Start: the endpoints, the history, the turn's model (and its retrieval: the keyword side,
    # the dense side, the chunks, its usage event), the budgets; finish: the answer, the turn,
    # the audit event, the two usage events, the cost.
    bound = 18 if collections else 13
    assert len(run) <= bound, "\n".join(s[:120] for s in run)
    assert not _repeated_reads(accept + run)
    with schema_context(principal.tenant.schema_name):
        saved = Turn.objects.get(pk=turn.pk)
    assert saved.status == Turn.Status.COMPLETED and saved.assistant_message.content == " Thirty days."
    assert bool(saved.retrieved) is collections


def test_a_queued_turn_claims_and_reads_each_thing_once(agent_of: Callable[..., tuple[Agent, Principal]]) -> None:
    agent, principal = agent_of()
    session = chat_session_create(principal=principal, agent=agent)
    turn = chat_message_send(principal=principal, session=session, content="Refunds?", enqueue=False)
    with CaptureQueriesContext(connection) as running:
        assert turn_run(turn.pk) == "completed"
    run = _data_statements(running)
    # The socket's path plus the claim (the turn locked with its session, agent and version; running).
    assert len(run) <= 16, "\n".join(s[:120] for s in run)
    assert not _repeated_reads(run)


def test_a_turn_keeps_the_marks_of_its_steps_in_order(agent_of: Callable[..., tuple[Agent, Principal]]) -> None:
    agent, principal = agent_of(collections=True)
    session = chat_session_create(principal=principal, agent=agent)
    received = time.time()
    turn = chat_message_send(principal=principal, session=session, content="Refunds?", enqueue=False,
                             marks={"received": received})
    assert turn_run(turn.pk, {"received": received, "accepted": received + 0.001, "enqueued": received + 0.002,
                              "dispatched": time.time()}) == "completed"
    with schema_context(principal.tenant.schema_name):
        marks = Turn.objects.get(pk=turn.pk).timings
    assert set(marks) == set(STEPS)  # every step, retrieval included
    assert [marks[s] for s in STEPS] == sorted(marks[s] for s in STEPS)  # in the order they happen
    assert marks["received"] == pytest.approx(received)


def test_marks_from_a_task_keep_only_known_numeric_steps() -> None:
    assert marks_clean({"received": 1.5, "claimed": 2, "bogus": 3.0, "accepted": "x", "enqueued": True}) == {
        "received": 1.5, "claimed": 2.0}
    assert marks_clean(None) == {} and marks_clean(["received"]) == {}


def test_a_watched_turn_sees_its_cancel_key_within_the_check_interval(world: World) -> None:
    schema, turn_id = world.tenant_a.schema_name, 10**9 + uuid.uuid4().int % 10**6
    key = events.cancel_key(schema, turn_id)
    try:
        with cancel.cancel_watch(schema, turn_id):
            assert not cancel.cancel_requested(schema, turn_id)
            redis_client().set(key, b"1", ex=60)
            deadline = time.monotonic() + 5 * cancel.CHECK_SECONDS + 2
            while not cancel.cancel_requested(schema, turn_id):
                assert time.monotonic() < deadline, "the watcher never saw the key"
                time.sleep(cancel.CHECK_SECONDS / 4)  # waiting for the watcher's next read, not timing it
        assert key not in cancel._watcher.keys  # unwatched when the block ends
        # An unwatched turn is answered from Redis directly.
        assert cancel.cancel_requested(schema, turn_id)
        redis_client().delete(key)
        assert not cancel.cancel_requested(schema, turn_id)
    finally:
        redis_client().delete(key)


def test_a_key_watched_twice_stays_watched_until_both_leave(world: World) -> None:
    schema, turn_id = world.tenant_a.schema_name, 2 * 10**9 + uuid.uuid4().int % 10**6
    key = events.cancel_key(schema, turn_id)
    with cancel.cancel_watch(schema, turn_id):
        with cancel.cancel_watch(schema, turn_id):
            assert cancel._watcher.keys[key] == 2
        assert cancel._watcher.keys[key] == 1
    assert key not in cancel._watcher.keys
