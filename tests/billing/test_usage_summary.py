"""Usage and cost: GET /api/v1/usage/summary, the console's /usage/ page and its CSV export, the
cost beside each chat answer, and the dashboard's tokens and cost."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import Count, Q, Sum
from django.test import Client
from django_tenants.utils import schema_context

from agents.chat_html import event_fragment
from agents.models import Agent, AgentVersion, ChatSession, Message, Turn
from billing.models import UsageEvent
from billing.services import usage as usage_services
from billing.services import usage_event_record
from tenants.models import ApiKey, Tenant
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client

NEW_YORK = "America/New_York"
MARCH = {"start": "2024-03-01", "end": "2024-04-01"}
# Instants around the edges of March 2024 in New York (EST -5 until 10 March, EDT -4 after).
UTC = dt.UTC


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=UTC)


class FakeClock:
    """Stands in for ``django.utils.timezone`` in the usage service, so events get set times."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def now(self) -> dt.datetime:
        return self.at


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(_at(2024, 3, 10, 12))
    monkeypatch.setattr(usage_services, "timezone", fake)
    return fake


def _record(schema: str, clock: FakeClock, at: dt.datetime, **fields: Any) -> UsageEvent:
    clock.at = at
    fields.setdefault("user_id", None)
    fields.setdefault("api_key_id", "")
    with schema_context(schema):
        return usage_event_record(**fields)


def _key_id(tenant: Tenant, name: str) -> str:
    return ApiKey.objects.get(tenant=tenant, name=name).key_id


@pytest.fixture
def scenario(world: World, clock: FakeClock) -> dict[str, Any]:
    """Tenant A in New York with March 2024 usage by two agents, two members, one key and
    nobody, events just outside March on both sides, and tenant B's usage in the same days."""
    Tenant.objects.filter(pk=world.tenant_a.pk).update(time_zone=NEW_YORK)
    a, b = world.tenant_a.schema_name, world.tenant_b.schema_name
    with schema_context(a):
        helpdesk = Agent.objects.create(slug="helpdesk", name="Helpdesk")
        research = Agent.objects.create(slug="research", name="Research")
    owner, operator = world.user("owner"), world.user("operator")
    key = _key_id(world.tenant_a, "acme all")
    price_in, price_out = Decimal("0.000002"), Decimal("0.00001")
    made = {
        # 23:00 EST on 29 February: February in New York, though 1 March in UTC.
        "before": _record(
            a,
            clock,
            _at(2024, 3, 1, 4),
            kind="llm.input_tokens",
            quantity=7,
            unit_price=price_in,
            model="gpt-a",
            agent_id=helpdesk.pk,
            user_id=owner.pk,
        ),
        "in_1": _record(
            a,
            clock,
            _at(2024, 3, 10, 12),
            kind="llm.input_tokens",
            quantity=1000,
            unit_price=price_in,
            model="gpt-a",
            agent_id=helpdesk.pk,
            user_id=owner.pk,
        ),
        "out_1": _record(
            a,
            clock,
            _at(2024, 3, 10, 12),
            kind="llm.output_tokens",
            quantity=200,
            unit_price=price_out,
            model="gpt-a",
            agent_id=helpdesk.pk,
            user_id=owner.pk,
        ),
        # 23:30 EDT on 10 March in New York, 11 March in UTC.
        "in_key": _record(
            a,
            clock,
            _at(2024, 3, 11, 3, 30),
            kind="llm.input_tokens",
            quantity=500,
            unit_price=Decimal("0.000001"),
            model="gpt-b",
            agent_id=research.pk,
            api_key_id=key,
        ),
        "search": _record(a, clock, _at(2024, 3, 11, 15), kind="kb.query", quantity=1, unit_price=Decimal("0.01")),
        "tool": _record(
            a, clock, _at(2024, 3, 11, 15), kind="tool.call", quantity=1, agent_id=helpdesk.pk, user_id=operator.pk
        ),
        "embed": _record(
            a, clock, _at(2024, 3, 11, 16), kind="embedding.tokens", quantity=300, unit_price=Decimal("0.0000001")
        ),
        # 22:00 EDT on 31 March: still March in New York.
        "late": _record(
            a,
            clock,
            _at(2024, 4, 1, 2),
            kind="llm.output_tokens",
            quantity=50,
            unit_price=price_out,
            model="gpt-b",
            agent_id=research.pk,
            user_id=operator.pk,
        ),
        # 01:00 EDT on 1 April.
        "after": _record(
            a,
            clock,
            _at(2024, 4, 1, 5),
            kind="llm.input_tokens",
            quantity=9,
            unit_price=price_in,
            model="gpt-a",
            agent_id=helpdesk.pk,
            user_id=owner.pk,
        ),
        "b": _record(
            b,
            clock,
            _at(2024, 3, 10, 12),
            kind="llm.input_tokens",
            quantity=999,
            unit_price=Decimal("1"),
            model="globex-secret-model",
            agent_id=helpdesk.pk,
        ),
    }
    return {"events": made, "helpdesk": helpdesk, "research": research, "key": key}


