"""Turn events: what the worker publishes and what sockets and SSE streams relay.

Every event is a dict with an ``event`` name and the ``turn_id``:

| event            | fields                                                               |
|------------------|----------------------------------------------------------------------|
| ``turn.queued``    | ``session_id``, ``user_message_id``                                  |
| ``turn.started``   | ``model``, ``endpoint``                                              |
| ``citations``      | ``citations`` (numbered sources), ``retrieved`` (chunks with scores) |
| ``token.delta``    | ``offset`` (characters before this delta), ``text``                  |
| ``turn.completed`` | ``message_id``, ``content``, ``citations``, ``usage``                |
| ``turn.failed``    | ``error`` (``code``, ``message``)                                    |
| ``turn.cancelled`` | ``message_id`` (the partial answer kept, if any)                     |
| ``message.accepted`` | ``user_message_id``, ``content`` (socket messages only, before ``turn.queued``) |
| ``error``          | ``error`` (``code``, ``message``); no ``turn_id``: a socket message the worker refused |

They go to the session's channel-layer group (``ChatSession.group_name``). The text streamed so
far is also appended to a Redis key, so a client that (re)connects mid-turn reads the snapshot
after joining the group and drops the part of later deltas it already has (by ``offset``).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import structlog
from channels.layers import get_channel_layer
from django.conf import settings

from config.redis import redis_client

logger = structlog.get_logger(__name__)

EVENT_TYPE = "chat.event"  # the consumer's handler: chat_event()
SNAPSHOT_TTL_SECONDS = 3600


def snapshot_key(schema: str, turn_id: int) -> str:
    return f"{settings.CACHE_KEY_PREFIX}:turn:{schema}:{turn_id}:text"


def cancel_key(schema: str, turn_id: int) -> str:
    return f"{settings.CACHE_KEY_PREFIX}:turn:{schema}:{turn_id}:cancel"


def session_group(schema: str, session_id: int) -> str:
    """The channel-layer group of a session (group names allow ``[a-zA-Z0-9_.-]``)."""
    return f"chat.{schema}.{session_id}"


def text_snapshot(schema: str, turn_id: int) -> str:
    """The answer text streamed so far for a running turn ('' when none)."""
    raw = redis_client().get(snapshot_key(schema, turn_id))
    return raw.decode() if isinstance(raw, bytes) else ""


class _LoopThread:
    """One asyncio loop per process, in a daemon thread, that owns the channel layer's Redis
    connections. Worker threads hand it coroutines; reusing the loop keeps the connections open
    (``async_to_sync`` from a plain thread would start a fresh loop and connection each time)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chat-events", daemon=True)
        self.thread.start()

    def submit(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)


_loop: _LoopThread | None = None
_loop_lock = threading.Lock()


def _loop_thread() -> _LoopThread:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = _LoopThread()
        return _loop


def publish(group: str, event: dict[str, Any], *, timeout: float = 5.0) -> None:
    """Send ``event`` to ``group`` and wait until the channel layer has it (keeps order).

    A failure to publish is logged, not raised: the turn's outcome is in the database, and a
    client that missed events reads it there on reconnect.
    """
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        _loop_thread().submit(layer.group_send(group, {"type": EVENT_TYPE, "event": event})).result(timeout)
    except Exception:
        logger.exception("chat_event_publish_failed", group=group, event_name=event.get("event"))


def snapshot_append(schema: str, turn_id: int, text: str) -> None:
    """Append ``text`` to the turn's snapshot (publish the delta after this, never before)."""
    key = snapshot_key(schema, turn_id)
    pipe = redis_client().pipeline(transaction=False)
    pipe.append(key, text.encode())
    pipe.expire(key, SNAPSHOT_TTL_SECONDS)
    pipe.execute()
