"""Recording usage events and reading them over GET /api/v1/usage/events."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
import structlog
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django_tenants.utils import schema_context

from billing.models import UsageEvent
from billing.services import usage as usage_services
from billing.services import usage_event_record
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client

T0 = dt.datetime(2022, 6, 1, 12, 0, tzinfo=dt.UTC)


class FakeClock:
    """Stands in for ``django.utils.timezone`` in the usage service, so events get set times."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def now(self) -> dt.datetime:
        return self.at


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(T0)
    monkeypatch.setattr(usage_services, "timezone", fake)
    return fake


def _record(schema: str, **kwargs: Any) -> UsageEvent:
    kwargs.setdefault("kind", UsageEvent.Kind.KB_QUERY)
    kwargs.setdefault("quantity", 1)
    with schema_context(schema):
        return usage_event_record(**kwargs)


def _ids(schema: str) -> list[int]:
    with schema_context(schema):
        return list(UsageEvent.objects.order_by("-id").values_list("id", flat=True))


def _list(client: Client, **params: Any) -> Any:
    response = client.get("/api/v1/usage/events", params)
    assert response.status_code == 200, response.content
    return response.json()


# --- Recording ----------------------------------------------------------------------------


def test_it_records_cost_as_quantity_times_unit_price(world: World) -> None:
    schema = world.tenant_a.schema_name
    event = _record(schema, kind="llm.input_tokens", quantity=1500, unit_price=Decimal("0.000002"),
                    model="gpt-test", agent_id=7, session_id=8, turn_id=9, metadata={"cached": False})
    with schema_context(schema):
        stored = UsageEvent.objects.get(pk=event.pk)
    assert stored.cost == Decimal("0.003")
    assert stored.unit_price == Decimal("0.000002")
    assert stored.unit == "token" and stored.currency == "USD"
    assert (stored.model, stored.agent_id, stored.session_id, stored.turn_id) == ("gpt-test", 7, 8, 9)
    assert stored.metadata == {"cached": False}
    assert stored.created_at is not None and stored.created_at.tzinfo is not None


@pytest.mark.parametrize(("kind", "unit"), [("llm.output_tokens", "token"), ("embedding.tokens", "token"),
                                            ("kb.query", "query"), ("tool.call", "call")])
def test_it_gives_each_kind_its_unit(world: World, kind: str, unit: str) -> None:
    event = _record(world.tenant_a.schema_name, kind=kind, quantity=3, unit_price=Decimal("0.25"))
    assert event.unit == unit and event.cost == Decimal("0.75")


def test_a_free_event_costs_nothing(world: World) -> None:
    event = _record(world.tenant_a.schema_name, kind="tool.call", quantity=0)
    with schema_context(world.tenant_a.schema_name):
        assert UsageEvent.objects.get(pk=event.pk).cost == Decimal(0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "llm.thoughts", "quantity": 1}, "unknown usage kind"),
    ({"kind": "", "quantity": 1}, "unknown usage kind"),
    ({"kind": "kb.query", "quantity": -1}, "negative"),
])
def test_it_rejects_unknown_kinds_and_negative_quantities(world: World, kwargs: dict[str, Any],
                                                          message: str) -> None:
    schema = world.tenant_a.schema_name
    before = _ids(schema)
    with pytest.raises(ValueError, match=message):
        _record(schema, **kwargs)
    assert _ids(schema) == before


def test_it_stamps_the_request_id_from_the_log_context(world: World) -> None:
    with structlog.contextvars.bound_contextvars(request_id="req-usage-1"):
        event = _record(world.tenant_a.schema_name)
    assert event.request_id == "req-usage-1"