def _summary(client: Client, **params: Any) -> dict[str, Any]:
    response = client.get("/api/v1/usage/summary", params)
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def _march_events(world: World) -> dict[str, Any]:
    """What the events of March in New York add up to, read straight from the table."""
    with schema_context(world.tenant_a.schema_name):
        events = UsageEvent.objects.filter(created_at__gte=_at(2024, 3, 1, 5), created_at__lt=_at(2024, 4, 1, 4))
        return events.aggregate(
            input_tokens=Sum("quantity", filter=Q(kind="llm.input_tokens")),
            output_tokens=Sum("quantity", filter=Q(kind="llm.output_tokens")),
            cost=Sum("cost"),
            events=Count("id"),
        )


def _measures(row: dict[str, Any]) -> tuple[int, int, int, Decimal, int]:
    return row["input_tokens"], row["output_tokens"], row["tokens"], Decimal(row["cost"]), row["events"]


# --- Sums and groups ----------------------------------------------------------------------


@pytest.mark.parametrize("group_by", ["day", "agent", "model", "member", "api_key"])
def test_each_groupings_sums_equal_the_events(
    world: World, api_a: Client, scenario: dict[str, Any], group_by: str
) -> None:
    body = _summary(api_a, group_by=group_by, **MARCH)
    expected = _march_events(world)
    totals = body["totals"]
    assert _measures(totals) == (
        expected["input_tokens"],
        expected["output_tokens"],
        expected["input_tokens"] + expected["output_tokens"],
        expected["cost"],
        expected["events"],
    )
    assert totals["tokens"] == 1000 + 200 + 500 + 50  # model tokens only: embeddings are not in "tokens"
    for name in ("input_tokens", "output_tokens", "tokens", "events"):
        assert sum(g[name] for g in body["groups"]) == totals[name]
    assert sum(Decimal(g["cost"]) for g in body["groups"]) == Decimal(totals["cost"])
    assert isinstance(totals["cost"], str) and isinstance(body["groups"][0]["cost"], str)
    assert body["group_by"] == group_by and body["time_zone"] == NEW_YORK and body["currency"] == "USD"
    assert (body["start"], body["end"]) == ("2024-03-01", "2024-04-01")


def test_days_are_the_tenants_local_dates(world: World, api_a: Client, scenario: dict[str, Any]) -> None:
    groups = _summary(api_a, group_by="day", **MARCH)["groups"]
    # 03:30 UTC on 11 March is the evening of 10 March in New York; 02:00 UTC on 1 April is 31 March.
    assert [(g["date"], g["events"]) for g in groups] == [("2024-03-10", 3), ("2024-03-11", 3), ("2024-03-31", 1)]
    first = groups[0]
    assert (first["key"], first["input_tokens"], first["output_tokens"]) == ("2024-03-10", 1500, 200)
    assert Decimal(first["cost"]) == Decimal("0.0045")  # 1000 x 0.000002 + 200 x 0.00001 + 500 x 0.000001


def test_in_utc_the_same_events_fall_on_other_days(world: World, api_a: Client, scenario: dict[str, Any]) -> None:
    Tenant.objects.filter(pk=world.tenant_a.pk).update(time_zone="UTC")
    body = _summary(api_a, group_by="day", **MARCH)
    assert body["time_zone"] == "UTC"
    assert [(g["date"], g["events"]) for g in body["groups"]] == [
        ("2024-03-01", 1),
        ("2024-03-10", 2),
        ("2024-03-11", 4),
    ]


