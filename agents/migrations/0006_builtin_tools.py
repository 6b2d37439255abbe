"""The builtin tools, one row each in every tenant schema (agents is a tenant app).

Their behaviour lives in ``agents.runtime.tools``; the rows give them ids and names that tenants'
own tools cannot take, and are never changed through the services or the API.
"""

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


def create_builtins(apps, schema_editor):
    Tool = apps.get_model("agents", "Tool")
    for spec in BUILTINS:
        Tool.objects.update_or_create(name=spec["name"], defaults={
            **spec, "kind": "builtin", "side_effect": "read", "requires_approval": False,
            "timeout_seconds": 10.0, "max_response_bytes": 65536, "created_by": "system"})


def remove_builtins(apps, schema_editor):
    apps.get_model("agents", "Tool").objects.filter(kind="builtin").delete()


class Migration(migrations.Migration):
    dependencies = [("agents", "0005_tools_and_approvals")]

    operations = [migrations.RunPython(create_builtins, remove_builtins)]
