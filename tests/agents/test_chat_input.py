"""Text the chat cannot store (NUL, unpaired surrogates) is refused by the service that the REST
API, the OpenAI-compatible endpoint and the chat socket's worker task all call: the socket's
sender gets an ``error`` event with code ``invalid_characters``, nothing is saved, no 500."""

from __future__ import annotations

from typing import Any

import pytest
from django_tenants.utils import schema_context

from agents import tasks
from agents.models import ChatSession, Message, Turn
from agents.services import agent_create, agent_version_publish, chat_message_send, chat_session_create
from config.errors import ValidationFailed
from tenants.models import Membership
from tenants.principal import Principal
from tests.conftest import World

pytestmark = pytest.mark.django_db

UNSTORABLE = ["before\x00after", "lone \ud800 half", "\udfff"]


def _operator_session(world: World) -> tuple[Membership, ChatSession]:
    membership = Membership.objects.select_related("user", "tenant").get(tenant=world.tenant_a,
                                                                          user=world.user("operator"))
    system = Principal.system("tests", tenant=world.tenant_a)
    agent = agent_create(principal=system, slug="socket-desk", name="Socket desk")
    agent = agent_version_publish(principal=system, version=agent.versions.get())
    session = chat_session_create(principal=Principal.for_member(membership), agent=agent)
    return membership, session


@pytest.mark.parametrize("content", UNSTORABLE)
def test_the_socket_task_answers_unstorable_text_with_an_error_event(world: World, content: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks.events, "publish", lambda group, event: published.append(event))
    with schema_context(world.tenant_a.schema_name):
        membership, session = _operator_session(world)
        tasks.chat_message_accept_task(membership.pk, session.pk, content)
        assert not Message.objects.filter(session=session).exists()
        assert not Turn.objects.filter(session=session).exists()
    assert [event["error"]["code"] for event in published] == ["invalid_characters"]


@pytest.mark.parametrize("content", UNSTORABLE)
def test_the_service_refuses_unstorable_text_and_history(world: World, content: str) -> None:
    with schema_context(world.tenant_a.schema_name):
        membership, session = _operator_session(world)
        principal = Principal.for_member(membership)
        with pytest.raises(ValidationFailed) as refused:
            chat_message_send(principal=principal, session=session, content=content, enqueue=False)
        assert refused.value.code == "invalid_characters"
        with pytest.raises(ValidationFailed):
            chat_message_send(principal=principal, session=session, content="fine", enqueue=False,
                              history=[{"role": "user", "content": content}])
        assert not Message.objects.filter(session=session).exists()