def test_usage_events_cannot_be_changed_or_removed(world: World) -> None:
    schema = world.tenant_a.schema_name
    event = _record(schema, kind="kb.query", quantity=2, unit_price=Decimal("0.01"))
    with schema_context(schema):
        with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
            UsageEvent.objects.filter(pk=event.pk).update(cost=Decimal(0))
        with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
            UsageEvent.objects.filter(pk=event.pk).delete()
        for sql in ("UPDATE billing_usageevent SET quantity = 0", "DELETE FROM billing_usageevent",
                    "TRUNCATE billing_usageevent"):
            with pytest.raises(IntegrityError, match="append-only"), transaction.atomic(), \
                    connection.cursor() as cursor:
                cursor.execute(sql)
        stored = UsageEvent.objects.get(pk=event.pk)
    assert (stored.quantity, stored.cost) == (2, Decimal("0.02"))


# --- API ----------------------------------------------------------------------------------


@pytest.fixture
def scenario(world: World, clock: FakeClock) -> dict[str, UsageEvent]:
    """Usage in tenant A on three days by two agents, plus usage in tenant B."""
    a = world.tenant_a.schema_name
    made: dict[str, UsageEvent] = {}
    clock.at = T0
    made["tokens_agent1_day1"] = _record(a, kind="llm.input_tokens", quantity=100, agent_id=1)
    made["query_agent2_day1"] = _record(a, kind="kb.query", quantity=1, agent_id=2)
    clock.at = T0 + dt.timedelta(days=1)
    made["tokens_agent2_day2"] = _record(a, kind="llm.input_tokens", quantity=200, agent_id=2)
    clock.at = T0 + dt.timedelta(days=2)
    made["tool_agent1_day3"] = _record(a, kind="tool.call", quantity=1, agent_id=1)
    clock.at = T0 + dt.timedelta(days=1)
    made["b_tokens"] = _record(world.tenant_b.schema_name, kind="llm.input_tokens", quantity=999, agent_id=1,
                               model="globex-secret-model")
    return made


def test_it_lists_usage_newest_first(world: World, api_a: Client, scenario: dict[str, UsageEvent]) -> None:
    body = _list(api_a)
    ids = [e["id"] for e in body["items"]]
    assert ids == _ids(world.tenant_a.schema_name)
    assert body["next_cursor"] is None
    newest = body["items"][0]
    assert newest["kind"] == "tool.call" and newest["unit"] == "call" and newest["agent_id"] == 1
    assert Decimal(str(newest["cost"])) == Decimal(0)


def test_it_filters_by_kind_and_agent(world: World, api_a: Client, scenario: dict[str, UsageEvent]) -> None:
    tokens = _list(api_a, kind="llm.input_tokens")["items"]
    assert [e["id"] for e in tokens] == [scenario["tokens_agent2_day2"].pk, scenario["tokens_agent1_day1"].pk]
    agent1 = _list(api_a, agent=1)["items"]
    assert [e["id"] for e in agent1] == [scenario["tool_agent1_day3"].pk, scenario["tokens_agent1_day1"].pk]
    both = _list(api_a, kind="llm.input_tokens", agent=2)["items"]
    assert [e["id"] for e in both] == [scenario["tokens_agent2_day2"].pk]
    assert _list(api_a, kind="embedding.tokens")["items"] == []


def test_it_filters_by_from_inclusive_and_to_exclusive(world: World, api_a: Client,
                                                       scenario: dict[str, UsageEvent]) -> None:
    day2 = T0 + dt.timedelta(days=1)
    window = _list(api_a, **{"from": day2.isoformat(), "to": (day2 + dt.timedelta(days=1)).isoformat()})["items"]
    assert [e["id"] for e in window] == [scenario["tokens_agent2_day2"].pk]
    until_day2 = _list(api_a, to=day2.isoformat())["items"]
    assert [e["id"] for e in until_day2] == [scenario["query_agent2_day1"].pk, scenario["tokens_agent1_day1"].pk]
    since_day2 = _list(api_a, **{"from": "2022-06-02T12:00:00Z"})["items"]
    assert [e["id"] for e in since_day2] == [scenario["tool_agent1_day3"].pk, scenario["tokens_agent2_day2"].pk]