def test_agent_groups_carry_id_slug_and_name(world: World, api_a: Client, scenario: dict[str, Any]) -> None:
    groups = {g["key"]: g for g in _summary(api_a, group_by="agent", **MARCH)["groups"]}
    helpdesk, research = scenario["helpdesk"], scenario["research"]
    assert set(groups) == {str(helpdesk.pk), str(research.pk), "unattributed"}
    assert groups[str(helpdesk.pk)]["agent"] == {"id": helpdesk.pk, "slug": "helpdesk", "name": "Helpdesk"}
    assert _measures(groups[str(helpdesk.pk)]) == (1000, 200, 1200, Decimal("0.004"), 3)
    assert _measures(groups[str(research.pk)]) == (500, 50, 550, Decimal("0.001"), 2)
    assert groups["unattributed"]["agent"] is None and groups["unattributed"]["events"] == 2
    # Costliest first.
    assert [g["key"] for g in _summary(api_a, group_by="agent", **MARCH)["groups"]][0] == "unattributed"


def test_model_groups_put_events_without_a_model_together(
    world: World, api_a: Client, scenario: dict[str, Any]
) -> None:
    groups = {g["key"]: g for g in _summary(api_a, group_by="model", **MARCH)["groups"]}
    assert set(groups) == {"gpt-a", "gpt-b", "unattributed"}
    assert groups["gpt-a"]["model"] == "gpt-a" and groups["gpt-a"]["tokens"] == 1200
    assert groups["unattributed"]["model"] is None and groups["unattributed"]["events"] == 3


def test_member_groups_carry_user_id_and_email(world: World, api_a: Client, scenario: dict[str, Any]) -> None:
    groups = {g["key"]: g for g in _summary(api_a, group_by="member", **MARCH)["groups"]}
    owner, operator = world.user("owner"), world.user("operator")
    assert set(groups) == {str(owner.pk), str(operator.pk), "unattributed"}
    assert groups[str(owner.pk)]["member"] == {"id": owner.pk, "email": "owner@acme.test"}
    assert groups[str(owner.pk)]["tokens"] == 1200
    assert groups[str(operator.pk)]["label"] == "operator@acme.test"
    assert groups["unattributed"]["member"] is None and groups["unattributed"]["events"] == 3


def test_api_key_groups_carry_the_public_id_and_name(world: World, api_a: Client, scenario: dict[str, Any]) -> None:
    groups = {g["key"]: g for g in _summary(api_a, group_by="api_key", **MARCH)["groups"]}
    key = scenario["key"]
    assert set(groups) == {key, "unattributed"}  # blank api_key_id (older events) is unattributed
    assert groups[key]["api_key"] == {"id": key, "name": "acme all"}
    assert _measures(groups[key]) == (500, 0, 500, Decimal("0.0005"), 1)
    assert groups["unattributed"]["api_key"] is None and groups["unattributed"]["events"] == 6


def test_the_default_period_is_the_current_month(world: World, api_a: Client) -> None:
    with schema_context(world.tenant_a.schema_name):
        usage_event_record(kind="llm.input_tokens", quantity=11, model="now-model")
    body = _summary(api_a)
    start = dt.date.fromisoformat(body["start"])
    end = dt.date.fromisoformat(body["end"])
    assert start.day == 1 and end.day == 1 and 28 <= (end - start).days <= 31
    assert body["group_by"] == "day" and body["totals"]["input_tokens"] == 11


@pytest.mark.parametrize(
    "params",
    [
        {"start": "2024-13-01"},
        {"start": "yesterday"},
        {"start": "0"},
        {"end": "1711929600"},
        {"start": "2024-03-01T00:00:00"},
        {"group_by": "week"},
        {"group_by": ""},
        {"start": "2024-04-01", "end": "2024-03-01"},
        {"start": "2024-03-01", "end": "2024-03-01"},
        {"start": "9999-12-31", "end": "9999-12-31"},
    ],
)
def test_bad_parameters_get_422(world: World, api_a: Client, params: dict[str, str]) -> None:
    response = api_a.get("/api/v1/usage/summary", params)
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] in {"validation_failed", "invalid_period"}


