"""WebSocket routes (served on tenant hosts; see ``config.asgi``)."""

from __future__ import annotations

from typing import Any

from django.urls import path

from agents.consumers import ChatConsumer

websocket_urlpatterns: list[Any] = [
    path("ws/chat/<int:session_id>/", ChatConsumer.as_asgi()),
]
