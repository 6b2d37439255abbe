"""API shapes for agents, versions, chat sessions, messages and turns, and the OpenAI-compatible
endpoints (``agents.openai_api``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ninja import Field, Schema
from pydantic import ConfigDict


class VersionConfigIn(Schema):
    """The fields of a version; any left out keep their default (on create) or the latest
    version's value (on a new version). Bounds are checked by ``services.version_config_clean``."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = None
    rules: str | None = None
    tier: str | None = None
    endpoint_id: int | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    history_window: int | None = None
    collection_ids: list[int] | None = None
    retrieval_top_k: int | None = None
    retrieval_mode: str | None = None
    # At most this many of the retrieved chunks from one document (1-50; 1: the best chunk of each
    # of top_k documents); null: no cap.
    retrieval_max_chunks_per_document: int | None = None
    output_format: str | None = None
    output_schema: dict[str, Any] | None = None


class AgentIn(Schema):
    slug: str = Field(max_length=100)
    name: str = Field(max_length=500)
    description: str = ""
    config: VersionConfigIn | None = None


class AgentPatch(Schema):
    name: str | None = Field(None, max_length=500)
    description: str | None = None


class AgentStatusIn(Schema):
    status: str = Field(description="active, paused or retired")


class VersionIn(Schema):
    config: VersionConfigIn = Field(default_factory=VersionConfigIn)
    note: str = Field("", max_length=300)


class AgentOut(Schema):
    id: int
    slug: str
    name: str
    description: str
    status: str
    active_version_number: int | None
    created_at: dt.datetime
    updated_at: dt.datetime


class AgentPage(Schema):
    items: list[AgentOut]
    next_cursor: str | None


class VersionOut(Schema):
    id: int
    agent_id: int
    number: int
    is_active: bool
    system_prompt: str
    rules: str
    tier: str
    endpoint_id: int | None
    temperature: float
    max_output_tokens: int
    history_window: int
    collection_ids: list[int]
    retrieval_top_k: int
    retrieval_mode: str
    retrieval_max_chunks_per_document: int | None
    output_format: str
    output_schema: dict[str, Any] | None
    note: str
    created_by: str
    created_at: dt.datetime


class VersionPage(Schema):
    items: list[VersionOut]
    next_cursor: str | None


class SessionIn(Schema):
    agent_id: int | None = Field(None, description="The agent's id; or give agent (its slug)")
    agent: str | None = Field(None, max_length=100, description="The agent's slug")
    title: str = Field("", max_length=200)


class SessionOut(Schema):
    id: int
    agent_id: int
    agent_slug: str
    title: str
    channel: str
    created_at: dt.datetime
    updated_at: dt.datetime


class SessionPage(Schema):
    items: list[SessionOut]
    next_cursor: str | None


class MessageIn(Schema):
    content: str = Field(description="The question; 1 to CHAT_MAX_MESSAGE_CHARS characters after trimming")
    stream: bool = Field(False, description="Answer as Server-Sent Events instead of waiting for the turn")


class MessageOut(Schema):
    id: int
    session_id: int
    role: str
    content: str
    citations: list[dict[str, Any]]
    input_tokens: int
    output_tokens: int
    turn_id: int | None = Field(description="The turn this message started (user) or answered (assistant)")
    created_at: dt.datetime


class MessagePage(Schema):
    items: list[MessageOut]
    next_cursor: str | None


class TurnError(Schema):
    code: str
    message: str


class TurnToolCallOut(Schema):
    """One tool call of a turn; ``status``: pending, awaiting_approval, approved, running, ok,
    error, invalid, rejected or expired."""

    call_id: str
    tool: str
    arguments: Any
    status: str
    error_code: str
    output_excerpt: str
    duration_ms: int | None


class TurnOut(Schema):
    id: int
    session_id: int
    status: str
    agent_version_id: int
    user_message_id: int
    assistant_message_id: int | None
    cancel_requested: bool
    model: str
    endpoint_name: str
    input_tokens: int
    output_tokens: int
    error: TurnError | None
    queued_at: dt.datetime
    started_at: dt.datetime | None
    first_token_at: dt.datetime | None
    finished_at: dt.datetime | None
    tool_calls: list[TurnToolCallOut] = []
    approval_id: int | None = None  # the pending approval request while status is awaiting_approval


# --- OpenAI-compatible ---------------------------------------------------------------------

class OpenAIModelOut(Schema):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class OpenAIModelList(Schema):
    object: str = "list"
    data: list[OpenAIModelOut]


class OpenAIChatMessage(Schema):
    """One message; ``content`` is a string or a list of parts (only ``text`` parts are read)."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class OpenAIStreamOptions(Schema):
    include_usage: bool = False


class OpenAIChatIn(Schema):
    """``POST /openai/chat/completions``. Sampling options (temperature, max_tokens, ...) are
    accepted and ignored: the agent's published version owns them."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=100, description="An agent's slug (see GET /openai/models)")
    messages: list[OpenAIChatMessage] = Field(min_length=1, max_length=500)
    stream: bool = False
    stream_options: OpenAIStreamOptions | None = None
    n: int = 1
    user: str | None = None


class OpenAIUsage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAIChoiceMessage(Schema):
    role: str
    content: str


class OpenAIChoice(Schema):
    index: int
    message: OpenAIChoiceMessage
    finish_reason: str


class OpenAIChatCompletion(Schema):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: OpenAIUsage