def test_an_empty_period_is_refused_with_its_own_code(world: World, api_a: Client) -> None:
    response = api_a.get("/api/v1/usage/summary", {"start": "2024-04-01", "end": "2024-03-01"})
    assert response.json()["error"]["code"] == "invalid_period"


def test_the_summary_is_in_the_openapi_schema(world: World, api_a: Client) -> None:
    schema = api_a.get("/api/v1/openapi.json").json()
    operation = schema["paths"]["/api/v1/usage/summary"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"start", "end", "group_by"}


# --- Permissions and isolation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("persona", "status"), [("viewer", 403), ("outsider", 403), ("auditor", 200), ("operator", 200), ("owner", 200)]
)
def test_sessions_need_usage_read(world: World, scenario: dict[str, Any], persona: str, status: int) -> None:
    response = host_client(HOST_A, world.user(persona)).get("/api/v1/usage/summary", MARCH)
    assert response.status_code == status, response.content
    if status == 403:
        assert response.json()["error"]["code"] in {"permission_denied", "not_a_member"}
        assert b"gpt-a" not in response.content
    else:
        assert response.json()["totals"]["events"] == 7


def test_a_key_without_usage_read_is_forbidden(world: World) -> None:
    key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a),
        tenant=world.tenant_a,
        name="no usage",
        scopes=["tenant:read", "billing:read"],
    ).secret
    response = api_client(HOST_A, key).get("/api/v1/usage/summary")
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


@pytest.mark.parametrize("group_by", ["day", "agent", "model", "member", "api_key"])
def test_another_tenants_usage_never_appears(
    world: World, api_a: Client, scenario: dict[str, Any], group_by: str
) -> None:
    body = _summary(api_a, group_by=group_by, **MARCH)
    assert b"globex-secret-model" not in api_a.get("/api/v1/usage/summary", {"group_by": group_by, **MARCH}).content
    assert body["totals"]["input_tokens"] == 1500 and Decimal(body["totals"]["cost"]) < 1
    # B's key is refused on A's host; on its own host B sees only its own event.
    assert api_client(HOST_A, world.key_b).get("/api/v1/usage/summary", MARCH).status_code == 401
    own = _summary(api_client(HOST_B, world.key_b), group_by=group_by, **MARCH)
    assert own["totals"]["input_tokens"] == 999 and own["totals"]["events"] == 1


def test_the_endpoints_query_count_does_not_grow_with_groups(
    world: World, api_a: Client, clock: FakeClock, django_assert_max_num_queries: Any
) -> None:
    a = world.tenant_a.schema_name
    with schema_context(a):
        agents = [Agent.objects.create(slug=f"agent-{n}", name=f"Agent {n}") for n in range(6)]
    # The first event names an agent, member and key, so each grouping's naming query is counted.
    _record(
        a,
        clock,
        _at(2024, 3, 2, 12),
        kind="llm.input_tokens",
        quantity=1,
        agent_id=agents[0].pk,
        user_id=world.user("owner").pk,
        api_key_id=_key_id(world.tenant_a, "acme all"),
    )
    api_a.get("/api/v1/usage/summary", MARCH)  # first use of the key may touch last_used_at
    baselines: dict[str, int] = {}
    for group_by in ("day", "agent", "member", "api_key"):
        with django_assert_max_num_queries(8) as few:
            _summary(api_a, group_by=group_by, **MARCH)
        baselines[group_by] = len(few.captured_queries)
    for n, agent in enumerate(agents):
        _record(
            a,
            clock,
            _at(2024, 3, 3 + n, 12),
            kind="llm.input_tokens",
            quantity=1,
            agent_id=agent.pk,
            user_id=world.user("operator").pk,
            api_key_id=_key_id(world.tenant_a, "acme all"),
        )
    for group_by, baseline in baselines.items():
        with django_assert_max_num_queries(baseline):
            body = _summary(api_a, group_by=group_by, **MARCH)
        assert body["totals"]["events"] == 7


