"""Parked turns built directly as rows, for tests of approvals that do not run the tool loop:
a turn in ``awaiting_approval`` with its ``ToolCall`` and a pending ``ApprovalRequest``, as the
loop leaves them (``agents.runtime.orchestrator``)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from django.utils import timezone
from django_tenants.utils import schema_context

from agents.models import Agent, ApprovalRequest, ChatSession, Tool, ToolCall, Turn
from agents.services import agent_create, agent_version_publish, chat_message_send, chat_session_create
from tenants.models import ApiKey, Membership, Tenant, User
from tenants.principal import Principal

TICKET_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "description": "One line saying what is wrong"},
        "priority": {"type": "string", "enum": ["low", "normal", "high"], "description": "How urgent it is"},
        "body": {"type": "string", "description": "The details, as the user told them"},
    },
    "required": ["title"],
}


def member_principal(tenant: Tenant, user: User) -> Principal:
    membership = Membership.objects.select_related("user", "tenant").get(user=user, tenant=tenant)
    return Principal.for_member(membership)


def key_principal(key_id: str) -> Principal:
    """The principal of the stored key ``key_id``, as ``api_key_authenticate`` would build it."""
    key = ApiKey.objects.select_related("tenant", "acting_user").get(key_id=key_id)
    role = Membership.objects.filter(user=key.acting_user, tenant=key.tenant).values_list("role", flat=True).first()
    key.acting_role = role  # type: ignore[attr-defined]
    return Principal.for_api_key(key)


def key_id_of(secret: str) -> str:
    """The public key id of an API key's secret (``<prefix>_<key_id>_<random>``)."""
    return secret.split("_")[1]


def write_tool(name: str = "create_ticket") -> Tool:
    """The tenant's HTTP write tool ``name`` that needs approval (made if missing)."""
    tool, _ = Tool.objects.get_or_create(
        name=name,
        defaults={
            "description": "Open a ticket in the IT helpdesk",
            "kind": Tool.Kind.HTTP,
            "parameters": TICKET_PARAMETERS,
            "side_effect": Tool.SideEffect.WRITE,
            "requires_approval": True,
            "method": "POST",
            "url": "http://127.0.0.1:9/tickets",
        },
    )
    return tool


def published_agent(slug: str | None = None) -> Agent:
    principal = Principal.system("tests")
    agent = agent_create(
        principal=principal,
        slug=slug or f"approvals-{uuid.uuid4().hex[:8]}",
        name="Approvals",
        config={"system_prompt": "Open tickets when asked."},
    )
    agent_version_publish(principal=principal, version=agent.versions.get())
    return Agent.objects.select_related("active_version").get(pk=agent.pk)


def park(
    *,
    tenant: Tenant,
    requester: Principal,
    agent: Agent | None = None,
    session: ChatSession | None = None,
    tool: Tool | None = None,
    arguments: dict[str, Any] | None = None,
    question: str = "My screen is broken",
    ttl: dt.timedelta = dt.timedelta(hours=24),
    call_id: str | None = None,
    created_at: dt.datetime | None = None,
) -> ApprovalRequest:
    """A turn of ``requester``'s session parked on a call of ``tool`` (default ``create_ticket``)
    waiting for approval; in ``tenant``'s schema, inside the caller's transaction."""
    with schema_context(tenant.schema_name):
        tool = tool or write_tool()
        if session is None:
            session = chat_session_create(principal=requester, agent=agent or published_agent())
        turn = chat_message_send(principal=requester, session=session, content=question, enqueue=False)
        Turn.objects.filter(pk=turn.pk).update(
            status=Turn.Status.AWAITING_APPROVAL,
            started_at=timezone.now(),
            loop_state={"messages": [{"role": "user", "content": question}]},
        )
        arguments = arguments if arguments is not None else {"title": "Laptop screen broken", "priority": "high"}
        call = ToolCall.objects.create(
            turn=turn,
            sequence=1,
            call_id=call_id or f"call_{uuid.uuid4().hex[:10]}",
            tool=tool,
            tool_name=tool.name,
            arguments=arguments,
            arguments_raw=str(arguments),
            status=ToolCall.Status.AWAITING_APPROVAL,
        )
        created = created_at or timezone.now()
        if requester.api_key is not None:
            who = {
                "requested_by_user_id": requester.api_key.acting_user_id,
                "requested_by_api_key_id": requester.api_key.key_id,
            }
        else:
            who = {"requested_by_user_id": requester.user.pk if requester.user else None}
        return ApprovalRequest.objects.create(
            tool_call=call,
            turn_id=turn.pk,
            tool_name=tool.name,
            arguments=arguments,
            excerpt=[{"role": "user", "content": question}],
            requested_by_label=requester.label,
            expires_at=created + ttl,
            created_at=created,
            **who,
        )
