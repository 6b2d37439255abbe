"""The embedded model server's pieces that need no model: the ChatML prompt of a conversation with
tool calls, the schema a grammar is built from, and the request fix for ``content: null``.
(What the server answers is tested against the real model in test_local_model.py.)"""

from __future__ import annotations

import json

from agents.llm_server import assistant_content_fill, grammar_schema, render_prompt


def test_the_prompt_lists_the_tools_and_reads_calls_and_results() -> None:
    tools = [{"type": "function", "function": {"name": "create_ticket", "description": "Open a ticket."}}]
    messages = [
        {"role": "system", "content": "You are the IT helpdesk."},
        {"role": "user", "content": [{"type": "text", "text": "My screen is broken"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "create_ticket", "arguments": '{"title": "Screen"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"id": 7}'},
    ]
    assert render_prompt(messages, tools) == (
        "<|im_start|>system\nYou are the IT helpdesk.\n\nTools:\n- create_ticket: Open a ticket.<|im_end|>\n"
        "<|im_start|>user\nMy screen is broken<|im_end|>\n"
        '<|im_start|>assistant\nCalled create_ticket with {"title": "Screen"}<|im_end|>\n'
        '<|im_start|>user\nResult of create_ticket: {"id": 7}<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert render_prompt([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_grammar_schema_drops_long_bounds_and_patterns_but_keeps_the_shape() -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[A-Z]"},
            "tags": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 3},
            "priority": {"type": "string", "enum": ["low", "high"]},
            "maxLength": {"type": "integer"},
        },
        "required": ["title", "priority"],
        "additionalProperties": False,
    }
    assert grammar_schema(schema) == {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "priority": {"type": "string", "enum": ["low", "high"]},
            "maxLength": {"type": "integer"},
        },
        "required": ["title", "priority"],
        "additionalProperties": False,
    }


def test_an_assistant_message_with_null_content_is_sent_on_with_empty_content() -> None:
    body = {
        "model": "smollm2",
        "messages": [
            {"role": "user", "content": "Open a ticket"},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "tool_call_id": "c", "content": None},
        ],
    }
    filled = json.loads(assistant_content_fill(json.dumps(body).encode()))
    assert [m["content"] for m in filled["messages"]] == ["Open a ticket", "", None]
    untouched = json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}).encode()
    assert assistant_content_fill(untouched) is untouched
    assert assistant_content_fill(b"not json") == b"not json"
    assert assistant_content_fill(b"[1, 2]") == b"[1, 2]"