# --- Console page and CSV -----------------------------------------------------------------


def _page(client: Client, **params: Any) -> str:
    response = client.get("/usage/", params)
    assert response.status_code == 200, response.content
    return response.content.decode()


def test_the_page_shows_each_grouping_as_a_table_with_the_numbers(
    world: World, client_a: Any, scenario: dict[str, Any]
) -> None:
    html = _page(client_a("owner"), period="custom", **MARCH)
    assert 'data-testid="total-tokens">1,750<' in html and 'data-testid="total-cost">0.015030<' in html
    assert 'data-testid="total-events">7<' in html
    for group_by in ("day", "agent", "model", "member", "api_key"):
        assert f'data-testid="usage-table-{group_by}"' in html
        assert f'data-chart="{group_by}"' in html  # a canvas beside each table
    # A row per day of March (zeros included) in the daily table.
    assert html.count('<tr data-key="2024-03-') == 31
    assert '<tr data-key="2024-03-10">' in html and "operator@acme.test" in html and "Helpdesk" in html
    assert "<code>gpt-b</code>" in html and scenario["key"] in html
    assert 'id="usage-data" type="application/json"' in html and "vendor/chartjs/chart.umd.min.js" in html
    assert "globex-secret-model" not in html


def test_the_period_filter_picks_the_days(world: World, client_a: Any, scenario: dict[str, Any]) -> None:
    html = _page(client_a("owner"), period="custom", start="2024-03-11", end="2024-03-12")
    assert 'data-testid="total-events">3<' in html and html.count('<tr data-key="2024-03-') == 1
    this_month = _page(client_a("owner"))
    assert 'aria-current="page" href="/usage/?period=this_month"' in this_month
    assert 'data-testid="total-events">0<' in this_month
    last_7 = _page(client_a("owner"), period="last_7_days")
    assert last_7.count('<tr data-key="') == 7


@pytest.mark.parametrize(
    "params",
    [{"period": "fortnight"}, {"start": "soon"}, {"period": "custom", "start": "2024-03-05", "end": "2024-03-01"}],
)
def test_a_bad_filter_gets_a_422_page(world: World, client_a: Any, params: dict[str, str]) -> None:
    response = client_a("owner").get("/usage/", params)
    assert response.status_code == 422


@pytest.mark.parametrize(("persona", "status"), [("viewer", 403), ("auditor", 200), ("operator", 200)])
def test_the_page_and_export_need_usage_read(
    world: World, client_a: Any, scenario: dict[str, Any], persona: str, status: int
) -> None:
    client = client_a(persona)
    page = client.get("/usage/", {"period": "custom", **MARCH})
    export = client.get("/usage/export.csv", {"period": "custom", **MARCH})
    assert (page.status_code, export.status_code) == (status, status)
    if status == 403:
        assert b"gpt-a" not in page.content and b"gpt-a" not in export.content


def test_an_outsider_gets_neither_page_nor_export(world: World, scenario: dict[str, Any]) -> None:
    outsider = host_client(HOST_A, world.user("outsider"))
    for url in ("/usage/", "/usage/export.csv"):
        response = outsider.get(url, MARCH)
        assert response.status_code in {302, 403, 404}
        assert b"gpt-a" not in response.content
    # On its own host the outsider sees only B's usage.
    html = _page(host_client(HOST_B, world.user("outsider")), period="custom", **MARCH)
    assert "globex-secret-model" in html and "gpt-a" not in html


