"""The demo ticket service (``manage.py tickets_serve``, the Procfile's ``tickets``): a stand-in for
a company's IT ticket system that the demo agent's HTTP tools call.

A WSGI application over one SQLite database (a file, or ``:memory:``):

- ``GET /tickets``: ``200 {"tickets": [ticket, ...]}``, oldest first.
- ``POST /tickets`` with a JSON object ``{"title", "description", "priority"}``: ``201`` with the
  ticket. ``title`` is required (1-200 characters), ``description`` optional (up to 5,000),
  ``priority`` one of ``low``, ``normal`` (default), ``high``; other members are refused. An
  ``Idempotency-Key`` header (1-200 characters) makes the request safe to repeat: a second
  request with the same key creates nothing and answers ``200`` with the first ticket and
  ``Idempotent-Replayed: true``.
- ``GET /healthz``: ``200 {"status": "ok"}``.

A ticket is ``{"id", "title", "description", "priority", "status": "open", "created_at"}``
(``created_at`` in ISO 8601, UTC). Errors are JSON ``{"error": code, "message": text}``: 400
``invalid_json`` (a body that is not a JSON object), 413 ``too_large``, 415
``unsupported_media_type``, 422 ``invalid_ticket`` (with ``field``), 404 ``not_found``, 405
``method_not_allowed`` (with ``Allow``).

It imports nothing from Django: the tests and the command serve it with ``wsgiref``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

PRIORITIES = ("low", "normal", "high")
MAX_BODY_BYTES = 64 * 1024
MAX_TITLE = 200
MAX_DESCRIPTION = 5000
MAX_IDEMPOTENCY_KEY = 200
FIELDS = ("title", "description", "priority")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Environ = dict[str, Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    priority TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    idempotency_key TEXT UNIQUE
)
"""


class TicketInvalid(Exception):
    """A request the service refuses: HTTP ``status`` with ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class TicketStore:
    """Tickets in one SQLite database (``path``: a file or ``":memory:"``), safe across threads:
    one connection, each operation under one lock (so an idempotency key's check and insert are
    one step)."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute(SCHEMA)

    def list(self) -> list[dict[str, Any]]:
        """Every ticket, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM tickets ORDER BY id").fetchall()
        return [_ticket(row) for row in rows]

    def create(
        self, *, title: str, description: str, priority: str, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Creates a ticket; returns it and whether it was created (``False``: an earlier request
        with the same ``idempotency_key`` made it, and it is returned unchanged)."""
        with self._lock:
            if idempotency_key:
                row = self._db.execute("SELECT * FROM tickets WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    return _ticket(row), False
            created_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            cursor = self._db.execute(
                "INSERT INTO tickets (title, description, priority, status, created_at, idempotency_key) "
                "VALUES (?, ?, ?, 'open', ?, ?)",
                (title, description, priority, created_at, idempotency_key or None),
            )
            row = self._db.execute("SELECT * FROM tickets WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return _ticket(row), True


def _ticket(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "description": row["description"],
        "priority": row["priority"],
        "status": row["status"],
        "created_at": row["created_at"],
    }


def ticket_fields(body: Any) -> dict[str, str]:
    """The validated ``title``, ``description`` and ``priority`` of a create request's JSON body.

    Raises ``TicketInvalid`` (400 ``invalid_json`` when ``body`` is not an object, 422
    ``invalid_ticket`` naming the field otherwise)."""
    if not isinstance(body, dict):
        raise TicketInvalid(400, "invalid_json", "The body must be a JSON object.")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise TicketInvalid(
            422, "invalid_ticket", f"Unknown field {unknown[0]!r}; a ticket has {', '.join(FIELDS)}.", unknown[0]
        )
    title = body.get("title")
    if not isinstance(title, str) or not title.strip():
        raise TicketInvalid(422, "invalid_ticket", "title is required: a non-empty string.", "title")
    if len(title) > MAX_TITLE:
        raise TicketInvalid(422, "invalid_ticket", f"title is longer than {MAX_TITLE} characters.", "title")
    description = body.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise TicketInvalid(422, "invalid_ticket", "description must be a string.", "description")
    if len(description) > MAX_DESCRIPTION:
        raise TicketInvalid(
            422, "invalid_ticket", f"description is longer than {MAX_DESCRIPTION} characters.", "description"
        )
    priority = body.get("priority", "normal")
    if priority not in PRIORITIES:
        raise TicketInvalid(422, "invalid_ticket", f"priority must be one of {', '.join(PRIORITIES)}.", "priority")
    return {"title": title.strip(), "description": description.strip(), "priority": priority}


class TicketsApp:
    """The WSGI application over a ``TicketStore`` (see the module docstring for the routes)."""

    def __init__(self, store: TicketStore) -> None:
        self.store = store

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        headers: list[tuple[str, str]] = []
        body: dict[str, Any]
        try:
            if path == "/healthz":
                self._allow(method, ("GET",))
                status, body = 200, {"status": "ok"}
            elif path == "/tickets":
                self._allow(method, ("GET", "POST"))
                if method == "GET":
                    status, body = 200, {"tickets": self.store.list()}
                else:
                    status, body, headers = self._create(environ)
            else:
                raise TicketInvalid(404, "not_found", f"No such resource: {path}. Try /tickets.")
        except TicketInvalid as exc:
            status = exc.status
            body = {"error": exc.code, "message": exc.message, **({"field": exc.field} if exc.field else {})}
            if exc.code == "method_not_allowed":
                headers = [("Allow", exc.field)]
                body.pop("field")
        data = json.dumps(body).encode()
        start_response(
            f"{status} {_REASONS[status]}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers],
        )
        return [data]

    @staticmethod
    def _allow(method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise TicketInvalid(405, "method_not_allowed", f"{method} is not allowed here.", ", ".join(allowed))

    def _create(self, environ: Environ) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        content_type = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise TicketInvalid(415, "unsupported_media_type", "Send the ticket as application/json.")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0:
            raise TicketInvalid(400, "invalid_json", "Content-Length is not a number.")
        if length > MAX_BODY_BYTES:
            raise TicketInvalid(413, "too_large", f"The body is larger than {MAX_BODY_BYTES} bytes.")
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            parsed = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TicketInvalid(400, "invalid_json", f"The body is not JSON: {exc}.") from exc
        fields = ticket_fields(parsed)
        key = (environ.get("HTTP_IDEMPOTENCY_KEY") or "").strip()
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise TicketInvalid(
                400, "invalid_idempotency_key", f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters."
            )
        ticket, created = self.store.create(**fields, idempotency_key=key or None)
        if created:
            return 201, ticket, []
        return 200, ticket, [("Idempotent-Replayed", "true")]


_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
}
