"""REST endpoints for agents, versions, chat sessions and messages (``/api/v1/``)."""

from __future__ import annotations

from ninja import Router

router = Router(tags=["agents"])