def test_the_page_query_count_does_not_grow_with_groups(
    world: World, client_a: Any, clock: FakeClock, django_assert_max_num_queries: Any
) -> None:
    a = world.tenant_a.schema_name
    client = client_a("owner")
    with schema_context(a):
        first = Agent.objects.create(slug="first", name="First")
    _record(
        a,
        clock,
        _at(2024, 3, 2, 12),
        kind="llm.input_tokens",
        quantity=1,
        agent_id=first.pk,
        model="m",
        user_id=world.user("owner").pk,
        api_key_id=_key_id(world.tenant_a, "acme all"),
    )
    with django_assert_max_num_queries(20) as few:
        _page(client, period="custom", **MARCH)
    baseline = len(few.captured_queries)
    with schema_context(a):
        agents = [Agent.objects.create(slug=f"agent-{n}", name=f"Agent {n}") for n in range(6)]
    users = [world.user(p) for p in ("owner", "admin", "operator", "auditor")]
    for n, agent in enumerate(agents):
        _record(
            a,
            clock,
            _at(2024, 3, 3 + n, 12),
            kind="llm.input_tokens",
            quantity=1,
            agent_id=agent.pk,
            model=f"model-{n}",
            user_id=users[n % 4].pk,
            api_key_id=_key_id(world.tenant_a, "acme all"),
        )
    with django_assert_max_num_queries(baseline):
        html = _page(client, period="custom", **MARCH)
    assert 'data-testid="total-events">7<' in html


def _csv(client: Client, **params: Any) -> list[dict[str, str]]:
    response = client.get("/usage/export.csv", params)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment;" in response["Content-Disposition"]
    return list(csv.DictReader(io.StringIO(response.content.decode())))


def test_the_csv_holds_the_views_numbers(world: World, client_a: Any, scenario: dict[str, Any]) -> None:
    rows = _csv(client_a("owner"), period="custom", **MARCH)
    assert {r["group_by"] for r in rows} == {"day", "agent", "model", "member", "api_key"}
    for group_by in ("day", "agent", "model", "member", "api_key"):
        part = [r for r in rows if r["group_by"] == group_by]
        assert sum(Decimal(r["cost"]) for r in part) == _march_events(world)["cost"]
        assert sum(int(r["events"]) for r in part) == 7
    day = {r["key"]: r for r in rows if r["group_by"] == "day"}
    assert (day["2024-03-10"]["input_tokens"], day["2024-03-10"]["tokens"]) == ("1500", "1700")
    assert Decimal(day["2024-03-10"]["cost"]) == Decimal("0.0045")
    agents = {r["key"]: r for r in rows if r["group_by"] == "agent"}
    assert agents[str(scenario["helpdesk"].pk)]["label"] == "Helpdesk"
    assert "globex-secret-model" not in str(rows)


def test_the_csv_can_hold_one_grouping_and_defuses_formulas(
    world: World, client_a: Any, scenario: dict[str, Any]
) -> None:
    with schema_context(world.tenant_a.schema_name):
        Agent.objects.filter(pk=scenario["helpdesk"].pk).update(name='=HYPERLINK("http://evil.test")')
    rows = _csv(client_a("owner"), period="custom", group_by="agent", **MARCH)
    assert {r["group_by"] for r in rows} == {"agent"}
    labels = {r["key"]: r["label"] for r in rows}
    assert labels[str(scenario["helpdesk"].pk)] == '\'=HYPERLINK("http://evil.test")'


# --- Chat messages and dashboard ----------------------------------------------------------


def _chat_turn(world: World, clock: FakeClock, costs: list[Decimal]) -> tuple[ChatSession, Turn]:
    a = world.tenant_a.schema_name
    with schema_context(a):
        agent = Agent.objects.create(slug=f"chat-{len(costs)}-{Agent.objects.count()}", name="Chat")
        version = AgentVersion.objects.create(agent=agent, number=1, system_prompt="Be brief.")
        Agent.objects.filter(pk=agent.pk).update(active_version=version, status=Agent.Status.ACTIVE)
        operator = world.user("operator")
        session = ChatSession.objects.create(agent=agent, user_id=operator.pk, title="Costs")
        question = Message.objects.create(session=session, role=Message.Role.USER, content="How much?")
        answer = Message.objects.create(session=session, role=Message.Role.ASSISTANT, content="Little.")
        turn = Turn.objects.create(
            session=session,
            agent_version=version,
            user_message=question,
            assistant_message=answer,
            status=Turn.Status.COMPLETED,
            deadline=question.created_at,
            input_tokens=40,
            output_tokens=5,
        )
    for cost in costs:
        _record(
            a,
            clock,
            _at(2024, 3, 10, 12),
            kind="llm.input_tokens",
            quantity=1,
            unit_price=cost,
            session_id=session.pk,
            turn_id=turn.pk,
            agent_id=agent.pk,
        )
    return session, turn


