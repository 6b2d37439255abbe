"""The builtin tools, one row each in every tenant schema (agents is a tenant app).

Their behaviour lives in ``agents.runtime.tools``; the rows give them ids and names that tenants'
own tools cannot take, and are never changed through the services or the API.
"""

import json

from django.db import migrations

BUILTINS = [
    {
        "name": "kb_search",
        "description": "Search the agent's knowledge base collections and return the most relevant passages "
                       "with their sources, numbered for citation.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 2000, "description": "What to search for"},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 20,
                          "description": "How many passages to return (default 5)"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
    {
        "name": "current_time",
        "description": "The current date and time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {
                "timezone": {"type": "string", "maxLength": 64,
                             "description": "An IANA time zone such as Europe/Paris (default UTC)"},
            },
            "additionalProperties": False,
        },
    },
    {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (+ - * / // % **, parentheses, decimals).",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "minLength": 1, "maxLength": 500,
                               "description": "The expression, e.g. (2 + 3) * 4 / 5"},
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# SQL, not RunPython: tenant provisioning replays tenant migrations as SQL. The values are this
# module's constants, quoted by _literal.
INSERT = "\n".join(
    "INSERT INTO agents_tool (name, description, kind, parameters, side_effect, requires_approval, "  # noqa: S608
    "timeout_seconds, "
    "max_response_bytes, method, url, headers, secret_headers_encrypted, body_template, created_by, created_at, "
    f"updated_at) VALUES ({_literal(spec['name'])}, {_literal(spec['description'])}, 'builtin', "
    f"{_literal(json.dumps(spec['parameters']))}::jsonb, 'read', false, 10.0, 65536, '', '', '{{}}'::jsonb, '', NULL, "
    "'system', now(), now()) ON CONFLICT (name) DO NOTHING;"
    for spec in BUILTINS
)
DELETE = "DELETE FROM agents_tool WHERE kind = 'builtin';"


class Migration(migrations.Migration):
    dependencies = [("agents", "0005_tools_and_approvals")]

    operations = [migrations.RunSQL(INSERT, DELETE)]
