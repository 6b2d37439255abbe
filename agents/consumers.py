"""The chat WebSocket, ``ws/chat/<session_id>/`` on a tenant host. It only authenticates and relays.

Connect: the Host picks the tenant (as for HTTP); the ``Origin`` must be one of that tenant's own
origins (``tenant_origins``), so a page on another host (another tenant's included) cannot open a
socket with the visitor's cookie; the browser session must belong to a member of that tenant who
has passed two-factor verification where needed, and own the chat session. Otherwise the socket
is closed before it is accepted (daphne answers the handshake with HTTP 403; a program sees close
code 4403, or 4404 for a session that is not the caller's).

Client -> server, JSON (htmx's ws extension sends the form's fields)::

    {"content": "question"}            send a message (starts a turn)
    {"action": "cancel", "turn_id": 7}  stop a running turn

A message first counts against the plan's ``chat_turns_per_minute`` (Redis only); over it, the
socket gets an ``error`` event with code ``rate_limited`` and ``retry_after`` (seconds) and stays
open. A message is handed to a Celery worker of the agent's tier (``agents.chat_message_accept``),
which saves it and runs the turn; ``message.accepted`` or ``error`` comes back through the
session's group, so this process does no database work per message and only relays.

Server -> client: the turn events of ``agents.runtime.events``, as HTML fragments that htmx
swaps in by id (default), or as the raw JSON events with ``?format=json``. On connect the
client first gets the state of the session's latest turn (and the text streamed so far).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs

import structlog
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.utils.http import is_same_domain
from django_tenants.utils import schema_context
from kombu.exceptions import OperationalError as KombuOperationalError

from agents.runtime import events
from agents.streaming import handoff_executor
from config import telemetry
from config.errors import DomainError, TooManyRequests

logger = structlog.get_logger(__name__)

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


def _host(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name == b"host":
            return value.decode("latin-1").split(":")[0].lower()
    return ""


def _origin(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"origin":
            return value.decode("latin-1").strip().lower()
    return None


def tenant_origins(domains: list[str]) -> set[str]:
    """The origins (``scheme://host[:port]``, lower case) the console of a tenant with these
    domain names is served on: the scheme is ``HTTP_PROTOCOL`` and the port ``PUBLIC_PORT``
    (left out when it is the scheme's default, as browsers do in ``Origin``)."""
    scheme = str(settings.ACCOUNT_DEFAULT_HTTP_PROTOCOL).lower()
    port = str(settings.PUBLIC_PORT or "")
    suffix = "" if port in ("", {"http": "80", "https": "443"}.get(scheme)) else f":{port}"
    return {f"{scheme}://{domain.lower().rstrip('.')}{suffix}" for domain in domains}


def origin_allowed(origin: str | None, domains: list[str]) -> bool:
    """True when ``origin`` (the WebSocket handshake's ``Origin`` header) is one of the tenant's
    own origins (``tenant_origins(domains)``) or matches ``CSRF_TRUSTED_ORIGINS`` (exact, or
    ``scheme://*.example.com`` as Django's CSRF check reads it). A missing Origin is refused, as
    channels' validator did before: browsers always send one on a WebSocket handshake."""
    if not origin:
        return False
    if origin in tenant_origins(domains):
        return True
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        trusted = trusted.lower()
        if origin == trusted:
            return True
        scheme, _, host = trusted.partition("://")
        if "*" in host and origin.startswith(f"{scheme}://") and is_same_domain(
                origin.removeprefix(f"{scheme}://"), host.removeprefix("*")):
            return True
    return False


@database_sync_to_async
def _authorize(scope: dict[str, Any], session_id: int) -> tuple[str, Any, int, str] | int:
    """(schema, principal, membership id, queue of the agent's tier) for an allowed connection,
    else a close code."""
    from django_otp import DEVICE_ID_SESSION_KEY
    from django_otp.plugins.otp_totp.models import TOTPDevice

    from agents.selectors import session_get
    from agents.services import queue_for
    from tenants.middleware import two_factor_required
    from tenants.models import Domain, Membership
    from tenants.principal import Principal

    def refuse(reason: str, code: int = CLOSE_FORBIDDEN) -> int:
        logger.info("chat_socket_refused", reason=reason, host=_host(scope), session_id=session_id)
        return code

    try:
        domain = Domain.objects.select_related("tenant").get(domain=_host(scope))
    except ObjectDoesNotExist:
        return refuse("unknown_host")
    tenant = domain.tenant
    # Before anything else: a page on another site must not learn even whether the cookie is valid.
    if not origin_allowed(_origin(scope), list(Domain.objects.filter(tenant=tenant).values_list("domain", flat=True))):
        return refuse("foreign_origin")
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return refuse("not_signed_in")
    if tenant.schema_name == settings.PUBLIC_SCHEMA_NAME or not tenant.is_active:
        return refuse("tenant_inactive")
    # With the plan: each message's rate-limit check then reads no row (``_rate_limit_check``).
    membership = (Membership.objects.select_related("user", "tenant", "tenant__plan")
                  .filter(user=user, tenant=tenant).first())
    if membership is None:
        return refuse("not_a_member")
    verified = bool(scope.get("session", {}).get(DEVICE_ID_SESSION_KEY))
    if not verified and (two_factor_required(user, membership, tenant)
                         or TOTPDevice.objects.filter(user=user, confirmed=True).exists()):
        return refuse("two_factor_required")
    principal = Principal.for_member(membership)
    with schema_context(tenant.schema_name):
        try:
            session = session_get(principal=principal, session_id=session_id)
        except DomainError:
            return refuse("no_such_session", CLOSE_NOT_FOUND)
        version = session.agent.active_version
        queue = queue_for(version) if version is not None else settings.CELERY_TASK_DEFAULT_QUEUE
        return tenant.schema_name, principal, membership.pk, queue


@database_sync_to_async
def _snapshot(schema: str, principal: Any, session_id: int, *, as_json: bool = False) -> list[dict[str, Any]]:
    """Events that bring a (re)connecting client up to date with the latest turn: its state, its
    tool calls and approval (one ``tools.state`` event for the HTML page, which replaces the
    turn's tool list; the tool events themselves with ``format=json``), and the text so far."""
    from agents.chat_html import tool_cards_from_rows, tool_events_from_rows
    from agents.models import ToolCall, Turn
    from agents.selectors import session_get, turn_latest
    from billing.selectors.usage import turn_cost_fields

    with schema_context(schema):
        session = session_get(principal=principal, session_id=session_id)
        turn = turn_latest(session=session)
        if turn is None:
            return []
        out: list[dict[str, Any]] = [{"event": "turn.state", "turn_id": turn.pk, "status": turn.status,
                                      "user_message_id": turn.user_message_id,
                                      "question": turn.user_message.content}]
        if turn.status in Turn.UNFINISHED:
            calls = list(ToolCall.objects.filter(turn=turn).select_related("approval").order_by("sequence"))
            if calls and as_json:
                out.extend(tool_events_from_rows(calls))
            elif calls:
                out.append({"event": "tools.state", "turn_id": turn.pk, "status": turn.status,
                            "calls": tool_cards_from_rows(calls)})
        if turn.status in (Turn.Status.QUEUED, Turn.Status.RUNNING):
            text = events.text_snapshot(schema, turn.pk)
            if turn.retrieved:
                out.append({"event": "citations", "turn_id": turn.pk,
                            "citations": [{k: v for k, v in r.items() if k not in ("text", "vector_score",
                                                                                   "keyword_score")}
                                          for r in turn.retrieved],
                            "retrieved": turn.retrieved})
            if text:
                out.append({"event": "token.delta", "turn_id": turn.pk, "offset": 0, "text": text})
        elif turn.status == Turn.Status.COMPLETED and turn.assistant_message is not None:
            message = turn.assistant_message
            out.append({"event": "turn.completed", "turn_id": turn.pk, "message_id": message.pk,
                        "content": message.content, "citations": message.citations,
                        "usage": {"input_tokens": turn.input_tokens, "output_tokens": turn.output_tokens,
                                  **turn_cost_fields(turn.pk)}})
        elif turn.status == Turn.Status.FAILED:
            out.append({"event": "turn.failed", "turn_id": turn.pk,
                        "error": {"code": turn.error_code, "message": turn.error_message}})
        elif turn.status == Turn.Status.CANCELLED:
            out.append({"event": "turn.cancelled", "turn_id": turn.pk,
                        "message_id": turn.assistant_message_id})
        return out


def _rate_limit_check(principal: Any) -> dict[str, Any] | None:
    """Count a message against the plan's ``chat_turns_per_minute`` for this member; an
    ``error`` event (code ``rate_limited``, ``retry_after`` in seconds) when it is over. Redis
    only: the plan came with the membership when the socket connected, so a plan change applies
    to sockets opened after it."""
    from config.ratelimit import rate_limit_hit

    if principal is None:  # not connected (receive only runs after connect sets it)
        return None
    try:
        rate_limit_hit(tenant=principal.tenant, principal=principal, limit="chat_turns_per_minute")
    except TooManyRequests as exc:
        return {"event": "error", "error": {"code": exc.code, "message": exc.message,
                                            "retry_after": exc.retry_after, "details": exc.details}}
    return None


def _hand_off(schema: str, queue: str, membership_id: int, session_id: int, content: str,
              received: float) -> None:
    """Queue the message for a worker of the agent's tier, in the tenant's schema
    (tenant-schemas-celery sends the schema of the current connection with the task), with the
    turn's first step marks (``agents.runtime.timings``)."""
    from agents.tasks import chat_message_accept_task

    marks = {"received": received, "enqueued": time.time()}
    # A socket message has no request span: this one is the root of its turn's trace.
    with schema_context(schema), telemetry.span("chat.message", {"portal.tenant.schema": schema,
                                                                  "portal.session.id": session_id}):
        chat_message_accept_task.apply_async(args=[membership_id, session_id, content], kwargs={"marks": marks},
                                             queue=queue)


@database_sync_to_async
def _cancel(schema: str, principal: Any, session_id: int, turn_id: int) -> dict[str, Any] | None:
    from agents.selectors import session_get, turn_get
    from agents.services import turn_cancel

    with schema_context(schema):
        try:
            session = session_get(principal=principal, session_id=session_id)
            turn_cancel(principal=principal, turn=turn_get(principal=principal, session=session, turn_id=turn_id))
        except DomainError as exc:
            return {"event": "error", "error": {"code": exc.code, "message": exc.message}}
    return None


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]  # channels is untyped
    """Relays a session's turn events to one browser (or program) and takes its messages."""

    schema: str = ""
    principal: Any = None
    session_id: int = 0
    membership_id: int = 0
    queue: str = ""
    group: str = ""
    as_json: bool = False
    # Characters of the running turn's text already sent, to drop overlaps after a snapshot.
    sent: dict[int, int]

    async def connect(self) -> None:
        self.sent = {}
        self.session_id = int(self.scope["url_route"]["kwargs"]["session_id"])
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.as_json = query.get("format", [""])[0] == "json"
        outcome = await _authorize(self.scope, self.session_id)
        if isinstance(outcome, int):
            await self.close(code=outcome)
            return
        self.schema, self.principal, self.membership_id, self.queue = outcome
        self.group = events.session_group(self.schema, self.session_id)
        # Join before reading the snapshot, so nothing published in between is missed.
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        for event in await _snapshot(self.schema, self.principal, self.session_id, as_json=self.as_json):
            await self._relay(event)

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        received = time.time()
        if not isinstance(content, dict):
            await self._relay({"event": "error", "error": {"code": "bad_request", "message": "Send a JSON object."}})
            return
        if content.get("action") == "cancel":
            try:
                turn_id = int(content.get("turn_id"))  # type: ignore[arg-type]  # ValueError/TypeError handled
            except (TypeError, ValueError):
                await self._relay({"event": "error", "error": {"code": "bad_request", "message": "turn_id is needed."}})
                return
            reply = await _cancel(self.schema, self.principal, self.session_id, turn_id)
            if reply:
                await self._relay(reply)
            return
        text = content.get("content")
        if not isinstance(text, str):
            await self._relay({"event": "error", "error": {"code": "bad_request",
                                                            "message": "Send {\"content\": \"your message\"}."}})
            return
        # Counted here, before the hand-off, so a client flooding the socket costs a Redis call per
        # message and never fills the tier's queue; the socket stays open for later messages.
        refused = await sync_to_async(_rate_limit_check, thread_sensitive=False,
                                      executor=handoff_executor())(self.principal)
        if refused is not None:
            await self._relay(refused)
            return
        # A publish to Redis, on a pool thread: never the sync thread, never a database statement.
        try:
            await sync_to_async(_hand_off, thread_sensitive=False, executor=handoff_executor())(
                self.schema, self.queue, self.membership_id, self.session_id, text, received)
        except KombuOperationalError:
            # The broker is down: nothing was saved, so the user can simply send it again.
            logger.warning("chat_hand_off_failed", session_id=self.session_id, exc_info=True)
            await self._relay({"event": "error", "error": {
                "code": "unavailable", "message": "The chat service is unavailable; send your message again shortly."}})

    async def decode_json(self, text_data: str) -> Any:
        try:
            return await super().decode_json(text_data)
        except ValueError:
            return None

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections before every handler, by a hop to the sync
        # thread that the socket's database work also waits on. Relaying a turn event touches no
        # database, and one such hop per token batch was a large part of this process's CPU.
        if message.get("type") == events.EVENT_TYPE:
            await self.chat_event(message)
            return
        await super().dispatch(message)

    async def chat_event(self, message: dict[str, Any]) -> None:
        """Channel-layer handler for ``events.EVENT_TYPE``."""
        await self._relay(message["event"])

    async def _relay(self, event: dict[str, Any]) -> None:
        if event.get("event") == "turn.started":
            # A turn resumed after an approval is announced again; its deltas then continue the text
            # from before it parked (a gap this socket fills from the snapshot) or restart at 0.
            self.sent.pop(int(event.get("turn_id") or 0), None)
        if event.get("event") == "token.delta":
            turn_id = int(event["turn_id"])
            have = self.sent.get(turn_id, 0)
            offset = int(event["offset"])
            end = offset + len(event["text"])
            if end <= have:
                return
            if offset > have:
                # A delta never reached this consumer (Pub/Sub delivers at most once, e.g. across
                # a Redis reconnect): the turn's snapshot holds the text, written before each
                # publish. Read off the shared sync thread, which saves incoming messages.
                text = await sync_to_async(events.text_snapshot, thread_sensitive=False)(self.schema, turn_id)
                if len(text) >= end:
                    event = {**event, "offset": have, "text": text[have:end]}
            elif offset < have:
                event = {**event, "offset": have, "text": event["text"][have - offset:]}
            self.sent[turn_id] = end
        if self.as_json:
            await self.send_json(event)
            return
        from agents.chat_html import event_fragment

        # Templates only, no database access; the permission was read when the socket connected.
        html = event_fragment(event, can_review=bool(self.principal and self.principal.can("approvals:read")))
        if html:
            await self.send(text_data=html)
