"""A turn's events for HTTP clients: Server-Sent Events, and waiting for a turn to finish.

Same scheme as the chat socket (``agents.consumers``): join the session's channel-layer group
first, then read the turn's state from the database and the text streamed so far from Redis
(the snapshot), then relay the group's events for that turn, dropping the part of each
``token.delta`` already sent (by ``offset``). Whatever arrives in between is therefore neither
lost nor sent twice. A stream of a turn its own request just saved starts instead from that
state and sends the turn's task only once it has joined the group (``start``, ``after_subscribe``):
nothing can be published before it listens, so it reads nothing. As a safety net against lost
events the database is read again after ``POLL_SECONDS`` without any event (never while events
flow); a turn found final there ends the stream with its final event.

Invariant for clients: the ``token.delta`` texts of a turn concatenate to the final answer
(a ``turn.completed`` whose ``content`` is longer than what was streamed is preceded by a delta
with the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.core.serializers.json import DjangoJSONEncoder
from django.http import StreamingHttpResponse
from django_tenants.utils import schema_context

from agents.models import Turn
from agents.runtime import events
from billing.selectors.usage import turn_cost_fields
from config import telemetry
from config.db import connection_release

logger = structlog.get_logger(__name__)

FINAL_EVENTS = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})
# A turn that parks for an approval is not final, but its stream ends there: the decision may
# take hours. Follow it with GET /sessions/{id}/turns/{turn_id} (or the session's socket).
PAUSE_EVENTS = frozenset({"approval.requested"})
END_EVENTS = FINAL_EVENTS | PAUSE_EVENTS
POLL_SECONDS = 2.0  # silence after which the database is read again (no final event yet)
HEARTBEAT_SECONDS = 15.0  # an SSE comment after this much silence keeps proxies from closing the stream
_ONCE = frozenset({"turn.queued", "turn.started", "citations"})


def _snapshot_sync(schema: str, turn_id: int) -> list[dict[str, Any]]:
    """Events that describe turn ``turn_id`` as the database and Redis have it now."""
    try:
        return _snapshot_read(schema, turn_id)
    finally:
        # A stream waits seconds between reads: its connection (the view's too, on this same
        # thread) goes back to the pool meanwhile, or 100 open streams would hold 100 of them.
        connection_release()


def _snapshot_read(schema: str, turn_id: int) -> list[dict[str, Any]]:
    with schema_context(schema):
        turn = Turn.objects.select_related("assistant_message").filter(pk=turn_id).first()
        if turn is None:
            return [{"event": "turn.failed", "turn_id": turn_id,
                     "error": {"code": "not_found", "message": "The turn no longer exists."}}]
        out: list[dict[str, Any]] = [{"event": "turn.queued", "turn_id": turn.pk, "session_id": turn.session_id,
                                      "user_message_id": turn.user_message_id}]
        if turn.started_at is not None:
            out.append({"event": "turn.started", "turn_id": turn.pk, "model": turn.model,
                        "endpoint": turn.endpoint_name})
        if turn.retrieved:
            out.append({"event": "citations", "turn_id": turn.pk,
                        "citations": [{k: v for k, v in r.items() if k not in ("text", "vector_score", "keyword_score")}
                                      for r in turn.retrieved],
                        "retrieved": turn.retrieved})
        message = turn.assistant_message
        if turn.status == Turn.Status.RUNNING:
            text = events.text_snapshot(schema, turn.pk)
            if text:
                out.append({"event": "token.delta", "turn_id": turn.pk, "offset": 0, "text": text})
        elif turn.status == Turn.Status.COMPLETED:
            out.append({"event": "turn.completed", "turn_id": turn.pk, "message_id": message.pk if message else None,
                        "content": message.content if message else "",
                        "citations": message.citations if message else [],
                        # Whether the counts were estimated is not kept on the turn.
                        "usage": {"input_tokens": turn.input_tokens, "output_tokens": turn.output_tokens,
                                  "estimated": False, **turn_cost_fields(turn.pk)}})
        elif turn.status == Turn.Status.FAILED:
            out.append({"event": "turn.failed", "turn_id": turn.pk,
                        "error": {"code": turn.error_code, "message": turn.error_message}})
        elif turn.status == Turn.Status.AWAITING_APPROVAL:
            from agents.models import ApprovalRequest

            approval = (ApprovalRequest.objects.select_related("tool_call").filter(turn_id=turn.pk)
                        .order_by("-pk").first())
            if approval is not None:
                out.append({"event": "approval.requested", "turn_id": turn.pk, "approval_id": approval.pk,
                            "call_id": approval.tool_call.call_id, "tool": approval.tool_name,
                            "arguments": approval.arguments, "expires_at": approval.expires_at.isoformat()})
        elif turn.status == Turn.Status.CANCELLED:
            if message is not None:
                out.append({"event": "token.delta", "turn_id": turn.pk, "offset": 0, "text": message.content})
            out.append({"event": "turn.cancelled", "turn_id": turn.pk, "message_id": turn.assistant_message_id})
        return out


class TurnRelay:
    """Decides which events of one turn reach the client: each of ``turn.queued``,
    ``turn.started`` and ``citations`` once, deltas without overlap, tool and approval events as
    they come, nothing after the final event or ``approval.requested`` (the turn parked)."""

    def __init__(self, turn_id: int) -> None:
        self.turn_id = turn_id
        self.sent_chars = 0
        self.seen: set[str] = set()
        self.done = False

    def accept(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        name = str(event.get("event", ""))
        if self.done or event.get("turn_id") != self.turn_id:
            return []
        if name in _ONCE:
            if name in self.seen:
                return []
            self.seen.add(name)
            return [event]
        if name == "token.delta":
            offset, text = int(event["offset"]), str(event["text"])
            end = offset + len(text)
            if end <= self.sent_chars or offset > self.sent_chars:
                # Already sent, or a gap (a lost delta): the next snapshot or the final content fills it.
                return []
            if offset < self.sent_chars:
                event = {**event, "offset": self.sent_chars, "text": text[self.sent_chars - offset:]}
            self.sent_chars = end
            return [event]
        if name in PAUSE_EVENTS:
            self.done = True
            return [event]
        if name in FINAL_EVENTS:
            self.done = True
            out: list[dict[str, Any]] = []
            content = str(event.get("content") or "") if name == "turn.completed" else ""
            if len(content) > self.sent_chars:
                out.append({"event": "token.delta", "turn_id": self.turn_id, "offset": self.sent_chars,
                            "text": content[self.sent_chars:]})
                self.sent_chars = len(content)
            out.append(event)
            return out
        return [event]


async def turn_events(*, schema: str, session_id: int, turn_id: int, wait_seconds: float,
                      start: list[dict[str, Any]] | None = None,
                      after_subscribe: Callable[[], Awaitable[None]] | None = None,
                      ) -> AsyncGenerator[dict[str, Any] | None, None]:
    """The events of turn ``turn_id`` (dicts as in ``agents.runtime.events``), ending after its
    final event (``turn.completed``, ``turn.failed`` or ``turn.cancelled``) or after
    ``approval.requested`` when the turn parks for an approval.

    Yields ``None`` (a heartbeat) after each wait that produced nothing for the client, at least
    every ``POLL_SECONDS`` while the turn is quiet, so callers can write keep-alives. If no
    final event came within ``wait_seconds`` the last item is
    ``{"event": "error", "turn_id": ..., "error": {"code": "stream_timeout", "message": ...}}``
    (the turn itself may still finish: ``GET /sessions/{id}/turns/{turn_id}`` tells).
    The channel-layer subscription is always removed, also when the consumer stops early.

    ``start``: the turn's state when the caller knows it (a turn its request just saved, whose
    task ``after_subscribe`` sends once the group is joined), instead of reading the snapshot.
    """
    layer = get_channel_layer()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    relay = TurnRelay(turn_id)
    snapshot = sync_to_async(_snapshot_sync)
    channel = ""
    listening = False
    group = events.session_group(schema, session_id)
    pending: asyncio.Future[Any] | None = None
    try:
        if layer is not None:
            channel = await layer.new_channel()
            # Join before reading the snapshot, so nothing published in between is missed.
            await layer.group_add(group, channel)
            listening = True
        if after_subscribe is not None:
            await after_subscribe()
        for event in start if start is not None and listening else await snapshot(schema, turn_id):
            for out in relay.accept(event):
                yield out
        next_poll = loop.time() + POLL_SECONDS
        while not relay.done:
            now = loop.time()
            if now >= deadline:
                yield {"event": "error", "turn_id": turn_id,
                       "error": {"code": "stream_timeout",
                                 "message": f"The turn did not finish within {wait_seconds:.0f} s; "
                                            "read its state later."}}
                return
            received: list[dict[str, Any]] = []
            timeout = max(0.0, min(next_poll, deadline) - now)
            if layer is not None and listening:
                # One receive stays pending across iterations: cancelling a channels-redis receive
                # mid-read could drop a message, so it is cancelled only when the stream ends.
                if pending is None:
                    pending = asyncio.ensure_future(layer.receive(channel))
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                if pending in done:
                    task, pending = pending, None
                    try:
                        message = task.result()
                    except Exception:
                        logger.exception("turn_stream_receive_failed", turn_id=turn_id)
                        listening = False  # fall back to polling the database
                    else:
                        if message.get("type") == events.EVENT_TYPE and isinstance(message.get("event"), dict):
                            received.append(message["event"])
            else:
                await asyncio.sleep(timeout)
            if received:
                next_poll = loop.time() + POLL_SECONDS  # events flow: no database read
            elif loop.time() >= next_poll:
                received.extend(await snapshot(schema, turn_id))
                next_poll = loop.time() + POLL_SECONDS
            emitted = False
            for event in received:
                for out in relay.accept(event):
                    emitted = True
                    yield out
            if not emitted:
                yield None
    finally:
        if pending is not None:
            pending.cancel()
        if layer is not None and channel:
            with contextlib.suppress(Exception):
                await layer.group_discard(group, channel)


_handoff: ThreadPoolExecutor | None = None
_handoff_lock = threading.Lock()
# Threads for the web process's short blocking calls around a turn (a Celery publish, a rate-limit
# count in Redis): the event loop's default pool has min(32, cores + 4) threads, and 50 sends at
# once queued behind its 6 there.
HANDOFF_THREADS = 32


def handoff_executor() -> ThreadPoolExecutor:
    """This process's pool for the blocking calls of turn hand-offs (``sync_to_async(...,
    executor=handoff_executor())``)."""
    global _handoff
    with _handoff_lock:
        if _handoff is None:
            _handoff = ThreadPoolExecutor(max_workers=HANDOFF_THREADS, thread_name_prefix="turn-handoff")
        return _handoff


def new_turn_options(turn: Turn, marks: dict[str, float], *, schema: str) -> dict[str, Any]:
    """``turn_events``' ``start`` and ``after_subscribe`` for ``turn`` of ``schema``, which the
    request just saved with ``chat_message_send(enqueue=False)``: the stream starts at
    ``turn.queued`` and sends the turn's task (with ``marks``, ``agents.runtime.timings``) once it
    listens."""
    from agents.services import turn_enqueue

    queued = {"event": "turn.queued", "turn_id": turn.pk, "session_id": turn.session_id,
              "user_message_id": turn.user_message_id}

    # The request's span has ended when the stream sends the task: the task joins its trace.
    request_context = telemetry.context_capture()

    def send() -> None:
        # tenant-schemas-celery sends the schema of this thread's connection with the task.
        with schema_context(schema), telemetry.context_attached(request_context):
            turn_enqueue(turn, marks)

    async def enqueue() -> None:
        await sync_to_async(send, thread_sensitive=False, executor=handoff_executor())()

    return {"start": [queued], "after_subscribe": enqueue}


def sse_format(event: dict[str, Any]) -> str:
    """One Server-Sent Event: ``event: <name>`` and ``data: <json>`` lines and a blank line."""
    return f"event: {event['event']}\ndata: {json.dumps(event, cls=DjangoJSONEncoder)}\n\n"


KEEP_ALIVE = ": keep-alive\n\n"


async def turn_events_or_keepalives(*, schema: str, session_id: int, turn_id: int, wait_seconds: float,
                                    **options: Any) -> AsyncGenerator[dict[str, Any] | None, None]:
    """``turn_events`` with its heartbeats thinned out: ``None`` now means "write a keep-alive"
    and comes only after ``HEARTBEAT_SECONDS`` without an event. Closes ``turn_events`` (and its
    channel-layer subscription) when closed itself. ``options``: ``turn_events``' ``start`` and
    ``after_subscribe``."""
    last_write = time.monotonic()
    stream = turn_events(schema=schema, session_id=session_id, turn_id=turn_id, wait_seconds=wait_seconds,
                         **options)
    async with contextlib.aclosing(stream):
        async for event in stream:
            if event is None and time.monotonic() - last_write < HEARTBEAT_SECONDS:
                continue
            last_write = time.monotonic()
            yield event


async def turn_sse(*, schema: str, session_id: int, turn_id: int, wait_seconds: float,
                   **options: Any) -> AsyncIterator[str]:
    """``turn_events`` as Server-Sent Events text, with a ``: keep-alive`` comment after
    ``HEARTBEAT_SECONDS`` of silence; ends after the final (or ``error``) event. ``options``:
    ``turn_events``' ``start`` and ``after_subscribe``."""
    stream = turn_events_or_keepalives(schema=schema, session_id=session_id, turn_id=turn_id,
                                       wait_seconds=wait_seconds, **options)
    async with contextlib.aclosing(stream):
        async for event in stream:
            yield KEEP_ALIVE if event is None else sse_format(event)


