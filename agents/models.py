"""Agents, their immutable versions, and chat: sessions, messages and turns (tenant schema).

An ``Agent`` is the stable name users see; what it does is an ``AgentVersion``, which is never
changed once written (a database trigger refuses UPDATE). Editing makes a new version;
publishing points ``Agent.active_version`` at one; rollback points it back at an older one.

A chat ``Turn`` is one user message and the work of answering it, a small state machine::

    queued -> running -> completed | failed | cancelled
    queued -> cancelled | failed
    running -> awaiting_approval -> running (decided) | failed (expired) | cancelled

A ``Tool`` is something an agent may call (a builtin, or an HTTP request to a tenant's service);
each call the model makes is a ``ToolCall`` of its turn, and a call of a tool that
``requires_approval`` waits for an ``ApprovalRequest`` to be decided by a person who may decide.
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

    class ToolChoice(models.TextChoices):
        AUTO = "auto", "Auto"
        REQUIRED = "required", "Required"
        NONE = "none", "None"

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
    # Names of the tenant's tools the model may call. tool_choice is auto, required, none, or the
    # name of one of those tools (OpenAI's named choice: small local models only call tools when
    # named, docs/local-model-tools.md); it applies to the turn's first model call, later calls
    # of the loop are "auto" so that the model can answer from the results.
    tools = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    tool_choice = models.CharField(max_length=64, default=ToolChoice.AUTO)
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
        AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"

    FINAL: ClassVar[frozenset[str]] = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
    # A session takes no new message while one of its turns is in one of these.
    UNFINISHED: ClassVar[frozenset[str]] = frozenset({Status.QUEUED, Status.RUNNING, Status.AWAITING_APPROVAL})

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="turns")
    agent_version = models.ForeignKey(AgentVersion, on_delete=models.PROTECT, related_name="turns")
    user_message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="turn")
    assistant_message = models.OneToOneField(Message, null=True, blank=True, on_delete=models.SET_NULL,
                                             related_name="answered_turn")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
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
    # The tool loop's state, saved when the turn parks for an approval so that a worker can
    # resume it: {"messages": [...the model's messages so far...], "model_calls": n,
    # "citations": [...]} ({} for a turn that never parked).
    loop_state = models.JSONField(default=dict, blank=True)
    # When each step before the first token happened ({"received": epoch seconds, "accepted": ...};
    # agents.runtime.timings.STEPS), saved with the turn's final state: what a slow start spent.
    timings = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering: ClassVar = ["id"]

    def __str__(self) -> str:
        return f"Turn {self.pk} ({self.status})"


class Tool(models.Model):
    """A tool agents may call: a builtin (``kb_search``, ``current_time``, ``calculator``, rows
    made by a migration and never changed) or an HTTP request to the tenant's service.

    ``parameters`` is a JSON Schema (Draft 2020-12) of the arguments. An HTTP tool sends
    ``method`` to ``url`` (``{param}`` placeholders filled with URL-encoded arguments) with
    ``headers``, the encrypted ``secret_headers_encrypted`` (a JSON object of header -> value,
    encrypted with ``config.crypto.secret_encrypt``; never returned or logged) and, when set,
    ``body_template`` (JSON whose ``"{param}"`` strings become the arguments' values). Every
    request goes through the egress guard.
    """

    class Kind(models.TextChoices):
        BUILTIN = "builtin", "Builtin"
        HTTP = "http", "HTTP"

    class SideEffect(models.TextChoices):
        READ = "read", "Read"
        WRITE = "write", "Write"

    name = models.CharField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.HTTP)
    parameters = models.JSONField(default=dict, blank=True)
    side_effect = models.CharField(max_length=5, choices=SideEffect.choices, default=SideEffect.READ)
    requires_approval = models.BooleanField(default=False)
    timeout_seconds = models.FloatField(default=10.0)
    max_response_bytes = models.PositiveIntegerField(default=65536)
    method = models.CharField(max_length=7, blank=True)
    url = models.CharField(max_length=2000, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    secret_headers_encrypted = models.TextField(blank=True)
    body_template = models.JSONField(null=True, blank=True)
    created_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["name"]

    def __str__(self) -> str:
        return self.name

    def secret_headers(self) -> dict[str, str]:
        """The decrypted secret headers (header -> value; ``{}`` when none). Raises
        ``config.crypto.SecretUnreadable`` when no configured key decrypts them, ``ValueError``
        when they are not a JSON object of strings. Never return or log the values."""
        import json

        from config.crypto import secret_decrypt

        if not self.secret_headers_encrypted:
            return {}
        value = json.loads(secret_decrypt(self.secret_headers_encrypted))
        if not isinstance(value, dict):
            raise ValueError("secret headers are not a JSON object")
        return {str(name): str(text) for name, text in value.items()}


class ToolCall(models.Model):
    """One tool call the model made in a turn, in the order made (``sequence``).

    ``invalid`` calls (arguments that are not JSON or break the schema, an unknown tool or one
    not on the version's list) are never executed; the model is told why. A call of a tool that
    requires approval goes ``awaiting_approval`` -> ``approved`` | ``rejected`` (or ``expired``);
    an approved call is claimed (``running``) by exactly one worker before it is sent.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
        APPROVED = "approved", "Approved"
        RUNNING = "running", "Running"
        OK = "ok", "OK"
        ERROR = "error", "Error"
        INVALID = "invalid", "Invalid"
        REJECTED = "rejected", "Rejected"
        EXPIRED = "expired", "Expired"

    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="tool_calls")
    sequence = models.PositiveIntegerField()
    call_id = models.CharField(max_length=100)  # the id the model gave the call
    tool = models.ForeignKey(Tool, null=True, blank=True, on_delete=models.SET_NULL, related_name="calls")
    tool_name = models.CharField(max_length=200)  # as the model wrote it (may name no tool)
    arguments = models.JSONField(null=True, blank=True)  # parsed; null when they were not JSON
    arguments_raw = models.TextField(blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    error_code = models.CharField(max_length=40, blank=True)
    output_excerpt = models.TextField(blank=True)
    # What was sent and received (HTTP tools; secret header values redacted), for the console.
    request = models.JSONField(null=True, blank=True)
    response = models.JSONField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering: ClassVar = ["turn", "sequence"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["turn", "sequence"], name="tool_call_sequence_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.tool_name} ({self.status})"


class ApprovalRequest(models.Model):
    """A person's decision on one tool call: ``pending`` -> ``approved`` | ``rejected`` |
    ``expired`` | ``cancelled`` (the turn was stopped). Decided once.

    ``requested_by_*`` is whoever sent the message that caused the call (the session's owner:
    a member, or an API key and the person it acts for); they may not decide it (separation of
    duties). ``excerpt`` is the end of the conversation that led to the call
    (``[{"role", "content"}]``).
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        EXPIRED = "expired", "Expired"
        CANCELLED = "cancelled", "Cancelled"

    tool_call = models.OneToOneField(ToolCall, on_delete=models.CASCADE, related_name="approval")
    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="approvals")
    tool_name = models.CharField(max_length=64)
    arguments = models.JSONField(default=dict, blank=True)
    excerpt = models.JSONField(default=list, blank=True)
    requested_by_user_id = models.BigIntegerField(null=True, blank=True)
    requested_by_api_key_id = models.CharField(max_length=24, blank=True)
    requested_by_label = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    expires_at = models.DateTimeField()
    decided_by_user_id = models.BigIntegerField(null=True, blank=True)
    decided_by_api_key_id = models.CharField(max_length=24, blank=True)
    decided_by_label = models.CharField(max_length=200, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["-id"]

    def __str__(self) -> str:
        return f"Approval {self.pk} of {self.tool_name} ({self.status})"
