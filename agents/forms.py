"""Console forms for agents and chat (shape only; the rules live in ``agents.services``)."""

from __future__ import annotations

import json
from typing import Any

from django import forms

from agents.models import AgentVersion
from agents.services import VERSION_DEFAULTS, VERSION_FIELDS

TIER_CHOICES = [("light", "Light"), ("standard", "Standard"), ("heavy", "Heavy")]


def _bootstrap(form: forms.Form) -> None:
    """Give every widget the Bootstrap class that fits it."""
    for field in form.fields.values():
        widget = field.widget
        if isinstance(widget, forms.CheckboxSelectMultiple | forms.CheckboxInput):
            continue
        css = "form-select" if isinstance(widget, forms.Select) else "form-control"
        widget.attrs["class"] = f"{widget.attrs.get('class', '')} {css}".strip()


class AgentForm(forms.Form):
    """An agent's identity, asked once when it is created."""

    slug = forms.SlugField(max_length=60, help_text="Lowercase letters, digits and hyphens; used in the API.")
    name = forms.CharField(max_length=200)
    description = forms.CharField(required=False, max_length=5000, widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _bootstrap(self)


class AgentVersionForm(forms.Form):
    """Every field of an ``AgentVersion``; ``config()`` is what ``agent_version_create`` takes.

    ``collections`` are ``(id, name)`` pairs of the tenant's knowledge collections,
    ``endpoints`` ``(id, label)`` pairs of the model endpoints it may pin and ``tools``
    ``(name, label)`` pairs of its tools.
    """

    system_prompt = forms.CharField(max_length=20000, widget=forms.Textarea(attrs={"rows": 6}))
    rules = forms.CharField(required=False, max_length=20000, widget=forms.Textarea(attrs={"rows": 3}),
                            help_text="Extra instructions appended to the system prompt.")
    tier = forms.ChoiceField(choices=TIER_CHOICES, initial="standard")
    endpoint_id = forms.TypedChoiceField(choices=[], required=False, coerce=int, empty_value=None,
                                         label="Pinned endpoint",
                                         help_text="Use one endpoint instead of the tier's endpoints.")
    temperature = forms.FloatField(min_value=0.0, max_value=2.0, initial=0.2)
    max_output_tokens = forms.IntegerField(min_value=1, max_value=32768, initial=512, label="Max output tokens")
    history_window = forms.IntegerField(min_value=0, max_value=200, initial=20,
                                        help_text="Most recent messages kept in the prompt.")
    collection_ids = forms.TypedMultipleChoiceField(choices=[], required=False, coerce=int,
                                                    widget=forms.CheckboxSelectMultiple,
                                                    label="Knowledge collections")
    retrieval_top_k = forms.IntegerField(min_value=1, max_value=50, initial=5, label="Retrieval top-k")
    retrieval_mode = forms.ChoiceField(choices=AgentVersion.RetrievalMode.choices, initial="hybrid")
    retrieval_max_chunks_per_document = forms.IntegerField(
        min_value=1, max_value=50, required=False, label="Chunks per document",
        help_text="At most this many retrieved chunks from one document (1: one chunk each from top-k documents); "
                  "empty for no limit.")
    output_format = forms.ChoiceField(choices=AgentVersion.OutputFormat.choices, initial="text")
    output_schema = forms.CharField(required=False, label="Output JSON Schema",
                                    widget=forms.Textarea(attrs={"rows": 6, "class": "font-monospace"}),
                                    help_text="Used when the output format is JSON (schema).")
    tools = forms.MultipleChoiceField(choices=[], required=False, widget=forms.CheckboxSelectMultiple,
                                      label="Tools",
                                      help_text="What the model may call. Write tools that need approval wait for "
                                                "a person to approve each call.")
    tool_choice = forms.ChoiceField(choices=AgentVersion.ToolChoice.choices, initial="auto", label="Tool choice",
                                    required=False,
                                    help_text="Required: the model must call a tool before it answers (needs tools); "
                                              "none: it may not call any; a tool's name: it must call that one "
                                              "first (one of the tools above; small local models need this).")
    note = forms.CharField(required=False, max_length=300, help_text="What changed, for the version history.")

    def __init__(self, *args: Any, collections: list[tuple[int, str]] | None = None,
                 endpoints: list[tuple[int, str]] | None = None, tools: list[tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["collection_ids"].choices = list(collections or [])  # type: ignore[attr-defined]
        self.fields["tools"].choices = list(tools or [])  # type: ignore[attr-defined]
        self.fields["tool_choice"].choices = [  # type: ignore[attr-defined]
            *AgentVersion.ToolChoice.choices, *((name, f"Call {name} first") for name, _ in tools or [])]
        self.fields["endpoint_id"].choices = [("", "None (use the tier)"), *(endpoints or [])]  # type: ignore[attr-defined]
        _bootstrap(self)

    @classmethod
    def initial_from(cls, version: AgentVersion | None) -> dict[str, Any]:
        """Initial data for a form that edits ``version`` (the defaults when there is none)."""
        values = {name: getattr(version, name) for name in VERSION_FIELDS} if version else dict(VERSION_DEFAULTS)
        schema = values.get("output_schema")
        values["output_schema"] = json.dumps(schema, indent=2, sort_keys=True) if schema is not None else ""
        values["endpoint_id"] = values.get("endpoint_id") or ""
        values["tools"] = list(values.get("tools") or [])
        return values

    def clean_output_schema(self) -> dict[str, Any] | None:
        """The schema text parsed as a JSON object (None when blank); whether it is a valid JSON
        Schema is the service's question."""
        text = (self.cleaned_data.get("output_schema") or "").strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise forms.ValidationError("A JSON Schema is a JSON object.")
        return value

    def clean_tool_choice(self) -> str:
        """The choice, ``auto`` when the form left it out (a client that predates tools)."""
        return self.cleaned_data.get("tool_choice") or AgentVersion.ToolChoice.AUTO

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("output_format") == AgentVersion.OutputFormat.JSON_SCHEMA and not cleaned.get("output_schema") \
                and "output_schema" not in self.errors:
            self.add_error("output_schema", "Give the JSON Schema the answers must follow.")
        return cleaned

    def config(self) -> dict[str, Any]:
        """The cleaned fields as a version config (every key of ``VERSION_FIELDS``)."""
        config = {name: self.cleaned_data[name] for name in VERSION_FIELDS}
        # Checkboxes come back in the choices' order; keep the order the version had.
        initial = [n for n in self.initial.get("tools") or [] if n in config["tools"]]
        config["tools"] = [*initial, *(n for n in config["tools"] if n not in initial)]
        return config


class ChatSessionForm(forms.Form):
    """Open a chat: which active agent, and an optional title."""

    agent = forms.TypedChoiceField(choices=[], coerce=int)
    title = forms.CharField(required=False, max_length=200)

    def __init__(self, *args: Any, agents: list[tuple[int, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["agent"].choices = list(agents or [])  # type: ignore[attr-defined]
        _bootstrap(self)


class ChatMessageForm(forms.Form):
    """The plain-POST fallback of the chat page (the socket takes the same field)."""

    content = forms.CharField(max_length=100_000, widget=forms.Textarea(attrs={"rows": 2}))
