"""Turn heartbeats: proof that the worker running a turn is alive.

While a worker process runs turns, one daemon thread of that process stamps their
``Turn.heartbeat_at`` every ``CHAT_TURN_HEARTBEAT_SECONDS``, one UPDATE per tenant schema for all
of the process's running turns there. A worker that dies (SIGKILL, OOM, a lost node) stops
stamping, and the sweeper (``agents.services.turns_sweep``) fails its turns once their stamp is
older than ``CHAT_TURN_HEARTBEAT_STALE_SECONDS``, instead of leaving the session busy until the
turn's deadline. A thread (not the turn's own loop) stamps, so a turn that waits a long time
for its model's first token still shows a live worker.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import structlog
from django.conf import settings
from django.db import connection
from django.utils import timezone

from config.db import connection_release

logger = structlog.get_logger(__name__)


class _Beater:
    """The process's running turns by schema, and the thread that stamps them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.turns: dict[str, set[int]] = {}
        self.thread: threading.Thread | None = None
        self.pid = 0

    def add(self, schema: str, turn_id: int) -> None:
        with self.lock:
            self.turns.setdefault(schema, set()).add(turn_id)
            # A thread inherited through a fork does not run in the child: start one per process.
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._loop, name="turn-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, schema: str, turn_id: int) -> None:
        with self.lock:
            ids = self.turns.get(schema)
            if ids is not None:
                ids.discard(turn_id)
                if not ids:
                    del self.turns[schema]

    def _loop(self) -> None:
        stop = threading.Event()  # never set: the thread lives as long as the process
        while not stop.wait(settings.CHAT_TURN_HEARTBEAT_SECONDS):
            try:
                beat()
            except Exception:  # a database hiccup must not end the thread; the next beat retries
                logger.exception("turn_heartbeat_failed")
                with contextlib.suppress(Exception):
                    connection.close()


_beater = _Beater()


def beat() -> int:
    """Stamp ``heartbeat_at`` of every turn this process is running, now; returns how many rows
    were stamped. Called by the heartbeat thread; turns no longer ``running`` are left alone."""
    from django_tenants.utils import schema_context

    from agents.models import Turn

    with _beater.lock:
        snapshot = {schema: list(ids) for schema, ids in _beater.turns.items()}
    stamped = 0
    connection.close_if_unusable_or_obsolete()
    for schema, ids in snapshot.items():
        with schema_context(schema):
            stamped += Turn.objects.filter(pk__in=ids, status=Turn.Status.RUNNING).update(
                heartbeat_at=timezone.now())
    # Back to the pool between beats: the thread would otherwise hold one of the worker's slots.
    connection_release()
    return stamped


@contextlib.contextmanager
def turn_heartbeat(schema: str, turn_id: int) -> Iterator[None]:
    """Keep stamping turn ``turn_id`` of ``schema`` while the block runs (the claim stamps it
    first, see ``orchestrator._claim``)."""
    _beater.add(schema, turn_id)
    try:
        yield
    finally:
        _beater.remove(schema, turn_id)
