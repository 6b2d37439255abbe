"""Reading the audit trail: GET /api/v1/audit/events and the console's /audit/ pages."""

from __future__ import annotations

import base64
import datetime as dt
import re
from typing import Any

import pytest
from django.test import Client
from django_tenants.utils import schema_context

from compliance import services as audit_services
from compliance.models import AuditEvent
from compliance.services import audit_event_create
from tenants.models import Membership
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, World, api_client, host_client

T0 = dt.datetime(2021, 3, 10, 9, 0, tzinfo=dt.UTC)
ROW_LINK = re.compile(r'href="/audit/(\d+)/"')


class FakeClock:
    """Stands in for ``django.utils.timezone`` in the audit service, so events get set times."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def now(self) -> dt.datetime:
        return self.at


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(T0)
    monkeypatch.setattr(audit_services, "timezone", fake)
    return fake


def _member(world: World, persona: str) -> Principal:
    return Principal.for_member(Membership.objects.select_related("user", "tenant").get(
        user=world.user(persona), tenant=world.tenant_a))


def _record(world: World, *, actor: Principal | None = None, action: str = "test.recorded", n: int = 1,
            schema: str | None = None) -> list[AuditEvent]:
    actor = actor or Principal.system("tests")
    schema = schema or world.tenant_a.schema_name
    return [audit_event_create(actor=actor, action=action, payload={"i": i}, schema=schema) for i in range(n)]


def _all_seqs(world: World) -> list[int]:
    with schema_context(world.tenant_a.schema_name):
        return list(AuditEvent.objects.order_by("-seq").values_list("seq", flat=True))


def _list(client: Client, **params: Any) -> Any:
    response = client.get("/api/v1/audit/events", params)
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def scenario(world: World, clock: FakeClock) -> dict[str, list[AuditEvent]]:
    """Events by two members on three days, with member.* and api_key.* actions."""
    operator, admin = _member(world, "operator"), _member(world, "admin")
    made: dict[str, list[AuditEvent]] = {}
    clock.at = T0
    made["day1"] = _record(world, actor=operator, action="member.invited", n=2)
    clock.at = T0 + dt.timedelta(days=1)
    made["day2"] = _record(world, actor=admin, action="member.removed", n=1)
    made["day2"] += _record(world, actor=admin, action="api_key.created", n=1)
    clock.at = T0 + dt.timedelta(days=2)
    made["day3"] = _record(world, actor=operator, action="member.role_changed", n=1)
    return made


# --- API ----------------------------------------------------------------------------------


def test_it_lists_events_newest_first(world: World, api_a: Client) -> None:
    _record(world, n=3)
    body = _list(api_a, limit=200)
    seqs = [e["seq"] for e in body["items"]]
    assert seqs == _all_seqs(world)
    assert seqs == sorted(seqs, reverse=True)
    newest = body["items"][0]
    assert newest["action"] == "test.recorded" and newest["payload"] == {"i": 2}
    assert len(newest["hash"]) == 64 and len(newest["prev_hash"]) == 64
    assert body["next_cursor"] is None


def test_it_filters_by_actor_substring_case_insensitively(world: World, api_a: Client,
                                                          scenario: dict[str, list[AuditEvent]]) -> None:
    body = _list(api_a, actor="OPERATOR@acme")
    assert [e["action"] for e in body["items"]] == ["member.role_changed", "member.invited", "member.invited"]
    assert {e["actor_label"] for e in body["items"]} == {"operator@acme.test"}
    assert _list(api_a, actor="nobody-like-this")["items"] == []


def test_it_filters_by_exact_action_or_by_prefix(world: World, api_a: Client,
                                                 scenario: dict[str, list[AuditEvent]]) -> None:
    exact = _list(api_a, action="member.invited")["items"]
    assert [e["seq"] for e in exact] == sorted((e.seq for e in scenario["day1"]), reverse=True)
    prefix = _list(api_a, action="member.")["items"]
    assert {e["action"] for e in prefix} == {"member.invited", "member.removed", "member.role_changed"}
    assert len(prefix) == 4
    # Without the trailing dot the value is an exact action, not a prefix.
    assert _list(api_a, action="member")["items"] == []
    assert _list(api_a, action="member.inv")["items"] == []


def test_it_filters_by_from_inclusive_and_to_exclusive(world: World, api_a: Client,
                                                       scenario: dict[str, list[AuditEvent]]) -> None:
    day2 = T0 + dt.timedelta(days=1)
    body = _list(api_a, **{"from": day2.isoformat(), "to": (day2 + dt.timedelta(days=1)).isoformat()})
    assert [e["seq"] for e in body["items"]] == sorted((e.seq for e in scenario["day2"]), reverse=True)
    # ``to`` is exclusive: an event at exactly that instant is left out.
    before_day2 = _list(api_a, **{"from": T0.isoformat(), "to": day2.isoformat()})["items"]
    assert [e["seq"] for e in before_day2] == sorted((e.seq for e in scenario["day1"]), reverse=True)
    # ``from`` is inclusive and accepts the Z suffix.
    late = _list(api_a, **{"from": "2021-03-12T09:00:00Z", "to": "2021-03-13T00:00:00Z"})["items"]
    assert [e["action"] for e in late] == ["member.role_changed"]
    combined = _list(api_a, actor="admin@", action="api_key.created", **{"from": T0.isoformat()})["items"]
    assert [e["seq"] for e in combined] == [scenario["day2"][1].seq]


def test_it_rejects_a_datetime_that_does_not_parse(world: World, api_a: Client) -> None:
    response = api_a.get("/api/v1/audit/events", {"from": "yesterday"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"


def test_keyset_pagination_walks_every_event_exactly_once(world: World, api_a: Client) -> None:
    _record(world, n=23)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 7}
        if cursor:
            params["cursor"] = cursor
        body = _list(api_a, **params)
        pages += 1
        assert len(body["items"]) <= 7
        seen += [e["seq"] for e in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 50
    expected = _all_seqs(world)
    assert seen == expected
    assert len(set(seen)) == len(seen)
    assert pages == -(-len(expected) // 7)


def test_pagination_keeps_the_filters(world: World, api_a: Client) -> None:
    _record(world, action="test.paged", n=5)
    _record(world, action="test.other", n=5)
    first = _list(api_a, action="test.paged", limit=3)
    second = _list(api_a, action="test.paged", limit=3, cursor=first["next_cursor"])
    assert {e["action"] for e in first["items"] + second["items"]} == {"test.paged"}
    assert len(first["items"]) == 3 and len(second["items"]) == 2 and second["next_cursor"] is None


@pytest.mark.parametrize("cursor", ["garbage!", "djI6MTA", "djE6YWJj", "%%%"])
def test_it_rejects_an_invalid_cursor(world: World, api_a: Client, cursor: str) -> None:
    # djI6MTA is "v2:10" and djE6YWJj is "v1:abc": well-formed base64, but not our cursors.
    response = api_a.get("/api/v1/audit/events", {"cursor": cursor})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_cursor"
    assert error["request_id"] == response["X-Request-ID"]


def test_a_cursor_beyond_any_seq_is_not_a_server_error(world: World, api_a: Client) -> None:
    def cursor(raw: str) -> str:
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    # Past the bigint range: every event is older than that.
    huge = api_a.get("/api/v1/audit/events", {"cursor": cursor("v1:" + "9" * 30), "limit": 200})
    assert huge.status_code == 200, huge.content
    assert [e["seq"] for e in huge.json()["items"]] == _all_seqs(world)
    assert _list(api_a, cursor=cursor("v1:1"))["items"] == []
    assert _list(api_a, cursor=cursor("v1:-5"))["items"] == []


@pytest.mark.parametrize("limit", [0, -1, 201])
def test_it_rejects_a_limit_outside_1_to_200(world: World, api_a: Client, limit: int) -> None:
    response = api_a.get("/api/v1/audit/events", {"limit": limit})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_limit"


def test_it_accepts_the_limits_at_the_edges(world: World, api_a: Client) -> None:
    _record(world, n=2)
    assert len(_list(api_a, limit=1)["items"]) == 1
    assert len(_list(api_a, limit=200)["items"]) == len(_all_seqs(world))


def test_it_returns_one_event_by_its_seq(world: World, api_a: Client) -> None:
    event = _record(world, action="test.single")[0]
    response = api_a.get(f"/api/v1/audit/events/{event.seq}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["seq"] == event.seq and body["action"] == "test.single"
    assert body["hash"] == event.hash and body["prev_hash"] == event.prev_hash


@pytest.mark.parametrize("seq", ["0", "999999", "9" * 30])
def test_it_answers_404_for_a_seq_with_no_event(world: World, api_a: Client, seq: str) -> None:
    response = api_a.get(f"/api/v1/audit/events/{seq}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_it_answers_404_for_a_seq_that_exists_only_in_another_tenant(world: World, api_a: Client) -> None:
    a_head = _all_seqs(world)[0]
    b_events = _record(world, action="test.globex_only", n=a_head + 2, schema=world.tenant_b.schema_name)
    only_in_b = b_events[-1].seq
    assert only_in_b > a_head
    response = api_a.get(f"/api/v1/audit/events/{only_in_b}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert all(e["action"] != "test.globex_only" for e in _list(api_a, limit=200)["items"])


def test_it_rejects_other_tenants_key(world: World) -> None:
    response = api_client(HOST_A, world.key_b).get("/api/v1/audit/events")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert b"seq" not in response.content


def test_it_requires_credentials(world: World) -> None:
    response = api_client(HOST_A, None).get("/api/v1/audit/events")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_a_key_without_audit_read_is_forbidden(world: World) -> None:
    key = api_key_create(principal=Principal.system("tests", tenant=world.tenant_a), tenant=world.tenant_a,
                         name="no audit", scopes=["tenant:read", "usage:read"]).secret
    client = api_client(HOST_A, key)
    for path in ("/api/v1/audit/events", "/api/v1/audit/events/1"):
        response = client.get(path)
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "permission_denied"


@pytest.mark.parametrize(("persona", "status"), [("viewer", 403), ("operator", 403), ("outsider", 403),
                                                 ("auditor", 200), ("owner", 200), ("admin", 200)])
def test_sessions_need_audit_read(world: World, persona: str, status: int) -> None:
    response = host_client(HOST_A, world.user(persona)).get("/api/v1/audit/events")
    assert response.status_code == status, response.content
    if status == 403:
        assert response.json()["error"]["code"] in {"permission_denied", "not_a_member"}
        assert "items" not in response.json()


def test_the_list_endpoints_query_count_does_not_grow_with_events(
    world: World, api_a: Client, django_assert_max_num_queries: Any
) -> None:
    _record(world, n=5)
    api_a.get("/api/v1/audit/events")  # first use of the key may touch last_used_at
    with django_assert_max_num_queries(6) as few:  # 5 today: key, tenant routing, the page
        assert api_a.get("/api/v1/audit/events").status_code == 200
    _record(world, n=55)
    with django_assert_max_num_queries(len(few.captured_queries)):
        body = _list(api_a)
    assert len(body["items"]) == 50 and body["next_cursor"] is not None


# --- Console pages ------------------------------------------------------------------------


def _rows(html: str) -> list[int]:
    return [int(s) for s in ROW_LINK.findall(html)]


def test_the_audit_page_lists_events_newest_first(world: World, scenario: dict[str, list[AuditEvent]]) -> None:
    response = host_client(HOST_A, world.user("owner")).get("/audit/")
    assert response.status_code == 200
    html = response.content.decode()
    assert b"<html" in response.content and 'data-testid="audit-table"' in html
    assert _rows(html) == _all_seqs(world)


def test_the_audit_page_filters_by_actor_action_and_days(world: World,
                                                         scenario: dict[str, list[AuditEvent]]) -> None:
    client = host_client(HOST_A, world.user("owner"))
    by_actor = _rows(client.get("/audit/", {"actor": "Admin@ACME"}).content.decode())
    assert by_actor == sorted((e.seq for e in scenario["day2"]), reverse=True)
    by_prefix = _rows(client.get("/audit/", {"action": "member."}).content.decode())
    assert len(by_prefix) == 4
    by_exact = _rows(client.get("/audit/", {"actor": "admin@", "action": "api_key.created"}).content.decode())
    assert by_exact == [scenario["day2"][1].seq]
    assert _rows(client.get("/audit/", {"action": "member"}).content.decode()) == []
    # The date filter covers whole UTC days, "To" included.
    one_day = _rows(client.get("/audit/", {"since": "2021-03-11", "until": "2021-03-11"}).content.decode())
    assert one_day == sorted((e.seq for e in scenario["day2"]), reverse=True)
    two_days = _rows(client.get("/audit/", {"since": "2021-03-10", "until": "2021-03-11"}).content.decode())
    assert sorted(two_days) == sorted(e.seq for e in scenario["day1"] + scenario["day2"])


def test_the_audit_page_ignores_an_invalid_date_and_says_so(world: World,
                                                            scenario: dict[str, list[AuditEvent]]) -> None:
    response = host_client(HOST_A, world.user("owner")).get("/audit/", {"since": "not-a-date"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Some filters were not valid" in html
    assert _rows(html) == _all_seqs(world)


def test_the_audit_page_shows_50_events_a_page(world: World) -> None:
    made = _record(world, action="test.bulk", n=60)
    client = host_client(HOST_A, world.user("owner"))
    first = client.get("/audit/", {"action": "test.bulk"}).content.decode()
    second = client.get("/audit/", {"action": "test.bulk", "page": 2}).content.decode()
    newest_first = sorted((e.seq for e in made), reverse=True)
    assert _rows(first) == newest_first[:50]
    assert _rows(second) == newest_first[50:]
    assert "Page 1 of 2" in first and "60 events" in first
    # The "Older" link keeps the filter.
    assert 'href="?action=test.bulk&page=2"' in first
    assert "Page 2 of 2" in second and 'href="?action=test.bulk&page=1"' in second


def test_the_detail_page_shows_the_hash_and_prev_hash(world: World) -> None:
    event = _record(world, action="test.detail")[0]
    client = host_client(HOST_A, world.user("owner"))
    response = client.get(f"/audit/{event.seq}/")
    assert response.status_code == 200
    html = response.content.decode()
    assert event.hash in html and event.prev_hash in html and "test.detail" in html
    assert client.get(f"/audit/{event.seq + 1000}/").status_code == 404
    assert client.get(f"/audit/{'9' * 30}/").status_code == 404


@pytest.mark.parametrize("persona", ["viewer", "operator", "outsider"])
def test_members_without_audit_read_cannot_open_the_audit_pages(world: World, persona: str) -> None:
    event = _record(world, action="test.hidden")[0]
    client = host_client(HOST_A, world.user(persona))
    for path in ("/audit/", f"/audit/{event.seq}/"):
        response = client.get(path)
        assert response.status_code == 403, path
        assert event.hash.encode() not in response.content


def test_the_auditor_can_open_the_audit_pages(world: World) -> None:
    event = _record(world, action="test.audited")[0]
    client = host_client(HOST_A, world.user("auditor"))
    assert client.get("/audit/").status_code == 200
    assert client.get(f"/audit/{event.seq}/").status_code == 200


def test_an_anonymous_visitor_is_sent_to_sign_in(world: World) -> None:
    response = host_client(HOST_A).get("/audit/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_htmx_requests_get_only_the_audit_table(world: World) -> None:
    _record(world, action="test.fragment", n=2)
    client = host_client(HOST_A, world.user("owner"))
    full = client.get("/audit/")
    fragment = client.get("/audit/", {"action": "test.fragment"}, HTTP_HX_REQUEST="true")
    assert fragment.status_code == 200
    assert b"<html" in full.content
    assert b"<html" not in fragment.content
    assert fragment.content.decode().lstrip().startswith('<div id="audit-table">')
    assert len(_rows(fragment.content.decode())) == 2
    assert "HX-Request" in fragment["Vary"] and "HX-Request" in full["Vary"]


def test_the_audit_pages_query_count_does_not_grow_with_events(world: World,
                                                               django_assert_max_num_queries: Any) -> None:
    _record(world, n=5)
    client = host_client(HOST_A, world.user("owner"))
    client.get("/audit/")
    # routing, session, user, membership, 2FA, count, approvals badge, budget banner, page
    with django_assert_max_num_queries(11) as few:
        assert client.get("/audit/").status_code == 200
    _record(world, n=55)
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = client.get("/audit/")
    assert len(_rows(response.content.decode())) == 50
