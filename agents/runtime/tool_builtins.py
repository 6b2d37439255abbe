"""The builtin tools: ``kb_search``, ``current_time`` and ``calculator``.

They run in the calling thread, in the current (tenant) schema. ``calculator`` and
``current_time`` are bounded by construction; ``kb_search``'s statements run under a
``statement_timeout`` of the tool's remaining time.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import simpleeval
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from agents.models import Tool
from agents.runtime.tools import ToolContext, ToolOutcome
from config.errors import ValidationFailed

KB_SEARCH_DEFAULT_TOP_K = 5
# The calculator's integers stay within this many bits (about 1,200 decimal digits): enough for
# any arithmetic a person asks for, and far from what makes a power or a product slow.
CALCULATOR_MAX_INT_BITS = 4096
CALCULATOR_MAX_CHARS = 500


def builtin_execute(tool: Tool, arguments: dict[str, Any], *, context: ToolContext, started: float) -> ToolOutcome:
    """Run the builtin named ``tool.name``; an unknown name is ``tool_error``. ``started`` is the
    call's ``time.monotonic()`` start, which ``kb_search`` counts its timeout from."""
    if tool.name == "kb_search":
        return kb_search(arguments, context=context, timeout_seconds=float(tool.timeout_seconds), started=started)
    if tool.name == "current_time":
        return current_time(arguments)
    if tool.name == "calculator":
        return calculator(arguments)
    return ToolOutcome(status="error", output=f"There is no builtin tool named {tool.name}.", error_code="tool_error")


# --- kb_search --------------------------------------------------------------------------------------


def _passage(n: int, hit: Any) -> str:
    source = hit.title or "Untitled"
    if hit.page_number:
        source += f", page {hit.page_number}"
    if hit.heading_path:
        source += " — " + " > ".join(hit.heading_path)
    source = " ".join(source.split())[:300]
    return f"[{n}] {source}\n{hit.text.strip()}"


def kb_search(
    arguments: dict[str, Any], *, context: ToolContext, timeout_seconds: float, started: float
) -> ToolOutcome:
    """Search the agent's collections (``context.collection_ids``, with its retrieval mode and
    ``max_chunks_per_document``) for ``arguments["query"]``, ``top_k`` passages (default
    ``KB_SEARCH_DEFAULT_TOP_K``).

    ``output``: the passages numbered from 1 (``[n] title, page p — heading > heading`` then the
    text), or a sentence saying there is no knowledge base or no match; ``hits``: the
    ``SearchHit`` rows in that order, for citations. ``chunk_search`` records the ``kb.query``
    usage event (with the context's agent, session and turn). Its statements run under a
    ``statement_timeout`` of the time left (``tool_timeout`` past it); a query ``chunk_search``
    refuses is ``invalid_arguments``.
    """
    import time

    from knowledge.models import Collection
    from knowledge.retrieval import chunk_search

    collections = list(Collection.objects.filter(pk__in=context.collection_ids)) if context.collection_ids else []
    if not collections:
        return ToolOutcome(status="ok", output="This agent has no knowledge base to search; answer without it.")
    query = str(arguments.get("query", ""))
    top_k = arguments.get("top_k", KB_SEARCH_DEFAULT_TOP_K)
    remaining_ms = max(1, int((started + timeout_seconds - time.monotonic()) * 1000))
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            # A local setting lasts to the end of the transaction: when the caller holds one, this
            # block is only a savepoint, so the previous value is put back after the search (a
            # failed search rolls the savepoint back, and the setting with it).
            cursor.execute(
                "SELECT current_setting('statement_timeout'), set_config('statement_timeout', %s, true)",
                [f"{remaining_ms}ms"],
            )
            previous = cursor.fetchone()[0]
            hits = chunk_search(
                query=query,
                collections=collections,
                top_k=int(top_k),
                mode=context.retrieval_mode,
                max_chunks_per_document=context.max_chunks_per_document,
                agent_id=context.agent_id,
                session_id=context.session_id,
                turn_id=context.turn_id,
            )
            cursor.execute("SELECT set_config('statement_timeout', %s, true)", [previous])
    except ValidationFailed as exc:
        return ToolOutcome(
            status="error", output=f"The search was refused: {exc.message}", error_code="invalid_arguments"
        )
    except DatabaseError as exc:
        if getattr(getattr(exc, "__cause__", None), "sqlstate", None) == "57014":  # query_canceled
            return ToolOutcome(
                status="error",
                output=f"The knowledge base search did not finish within {timeout_seconds:g} s.",
                error_code="tool_timeout",
            )
        raise
    if not hits:
        return ToolOutcome(status="ok", output=f"No passages in the knowledge base match “{query[:200]}”.")
    output = "\n\n".join(_passage(n, hit) for n, hit in enumerate(hits, start=1))
    return ToolOutcome(status="ok", output=output, hits=list(hits))


# --- current_time -----------------------------------------------------------------------------------


