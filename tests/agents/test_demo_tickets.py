"""The demo ticket service (``manage.py tickets_serve``), run as its own process: listing, creating,
idempotent repeats, and a clear 4xx for every bad request."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.demo_tickets import TicketStore
from tests.agents.tickets_live import tickets_serve


@pytest.fixture(scope="module")
def tickets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tickets_serve(tmp_path_factory.mktemp("tickets")) as base:
        yield base


def _titled(base: str, title: str) -> list[dict[str, Any]]:
    listed = httpx.get(f"{base}/tickets", timeout=10)
    assert listed.status_code == 200
    return [t for t in listed.json()["tickets"] if t["title"] == title]


def test_it_answers_its_health_check(tickets: str) -> None:
    response = httpx.get(f"{tickets}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_it_creates_a_ticket_and_lists_it(tickets: str) -> None:
    title = f"Laptop screen broken {uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"{tickets}/tickets",
        json={"title": title, "description": "It flickers, then goes black.", "priority": "high"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    ticket = response.json()
    assert ticket["title"] == title
    assert ticket["description"] == "It flickers, then goes black."
    assert ticket["priority"] == "high"
    assert ticket["status"] == "open"
    assert ticket["created_at"].endswith("Z")
    assert _titled(tickets, title) == [ticket]


def test_priority_defaults_to_normal_and_description_to_empty(tickets: str) -> None:
    response = httpx.post(f"{tickets}/tickets", json={"title": f"VPN {uuid.uuid4().hex[:8]}"}, timeout=10)
    assert response.status_code == 201, response.text
    assert (response.json()["priority"], response.json()["description"]) == ("normal", "")


def test_a_repeat_with_the_same_idempotency_key_returns_the_first_ticket(tickets: str) -> None:
    title = f"Printer on fire {uuid.uuid4().hex[:8]}"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = httpx.post(f"{tickets}/tickets", json={"title": title, "priority": "high"}, headers=key, timeout=10)
    again = httpx.post(f"{tickets}/tickets", json={"title": title, "priority": "low"}, headers=key, timeout=10)
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert len(_titled(tickets, title)) == 1
    # Another key is another request.
    other = httpx.post(
        f"{tickets}/tickets", json={"title": title}, headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=10
    )
    assert other.status_code == 201
    assert len(_titled(tickets, title)) == 2


def test_simultaneous_repeats_of_one_key_create_one_ticket(tickets: str) -> None:
    title = f"Keyboard missing keys {uuid.uuid4().hex[:8]}"
    key = {"Idempotency-Key": uuid.uuid4().hex}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{tickets}/tickets", json={"title": title}, headers=key, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(_titled(tickets, title)) == 1


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code", "field"),
    [
        (b"{not json", "application/json", 400, "invalid_json", None),
        (b"\xff\xfe", "application/json", 400, "invalid_json", None),
        (b'["a list"]', "application/json", 400, "invalid_json", None),
        (b"{}", "application/json", 422, "invalid_ticket", "title"),
        (b'{"title": "   "}', "application/json", 422, "invalid_ticket", "title"),
        (b'{"title": 7}', "application/json", 422, "invalid_ticket", "title"),
        (b'{"title": "' + b"x" * 201 + b'"}', "application/json", 422, "invalid_ticket", "title"),
        (b'{"title": "t", "description": ["x"]}', "application/json", 422, "invalid_ticket", "description"),
        (b'{"title": "t", "priority": "urgent"}', "application/json", 422, "invalid_ticket", "priority"),
        (b'{"title": "t", "assignee": "bob"}', "application/json", 422, "invalid_ticket", "assignee"),
        (b'{"title": "t"}', "text/plain", 415, "unsupported_media_type", None),
        (b'{"title": "' + b"x" * 70_000 + b'"}', "application/json", 413, "too_large", None),
    ],
)
def test_a_bad_create_request_gets_a_clear_4xx(
    tickets: str, content: bytes, content_type: str, status: int, code: str, field: str | None
) -> None:
    before = len(httpx.get(f"{tickets}/tickets", timeout=10).json()["tickets"])
    response = httpx.post(f"{tickets}/tickets", content=content, headers={"Content-Type": content_type}, timeout=10)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert body["message"]
    assert body.get("field") == field
    assert len(httpx.get(f"{tickets}/tickets", timeout=10).json()["tickets"]) == before


def test_an_overlong_idempotency_key_is_refused(tickets: str) -> None:
    response = httpx.post(f"{tickets}/tickets", json={"title": "t"}, headers={"Idempotency-Key": "k" * 201}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_idempotency_key"


def test_unknown_paths_and_methods_are_404_and_405(tickets: str) -> None:
    missing = httpx.get(f"{tickets}/nothing", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong = httpx.delete(f"{tickets}/tickets", timeout=10)
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "GET, POST"
    assert wrong.json()["error"] == "method_not_allowed"


def test_tickets_outlive_the_store_in_a_file(tmp_path: Path) -> None:
    path = str(tmp_path / "tickets.sqlite3")
    ticket, created = TicketStore(path).create(title="Dock", description="", priority="low", idempotency_key="k")
    assert created
    reopened = TicketStore(path)
    assert reopened.list() == [ticket]
    assert reopened.create(title="Dock", description="", priority="low", idempotency_key="k") == (ticket, False)
