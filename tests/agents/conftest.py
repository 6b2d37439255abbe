"""Chat fixtures: model endpoints on the scripted server, and a published agent in tenant A.

Rows that the live worker and server must see are committed once per session (unique names)
under ``django_db_blocker.unblock()``; tests then act through the server and worker.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django_tenants.utils import schema_context

from agents.models import Agent
from agents.services import agent_create, agent_version_publish
from config.crypto import secret_encrypt
from tenants.models import ModelEndpoint
from tenants.principal import Principal
from tests.conftest import World
from tests.scripted_llm import ScriptedLLM


@dataclasses.dataclass(frozen=True)
class ChatWorld:
    agent_slug: str
    agent_id: int
    model: str  # the scripted model name serving the agent's tier


def endpoint_create(*, name: str, model: str, api_base: str, tier: str = "standard", priority: int = 100,
                    tenant: Any = None, api_key: str = "", context_window: int = 8192,
                    timeout_seconds: float = 5.0) -> ModelEndpoint:
    return ModelEndpoint.objects.create(
        name=name, model=f"openai/{model}", api_base=api_base, tier=tier, priority=priority, tenant=tenant,
        api_key_encrypted=secret_encrypt(api_key), context_window=context_window, timeout_seconds=timeout_seconds,
        input_price_per_mtok=1, output_price_per_mtok=2,
    )


@pytest.fixture(scope="session")
def chat_world(django_db_setup: World, django_db_blocker: Any, scripted_llm: ScriptedLLM) -> Iterator[ChatWorld]:
    """A published agent ``helpdesk-live`` in tenant A on tier ``light``, served by the scripted
    model ``live-main`` (committed)."""
    model = "live-main"
    scripted_llm.script(model)
    with django_db_blocker.unblock():
        endpoint_create(name="scripted light", model=model, api_base=scripted_llm.api_base, tier="light")
        tenant = django_db_setup.tenant_a
        with schema_context(tenant.schema_name):
            principal = Principal.system("tests", tenant=tenant)
            agent = agent_create(principal=principal, slug="helpdesk-live", name="Helpdesk (live)",
                                 config={"system_prompt": "Answer briefly.", "tier": "light"})
            agent_version_publish(principal=principal, version=agent.versions.get())
            agent_id = agent.pk
        connection.set_schema_to_public()
    yield ChatWorld(agent_slug="helpdesk-live", agent_id=agent_id, model=model)


def sse_events(body: str) -> list[dict[str, Any]]:
    """The ``data:`` payloads of a Server-Sent Events body, parsed as JSON, with ``event`` set."""
    out: list[dict[str, Any]] = []
    for block in body.split("\n\n"):
        name, data = "", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if data and data != "[DONE]":
            item = json.loads(data)
            if name and "event" not in item:
                item["event"] = name
            out.append(item)
    return out


__all__ = ["Agent", "ChatWorld", "endpoint_create", "sse_events"]


@pytest.fixture(scope="session")
def member_cookie(django_db_setup: World, django_db_blocker: Any) -> Any:
    """``member_cookie("operator")``: a committed session cookie header value of that persona.

    Made eagerly here: a session-scoped fixture is set up outside any test's transaction."""
    from django.test import Client

    cookies: dict[str, str] = {}
    with django_db_blocker.unblock():
        for persona in django_db_setup.users:
            client = Client()
            client.force_login(django_db_setup.user(persona))
            cookies[persona] = f"sessionid={client.cookies['sessionid'].value}"
        connection.set_schema_to_public()
    return cookies.__getitem__


def ws_connect(port: int, path: str, *, cookie: str | None, host: str = "acme.localhost",
               origin: str | None = None) -> Any:
    """A websockets client to ``path`` on the live server, sending ``Host: <host>:<port>``."""
    import socket

    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    headers = {"Origin": origin or f"http://{host}:{port}"}
    if cookie:
        headers["Cookie"] = cookie
    return connect(f"ws://{host}:{port}{path}", sock=sock, additional_headers=headers, open_timeout=10)


def committed(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` in another thread, whose own database connection autocommits, so live
    processes see what it writes (the test's connection is inside a rolled-back transaction)."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def run() -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def chat_session_commit(tenant: Any, persona_user: Any, agent_id: int) -> int:
    """A committed chat session of ``persona_user`` with the agent; returns its id."""
    from agents.services import chat_session_create
    from tenants.models import Membership

    def create() -> int:
        with schema_context(tenant.schema_name):
            membership = Membership.objects.select_related("user", "tenant").get(user=persona_user, tenant=tenant)
            return int(chat_session_create(principal=Principal.for_member(membership),
                                           agent=Agent.objects.get(pk=agent_id)).pk)

    return int(committed(create))


def calculator_agent_committed(*, tenant: Any, llm: ScriptedLLM, prefix: str, endpoints: list[int]) -> str:
    """A committed agent of ``tenant`` on its own scripted model (tier light) that calls
    ``calculator`` once, then answers "It is 42."; returns its slug. The endpoint's id is appended
    to ``endpoints`` for the caller to delete."""
    import uuid

    from tests.scripted_llm import ScriptedCall, Step

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    llm.script(name, steps=[Step(tool_calls=[ScriptedCall("calculator", json.dumps({"expression": "6*7"}))]),
                            Step(tokens=["It is", " 42."])])

    def create() -> None:
        endpoint = endpoint_create(name=name, model=name, api_base=llm.api_base, tier="light", priority=9000)
        endpoints.append(endpoint.pk)
        with schema_context(tenant.schema_name):
            system = Principal.system("tests", tenant=tenant)
            agent = agent_create(principal=system, slug=name, name=name,
                                 config={"system_prompt": "Use the tools.", "tier": "light",
                                         "endpoint_id": endpoint.pk, "tools": ["calculator"]})
            agent_version_publish(principal=system, version=agent.versions.get())

    committed(create)
    return name

