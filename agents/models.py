"""Agents, their immutable versions, and chat: sessions, messages and turns (tenant schema).

An ``Agent`` is the stable name users see; what it does is an ``AgentVersion``, which is never
changed once written (a database trigger refuses UPDATE). Editing makes a new version;
publishing points ``Agent.active_version`` at one; rollback points it back at an older one.

A chat ``Turn`` is one user message and the work of answering it, a small state machine::

    queued -> running -> completed | failed | cancelled
    queued -> cancelled | failed
"""

from __future__ import annotations

from typing import ClassVar

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone


class Agent(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        ACTIVE = "active", "Active"
        PAUSED = "paused", "Paused"
        RETIRED = "retired", "Retired"

    slug = models.SlugField(max_length=60, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT)
    active_version = models.ForeignKey("AgentVersion", null=True, blank=True, on_delete=models.PROTECT,
                                       related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["name"]

    def __str__(self) -> str:
        return self.name


class AgentVersion(models.Model):
    """One immutable configuration of an agent.

    ``tier`` picks the platform's endpoints of that tier (with their fallbacks) unless
    ``endpoint_id`` pins one ``tenants.ModelEndpoint``. ``history_window`` is the most recent
    messages kept in the prompt (then trimmed further to the model's context window).
    ``collection_ids`` are knowledge collections searched for every turn (none: no retrieval);
    ``retrieval_max_chunks_per_document`` caps how many of the ``retrieval_top_k`` chunks may come
    from one document (``chunk_search``'s ``max_chunks_per_document``; null: no cap).
    ``output_schema`` is a JSON Schema when ``output_format`` is ``json_schema``.
    """

    class OutputFormat(models.TextChoices):
        TEXT = "text", "Text"
        JSON_SCHEMA = "json_schema", "JSON (schema)"

    class RetrievalMode(models.TextChoices):
        HYBRID = "hybrid", "Hybrid"
        VECTOR = "vector", "Vector"
        KEYWORD = "keyword", "Keyword"

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    system_prompt = models.TextField()
    rules = models.TextField(blank=True)
    tier = models.CharField(max_length=10, default="standard")
    endpoint_id = models.BigIntegerField(null=True, blank=True)
    temperature = models.FloatField(default=0.2)
    max_output_tokens = models.PositiveIntegerField(default=512)
    history_window = models.PositiveIntegerField(default=20)
    collection_ids = ArrayField(models.BigIntegerField(), default=list, blank=True)
    retrieval_top_k = models.PositiveIntegerField(default=5)
    retrieval_mode = models.CharField(max_length=10, choices=RetrievalMode.choices, default=RetrievalMode.HYBRID)
    retrieval_max_chunks_per_document = models.PositiveIntegerField(null=True, blank=True)
    output_format = models.CharField(max_length=12, choices=OutputFormat.choices, default=OutputFormat.TEXT)
    output_schema = models.JSONField(null=True, blank=True)
    note = models.CharField(max_length=300, blank=True)
    created_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["agent", "-number"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["agent", "number"], name="agent_version_number_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} v{self.number}"


class ChatSession(models.Model):
    """A conversation with one agent, owned by the member or API key that opened it."""

    class Channel(models.TextChoices):
        CONSOLE = "console", "Console"
        API = "api", "API"
        OPENAI = "openai", "OpenAI-compatible"

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="sessions")
    title = models.CharField(max_length=200, blank=True)
    channel = models.CharField(max_length=10, choices=Channel.choices, default=Channel.CONSOLE)
    # The owner: a public-schema user id or an API key id (never both).
    user_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    api_key_id = models.CharField(max_length=24, blank=True, db_index=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["-updated_at"]

    def __str__(self) -> str:
        return self.title or f"Session {self.pk}"

    @property
    def group_name(self) -> str:
        """The channel-layer group that receives this session's turn events."""
        from django.db import connection

        return f"chat.{connection.schema_name}.{self.pk}"  # type: ignore[attr-defined]


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"
        SYSTEM = "system", "System"

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField()
    # [{"n": 1, "chunk_id", "document_id", "title", "page_number", "heading_path", "score"}]
    citations = models.JSONField(default=list, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["id"]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class Turn(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    FINAL: ClassVar[frozenset[str]] = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="turns")
    agent_version = models.ForeignKey(AgentVersion, on_delete=models.PROTECT, related_name="turns")
    user_message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="turn")
    assistant_message = models.OneToOneField(Message, null=True, blank=True, on_delete=models.SET_NULL,
                                             related_name="answered_turn")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    queue = models.CharField(max_length=20, default="llm.standard")
    cancel_requested = models.BooleanField(default=False)
    deadline = models.DateTimeField()
    queued_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Stamped by the worker running the turn every CHAT_TURN_HEARTBEAT_SECONDS: the sweeper fails a
    # running turn whose stamp is older than CHAT_TURN_HEARTBEAT_STALE_SECONDS (its worker died).
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    endpoint_name = models.CharField(max_length=100, blank=True)
    model = models.CharField(max_length=200, blank=True)
    # The chunks retrieved for this turn, with their scores, for the console's panel.
    retrieved = models.JSONField(default=list, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)

    class Meta:
        ordering: ClassVar = ["id"]

    def __str__(self) -> str:
        return f"Turn {self.pk} ({self.status})"
