"""manage.py tickets_serve: the demo ticket service (the Procfile's ``tickets``).

Serves ``agents.demo_tickets`` (``GET /tickets``, ``POST /tickets`` with ``Idempotency-Key``,
``GET /healthz``) on ``127.0.0.1:DEMO_TICKETS_PORT`` (default 8002), storing tickets in
``var/demo-tickets.sqlite3`` (``--db :memory:`` keeps them in memory). ``demo_seed`` adds the
tools ``list_tickets`` and ``create_ticket`` that call it, and the staff egress allow rule for
exactly this address.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from agents.demo_tickets import TicketsApp, TicketStore


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        sys.stderr.write(f"tickets: {format % args}\n")


class Command(BaseCommand):
    help = "Serve the demo ticket service (GET/POST /tickets) for the demo agent's HTTP tools."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="Default: 127.0.0.1")
        parser.add_argument("--port", type=int, default=None, help="Default: DEMO_TICKETS_PORT (8002)")
        parser.add_argument("--db", default=None, help="SQLite file, or :memory: (default: var/demo-tickets.sqlite3)")

    def handle(self, *args: Any, **options: Any) -> None:
        port = options["port"] or settings.DEMO_TICKETS_PORT
        db = options["db"] or str(Path(settings.VAR_DIR) / "demo-tickets.sqlite3")
        if db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        app = TicketsApp(TicketStore(db))
        with make_server(
            options["host"], port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        ) as server:
            self.stdout.write(f"Demo ticket service at http://{options['host']}:{port}/tickets (tickets in {db})")
            sys.stdout.flush()
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it quietly
                server.serve_forever()