def sse_response(chunks: AsyncIterator[str]) -> StreamingHttpResponse:
    """A ``text/event-stream`` response over ``chunks``, with caching and proxy buffering off.

    Under ASGI Django sends each chunk as it is produced. Call it from the view's thread: the
    request's database connection goes back to the pool here, since the stream lasts seconds and
    Django would hand it back only when the stream ends (50 streams then held 50 connections and
    the requests after them waited for one)."""
    connection_release()
    response = StreamingHttpResponse(chunks, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def turn_wait(*, schema: str, session_id: int, turn_id: int, wait_seconds: float) -> dict[str, Any] | None:
    """Block until turn ``turn_id`` is final or parked; its final event (or
    ``approval.requested``), or ``None`` after ``wait_seconds``.

    For sync views: runs ``turn_events`` through ``async_to_sync`` (on the server's event loop
    under ASGI), so it has the same guarantees as the stream."""

    async def collect() -> dict[str, Any] | None:
        stream = turn_events(schema=schema, session_id=session_id, turn_id=turn_id, wait_seconds=wait_seconds)
        # aclosing: leaving early must still remove the channel-layer subscription at once.
        async with contextlib.aclosing(stream):
            async for event in stream:
                if event is not None and event["event"] in END_EVENTS:
                    return event
        return None

    return async_to_sync(collect)()
