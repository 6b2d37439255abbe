"""Shared setup of the budget tests: an agent on its own scripted model, turns run in this
process (``turn_run``), and helpers to read the counters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agents.models import Agent, ChatSession, Turn
from agents.runtime.llm import message_tokens
from agents.runtime.orchestrator import turn_run
from agents.runtime.prompt import build_prompt
from agents.services import agent_create, agent_version_publish, chat_message_send, chat_session_create
from billing.models import Budget, BudgetPeriod, BudgetReservation, UsageEvent
from tenants.models import ApiKey, Membership, Tenant
from tenants.principal import Principal
from tests.agents.conftest import endpoint_create
from tests.scripted_llm import ScriptedLLM

QUESTION = "How much does the plan cost?"
MAX_OUTPUT = 8  # the agents' max_output_tokens; the scripted answers stream this many tokens


@dataclass
class BudgetSetup:
    tenant: Tenant
    llm: ScriptedLLM
    model: str
    agent: Agent
    principal: Principal

    def session(self, principal: Principal | None = None) -> ChatSession:
        return chat_session_create(principal=principal or self.principal, agent=Agent.objects.get(pk=self.agent.pk))

    def ask(self, session: ChatSession | None = None, principal: Principal | None = None) -> Turn:
        principal = principal or self.principal
        session = session or self.session(principal)
        return chat_message_send(principal=principal, session=session, content=QUESTION, enqueue=False)

    def run(self, session: ChatSession | None = None, principal: Principal | None = None) -> Turn:
        turn = self.ask(session, principal)
        turn_run(turn.pk)
        turn.refresh_from_db()
        return turn

    def requests(self) -> int:
        return len(self.llm.requests_for(self.model))

    def worst_case(self) -> int:
        """The tokens one call of a fresh session reserves (prompt estimate + max output)."""
        version = Agent.objects.get(pk=self.agent.pk).versions.get()
        prompt = build_prompt(version=version, history=[], question=QUESTION, hits=[], context_window=8192)
        return sum(message_tokens(m) + 4 for m in prompt.messages) + MAX_OUTPUT


def agent_on_scripted_model(tenant: Tenant, llm: ScriptedLLM, member: Any, *, exact: bool = True) -> BudgetSetup:
    """In the current (tenant) schema: an agent on its own scripted model. ``exact``: the model
    reports as many prompt tokens as the platform's estimate and streams ``MAX_OUTPUT`` tokens, so
    a call's real usage equals its reserved worst case."""
    model = f"budget-{uuid.uuid4().hex[:10]}"
    llm.script(model, tokens=["tok "] * MAX_OUTPUT)
    endpoint = endpoint_create(name=model, model=model, api_base=llm.api_base, tier="light", priority=9000)
    system = Principal.system("tests", tenant=tenant)
    agent = agent_create(principal=system, slug=model, name=model,
                         config={"system_prompt": "Answer briefly.", "tier": "light", "endpoint_id": endpoint.pk,
                                 "max_output_tokens": MAX_OUTPUT})
    agent_version_publish(principal=system, version=agent.versions.get())
    membership = Membership.objects.select_related("user", "tenant").get(user=member, tenant=tenant)
    setup = BudgetSetup(tenant=tenant, llm=llm, model=model, agent=agent,
                        principal=Principal.for_member(membership))
    prompt_tokens = setup.worst_case() - MAX_OUTPUT if exact else 5
    llm.script(model, tokens=["tok "] * MAX_OUTPUT, prompt_tokens=prompt_tokens)
    return setup


def budget_add(**fields: Any) -> Budget:
    values: dict[str, Any] = {"name": "test budget", "scope": "tenant", "period": "month", "action": "block",
                              "alert_thresholds": [0.8, 1.0], **fields}
    return Budget.objects.create(**values)


def period_of(budget: Budget) -> BudgetPeriod:
    return BudgetPeriod.objects.get(budget=budget)


def model_spend(**filters: Any) -> tuple[int, Decimal]:
    events = UsageEvent.objects.filter(kind__in=["llm.input_tokens", "llm.output_tokens"], **filters)
    return sum(e.quantity for e in events), sum((e.cost for e in events), Decimal(0))


def open_reservations() -> int:
    return BudgetReservation.objects.count()


def key_principal(tenant: Tenant, raw_key: str) -> tuple[ApiKey, Principal]:
    """The API key ``raw_key`` of ``tenant`` and its principal, as the API authenticates it."""
    from tenants.services.keys import api_key_authenticate

    key = api_key_authenticate(raw_key=raw_key, tenant=tenant)
    return key, Principal.for_api_key(key)