def test_it_rejects_an_agent_that_is_not_a_number(world: World, api_a: Client) -> None:
    response = api_a.get("/api/v1/usage/events", {"agent": "one"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"


def test_it_rejects_a_kind_that_is_not_a_usage_event_kind(world: World, api_a: Client) -> None:
    response = api_a.get("/api/v1/usage/events", {"kind": "false"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"


def test_pagination_walks_every_event_exactly_once(world: World, api_a: Client) -> None:
    for n in range(11):
        _record(world.tenant_a.schema_name, kind="tool.call", quantity=n)
    seen: list[int] = []
    cursor = None
    for _ in range(20):
        params: dict[str, Any] = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        body = _list(api_a, **params)
        assert len(body["items"]) <= 4
        seen += [e["id"] for e in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == _ids(world.tenant_a.schema_name)
    assert len(seen) == len(set(seen)) >= 11


def test_it_rejects_an_invalid_cursor_or_limit(world: World, api_a: Client) -> None:
    bad_cursor = api_a.get("/api/v1/usage/events", {"cursor": "nope"})
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"]["code"] == "invalid_cursor"
    for limit in (0, 201):
        bad_limit = api_a.get("/api/v1/usage/events", {"limit": limit})
        assert bad_limit.status_code == 422 and bad_limit.json()["error"]["code"] == "invalid_limit"


def test_the_list_endpoints_query_count_does_not_grow_with_events(
    world: World, api_a: Client, django_assert_max_num_queries: Any
) -> None:
    for _ in range(5):
        _record(world.tenant_a.schema_name)
    api_a.get("/api/v1/usage/events")  # first use of the key may touch last_used_at
    with django_assert_max_num_queries(6) as few:
        assert api_a.get("/api/v1/usage/events").status_code == 200
    for _ in range(55):
        _record(world.tenant_a.schema_name)
    with django_assert_max_num_queries(len(few.captured_queries)):
        body = _list(api_a)
    assert len(body["items"]) == 50


@pytest.mark.parametrize(("persona", "status"), [("viewer", 403), ("outsider", 403), ("auditor", 200),
                                                 ("operator", 200), ("owner", 200)])
def test_sessions_need_usage_read(world: World, scenario: dict[str, UsageEvent], persona: str,
                                  status: int) -> None:
    response = host_client(HOST_A, world.user(persona)).get("/api/v1/usage/events")
    assert response.status_code == status, response.content
    if status == 403:
        assert response.json()["error"]["code"] in {"permission_denied", "not_a_member"}
        assert b"llm.input_tokens" not in response.content
    else:
        assert len(response.json()["items"]) == 4


def test_a_key_without_usage_read_is_forbidden(world: World) -> None:
    key = api_key_create(principal=Principal.system("tests", tenant=world.tenant_a), tenant=world.tenant_a,
                         name="no usage", scopes=["tenant:read", "audit:read"]).secret
    response = api_client(HOST_A, key).get("/api/v1/usage/events")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_usage_of_another_tenant_is_never_returned(world: World, api_a: Client,
                                                   scenario: dict[str, UsageEvent]) -> None:
    b_event = scenario["b_tokens"]
    everything = _list(api_a, limit=200)["items"]
    assert all(e["model"] != "globex-secret-model" for e in everything)
    assert all(e["quantity"] != 999 for e in _list(api_a, kind="llm.input_tokens", agent=1)["items"])
    # Ids are per schema, so B's row id may exist in A too; what matters is A's rows only.
    assert {e["id"] for e in everything} == set(_ids(world.tenant_a.schema_name))
    # B's key is refused on A's host, and B sees its own usage on its host.
    assert api_client(HOST_A, world.key_b).get("/api/v1/usage/events").status_code == 401
    own = _list(api_client(HOST_B, world.key_b))["items"]
    assert [e["id"] for e in own] == [b_event.pk] and own[0]["model"] == "globex-secret-model"
    assert host_client(HOST_B, world.user("owner")).get("/api/v1/usage/events").status_code == 403