def test_each_answer_shows_its_turns_cost_beside_the_tokens(
    world: World, client_a: Any, clock: FakeClock, django_assert_max_num_queries: Any
) -> None:
    session, turn = _chat_turn(world, clock, [Decimal("0.0012"), Decimal("0.0003")])
    client = client_a("operator")
    with django_assert_max_num_queries(30) as few:
        response = client.get(f"/chat/{session.pk}/")
    html = response.content.decode()
    assert response.status_code == 200, html
    assert "40 in · 5 out tokens" in html
    assert '40 in · 5 out tokens · <span data-testid="turn-cost"' in html and ">0.001500 USD</span>" in html
    baseline = len(few.captured_queries)
    # More turns with usage on the page: still one cost query for all of them.
    with schema_context(world.tenant_a.schema_name):
        for n in range(3):
            q = Message.objects.create(session=session, role=Message.Role.USER, content=f"And {n}?")
            r = Message.objects.create(session=session, role=Message.Role.ASSISTANT, content=f"Answer {n}.")
            more = Turn.objects.create(
                session=session,
                agent_version=turn.agent_version,
                user_message=q,
                assistant_message=r,
                status=Turn.Status.COMPLETED,
                deadline=q.created_at,
            )
            _record(
                world.tenant_a.schema_name,
                clock,
                _at(2024, 3, 10, 12),
                kind="tool.call",
                quantity=1,
                unit_price=Decimal("0.5"),
                session_id=session.pk,
                turn_id=more.pk,
            )
    with django_assert_max_num_queries(baseline):
        html = client.get(f"/chat/{session.pk}/").content.decode()
    assert html.count('data-testid="turn-cost"') == 4 and html.count(">0.500000 USD<") == 3


def test_the_live_completed_fragment_shows_the_cost(world: World) -> None:
    fragment = event_fragment(
        {
            "event": "turn.completed",
            "turn_id": 5,
            "content": "Done.",
            "citations": [],
            "usage": {"input_tokens": 12, "output_tokens": 3, "cost": "0.000420000000", "currency": "EUR"},
        }
    )
    assert "12 in · 3 out tokens" in fragment and ">0.000420 EUR<" in fragment
    without = event_fragment(
        {
            "event": "turn.completed",
            "turn_id": 5,
            "content": "Done.",
            "citations": [],
            "usage": {"input_tokens": 12, "output_tokens": 3},
        }
    )
    assert "turn-cost" not in without


def test_the_turns_final_event_carries_its_cost(world: World, clock: FakeClock) -> None:
    from agents.streaming import _snapshot_read
    from billing.selectors.usage import turn_cost_fields

    _, turn = _chat_turn(world, clock, [Decimal("0.25"), Decimal("0.5")])
    with schema_context(world.tenant_a.schema_name):
        assert turn_cost_fields(turn.pk) == {"cost": "0.750000000000", "currency": "USD"}
        assert turn_cost_fields(turn.pk + 1000, currency="EUR") == {"cost": "0", "currency": "EUR"}
    completed = [e for e in _snapshot_read(world.tenant_a.schema_name, turn.pk) if e["event"] == "turn.completed"]
    assert Decimal(completed[0]["usage"]["cost"]) == Decimal("0.75")


def test_the_dashboard_shows_this_months_tokens_and_cost(world: World, client_a: Any) -> None:
    with schema_context(world.tenant_a.schema_name):
        usage_event_record(kind="llm.input_tokens", quantity=3000, unit_price=Decimal("0.000002"), model="m-1")
        usage_event_record(kind="llm.output_tokens", quantity=400, unit_price=Decimal("0.00001"), model="m-1")
        usage_event_record(kind="kb.query", quantity=2, unit_price=Decimal("0.01"))
    html = client_a("auditor").get("/").content.decode()
    assert 'data-testid="usage-tokens">3,400<' in html and "3,000 in · 400 out" in html
    assert 'data-testid="usage-cost">0.030000<' in html
    assert "<code>m-1</code>" in html and 'href="/usage/"' in html
    assert "Usage this month" not in client_a("viewer").get("/").content.decode()
