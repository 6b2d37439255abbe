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
| ``tool.call``      | ``call_id``, ``tool``, ``arguments``                                 |
| ``tool.result``    | ``call_id``, ``status`` (``ok``, ``error``, ``rejected``), ``excerpt`` |
| ``approval.requested`` | ``approval_id``, ``call_id``, ``tool``, ``arguments``, ``expires_at`` |
| ``approval.decided``   | ``approval_id``, ``call_id``, ``status``, ``decided_by``, ``reason`` |
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


def approval_decided(approval: Any, call_id: str) -> dict[str, Any]:
    """The ``approval.decided`` event of a decided ``ApprovalRequest`` (approved, rejected,
    expired or cancelled), for the call the model named ``call_id``."""
    return {"event": "approval.decided", "turn_id": approval.turn_id, "approval_id": approval.pk,
            "call_id": call_id, "status": approval.status, "decided_by": approval.decided_by_label,
            "reason": approval.reason}


def text_snapshot(schema: str, turn_id: int) -> str:
    """The answer text streamed so far for a running turn ('' when none)."""
    raw = redis_client().get(snapshot_key(schema, turn_id))
    return raw.decode() if isinstance(raw, bytes) else ""


class _LoopThread:
    """One asyncio loop per process, in a daemon thread, that owns the channel layer's Redis
    connections, for layers ``publish`` cannot PUBLISH to directly. Worker threads hand it
    coroutines; reusing the loop keeps the connections open (``async_to_sync`` from a plain
    thread would start a fresh loop and connection each time)."""

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


def _direct_channel(layer: Any, group: str) -> str | None:
    """The Redis channel of ``group`` when this process can PUBLISH to it itself: the layer is
    channels_redis's Pub/Sub layer with one host, ``REDIS_URL`` (else ``None``). The name is the
    layer's own: ``{prefix}__group__{group}`` (``RedisPubSubLoopLayer._get_group_channel_name``)."""
    from channels_redis.pubsub import RedisPubSubChannelLayer

    if not isinstance(layer, RedisPubSubChannelLayer):
        return None
    config = getattr(layer, "_kwargs", {})
    hosts = config.get("hosts") or []
    if len(hosts) != 1 or not isinstance(hosts[0], dict) or hosts[0].get("address") != settings.REDIS_URL:
        return None
    return f"{config.get('prefix', 'asgi')}__group__{group}"


def publish(group: str, event: dict[str, Any], *, timeout: float = 5.0,
            snapshot: tuple[str, int, str] | None = None) -> None:
    """Send ``event`` to ``group`` and wait until Redis has it (keeps order). With
    ``snapshot=(schema, turn_id, text)``, first append ``text`` to the turn's snapshot.

    With the Pub/Sub layer on ``REDIS_URL`` (the configured one) the calling thread sends the
    snapshot append and the PUBLISH in one pipelined round trip on this process's Redis pool,
    message serialized by the layer itself (channels_redis 4's ``group_send`` is one PUBLISH of
    ``serialize(message)`` on the group's channel). Handing the send to the event loop thread
    instead costs two thread switches per event, and under 50 streaming turns each waits for
    the GIL among the worker's threads. Any other layer is used through its ``group_send``.

    A failure to publish is logged, not raised: the turn's outcome is in the database, and a
    client that missed events reads it there on reconnect.
    """
    layer = get_channel_layer()
    message = {"type": EVENT_TYPE, "event": event}
    channel = _direct_channel(layer, group) if layer is not None else None
    try:
        pipe = redis_client().pipeline(transaction=False)
        if snapshot is not None:
            _queue_snapshot_append(pipe, *snapshot)
        if layer is None or channel is None:
            pipe.execute()  # the snapshot first, never after the event
            if layer is not None:
                _loop_thread().submit(layer.group_send(group, message)).result(timeout)
            return
        pipe.publish(channel, layer.serialize(message))
        pipe.execute()
    except Exception:
        logger.exception("chat_event_publish_failed", group=group, event_name=event.get("event"))


def publish_many(group: str, batch: list[dict[str, Any]]) -> None:
    """Send the events of ``batch`` to ``group`` in order, in one pipelined round trip when this
    process can PUBLISH directly (as ``publish``; else one ``publish`` each). Failures are logged,
    not raised."""
    layer = get_channel_layer()
    channel = _direct_channel(layer, group) if layer is not None else None
    if layer is None or channel is None:
        for event in batch:
            publish(group, event)
        return
    try:
        pipe = redis_client().pipeline(transaction=False)
        for event in batch:
            pipe.publish(channel, layer.serialize({"type": EVENT_TYPE, "event": event}))
        pipe.execute()
    except Exception:
        logger.exception("chat_event_publish_failed", group=group, event_name=batch[0].get("event") if batch else "")


def _queue_snapshot_append(pipe: Any, schema: str, turn_id: int, text: str) -> None:
    """Queue on ``pipe`` the commands that append ``text`` to the turn's snapshot."""
    key = snapshot_key(schema, turn_id)
    pipe.append(key, text.encode())
    pipe.expire(key, SNAPSHOT_TTL_SECONDS)
