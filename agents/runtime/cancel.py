"""Whether a running turn was asked to stop, read for all of a process's turns at once.

``turn_cancel`` sets the turn's cancel key in Redis (``events.cancel_key``). A streaming turn
checks it every ``CHECK_SECONDS``; with one ``EXISTS`` per turn and check, a worker streaming 50
turns made 500 Redis round trips a second for this alone. Instead one daemon thread per process
reads the keys of every turn the process is running with one ``MGET`` per ``CHECK_SECONDS``,
and a turn's check reads the answer from memory (``cancel_requested``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import structlog

from agents.runtime import events
from config.redis import redis_client

logger = structlog.get_logger(__name__)

CHECK_SECONDS = 0.1  # how late a running turn may notice that it was cancelled


class _Watcher:
    """The cancel keys of the process's running turns (with how many runs watch each), the
    keys found set, and the thread that reads them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.keys: dict[str, int] = {}
        self.found: set[str] = set()
        self.thread: threading.Thread | None = None
        self.pid = 0

    def add(self, key: str) -> None:
        with self.lock:
            self.keys[key] = self.keys.get(key, 0) + 1
            # A thread inherited through a fork does not run in the child: start one per process.
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._loop, name="turn-cancel-watch", daemon=True)
                self.thread.start()
            self.wake.notify()

    def remove(self, key: str) -> None:
        with self.lock:
            left = self.keys.get(key, 0) - 1
            if left > 0:
                self.keys[key] = left
            else:
                self.keys.pop(key, None)
                self.found.discard(key)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.keys:
                    self.wake.wait()
                keys = list(self.keys)
            try:
                values = redis_client().mget(keys)
            except Exception:  # Redis away: keep what was known, try again next time
                logger.warning("turn_cancel_watch_failed", exc_info=True)
            else:
                with self.lock:
                    self.found = {key for key, value in zip(keys, values, strict=True) if value and key in self.keys}
            threading.Event().wait(CHECK_SECONDS)


_watcher = _Watcher()


@contextlib.contextmanager
def cancel_watch(schema: str, turn_id: int) -> Iterator[None]:
    """Watch turn ``turn_id``'s cancel key while the block runs (``cancel_requested`` then reads
    memory)."""
    key = events.cancel_key(schema, turn_id)
    _watcher.add(key)
    try:
        yield
    finally:
        _watcher.remove(key)


def cancel_requested(schema: str, turn_id: int) -> bool:
    """True when turn ``turn_id`` was asked to stop: from the watcher's last read (at most
    ``CHECK_SECONDS`` old) for a watched turn, else from Redis directly."""
    key = events.cancel_key(schema, turn_id)
    with _watcher.lock:
        if key in _watcher.keys:
            return key in _watcher.found
    return bool(redis_client().exists(key))
