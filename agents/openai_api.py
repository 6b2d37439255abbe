"""OpenAI-compatible endpoints at ``/api/v1/openai/`` (``model`` is an agent slug)."""

from __future__ import annotations

from ninja import Router

router = Router(tags=["openai-compatible"])