def current_time(arguments: dict[str, Any]) -> ToolOutcome:
    """The current time in ``arguments["timezone"]`` (an IANA name; default and empty: UTC), as
    JSON text ``{"timezone", "datetime" (ISO 8601 with offset), "weekday", "utc_offset"}``. An
    unknown zone is ``invalid_arguments``."""
    name = str(arguments.get("timezone") or "UTC").strip() or "UTC"
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return ToolOutcome(
            status="error",
            output=f"Unknown time zone '{name[:64]}'; use an IANA name such as Europe/Paris or UTC.",
            error_code="invalid_arguments",
        )
    now: datetime = timezone.now().astimezone(zone)
    offset = now.strftime("%z")
    result = {
        "timezone": name,
        "datetime": now.isoformat(timespec="seconds"),
        "weekday": now.strftime("%A"),
        "utc_offset": f"{offset[:3]}:{offset[3:]}",
    }
    return ToolOutcome(status="ok", output=json.dumps(result))


# --- calculator -------------------------------------------------------------------------------------


class _TooLarge(simpleeval.NumberTooHigh):
    pass


def _bounded(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise simpleeval.InvalidExpression("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _TooLarge("The result is too large.")
    if isinstance(value, int) and value.bit_length() > CALCULATOR_MAX_INT_BITS:
        raise _TooLarge("The result is too large.")
    return value


def _checked(function: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def apply(a: Any, b: Any) -> Any:
        return _bounded(function(a, b))

    return apply


def _power(a: Any, b: Any) -> Any:
    # Refuse before computing: 9 ** 9 ** 9 would otherwise take minutes and gigabytes.
    if (
        isinstance(a, int)
        and isinstance(b, int)
        and b > 0
        and abs(a) > 1
        and (abs(a).bit_length() - 1) * b > CALCULATOR_MAX_INT_BITS
    ):
        raise _TooLarge("The result is too large.")
    return _bounded(a**b)


class _Calculator(simpleeval.SimpleEval):  # type: ignore[misc]
    """simpleeval with only numbers, parentheses and + - * / // % ** (no names, functions,
    attributes, comparisons, strings or containers), every intermediate result bounded."""

    def __init__(self) -> None:
        operators = {
            ast.Add: _checked(operator.add),
            ast.Sub: _checked(operator.sub),
            ast.Mult: _checked(operator.mul),
            ast.Div: _checked(operator.truediv),
            ast.FloorDiv: _checked(operator.floordiv),
            ast.Mod: _checked(operator.mod),
            ast.Pow: _power,
            ast.USub: lambda a: _bounded(-a),
            ast.UAdd: lambda a: _bounded(+a),
        }
        super().__init__(operators=operators, functions={}, names={})
        self.nodes = {ast.BinOp: self._eval_binop, ast.UnaryOp: self._eval_unaryop, ast.Constant: self._number}

    @staticmethod
    def _number(node: ast.Constant) -> Any:
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise simpleeval.FeatureNotAvailable(f"Only numbers are allowed, not {node.value!r:.40}.")
        return _bounded(node.value)

    def evaluate(self, expression: str) -> Any:
        tree = ast.parse(expression.strip(), mode="eval")  # one expression: no statements, no imports
        self.expr = expression
        return self._eval(tree.body)


def _shown(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    return format(value, ".15g")


def calculator(arguments: dict[str, Any]) -> ToolOutcome:
    """Evaluate ``arguments["expression"]``: numbers (integers and decimals), parentheses and
    ``+ - * / // % **``, through simpleeval's AST walker (no ``eval``), every integer within
    ``CALCULATOR_MAX_INT_BITS`` bits and every float finite. ``output``: ``"<expression> =
    <result>"`` (floats to 15 significant digits). Anything else (names, calls, attributes,
    strings, comparisons), division by zero, a result too large or an expression longer than
    ``CALCULATOR_MAX_CHARS`` is ``invalid_arguments`` with the reason."""
    expression = str(arguments.get("expression", ""))
    if not expression.strip():
        return ToolOutcome(status="error", output="The expression is empty.", error_code="invalid_arguments")
    if len(expression) > CALCULATOR_MAX_CHARS:
        return ToolOutcome(
            status="error",
            output=f"The expression is longer than {CALCULATOR_MAX_CHARS} characters.",
            error_code="invalid_arguments",
        )
    try:
        value = _Calculator().evaluate(expression)
    except ZeroDivisionError:
        reason = "division by zero"
    except (_TooLarge, OverflowError):
        reason = "the result is too large"
    except simpleeval.FeatureNotAvailable as exc:
        reason = f"only numbers and + - * / // % ** with parentheses are allowed ({str(exc)[:120]})"
    except simpleeval.InvalidExpression as exc:
        reason = str(exc)[:200].rstrip(".") or "it is not arithmetic"
    except (SyntaxError, ValueError):
        reason = "it is not a valid arithmetic expression"
    except (RecursionError, MemoryError):
        reason = "it is nested too deeply"
    else:
        return ToolOutcome(status="ok", output=f"{' '.join(expression.split())} = {_shown(value)}")
    return ToolOutcome(
        status="error", output=f"Cannot evaluate “{expression[:200]}”: {reason}.", error_code="invalid_arguments"
    )
