"""WebSocket routes. Chat streaming adds its consumer here."""

from __future__ import annotations

from typing import Any

websocket_urlpatterns: list[Any] = []
