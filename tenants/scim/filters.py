"""RFC 7644 §3.4.2.2 filters: parsed by ``scim2-filter-parser``, compiled here to a small tree.

The parser gives an abstract syntax tree; ``filter_parse`` flattens value filters
(``emails[type eq "work"].value eq "x"`` becomes ``emails.type eq "work" and emails.value eq
"x"``) into a tree of ``Comparison``, ``And``, ``Or`` and ``Not`` with lower-cased dotted
attribute paths. ``users_q`` turns that tree into a Django ``Q`` over ``Membership`` (so the
tenant filter, the ordering and the page stay in one SQL query); ``group_matches`` evaluates it
against one group (a role). Attributes a filter cannot name here are refused with 400
``invalidFilter`` rather than ignored: a filter that silently matched everything would make an
IdP link the wrong person.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.db.models import Q
from scim2_filter_parser import ast as scim_ast
from scim2_filter_parser.lexer import SCIMLexer
from scim2_filter_parser.parser import SCIMParser, SCIMParserError

from tenants.scim.errors import ScimError

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
# RFC 7644 §3.4.2.2 operators; ``pr`` has no value.
OPERATORS = frozenset({"eq", "ne", "co", "sw", "ew", "pr", "gt", "ge", "lt", "le"})
MAX_FILTER_LENGTH = 2000


@dataclass(frozen=True)
class Comparison:
    """``path op value``: ``path`` lower-cased and dotted (``emails.value``); ``value`` is a
    string, ``True``/``False``, ``None`` (the literal null, or no value for ``pr``)."""

    path: str
    op: str
    value: str | bool | None


@dataclass(frozen=True)
class And:
    left: Node
    right: Node


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    node: Node


Node = Comparison | And | Or | Not


def _invalid(detail: str) -> ScimError:
    return ScimError(400, detail, scim_type="invalidFilter")


def _path(attr: scim_ast.AttrPath, prefix: str, schema: str) -> str:
    if attr.uri and attr.uri.lower() != schema.lower():
        raise _invalid(f"The filter names the schema '{attr.uri}'; this resource has only '{schema}'.")
    name = str(attr.attr_name)
    if attr.sub_attr is not None:
        name = f"{name}.{attr.sub_attr.value}"
    return f"{prefix}.{name}".lower() if prefix else name.lower()


def _value(comp: scim_ast.CompValue | None) -> str | bool | None:
    if comp is None:
        return None
    literal = {"true": True, "false": False, "null": None}
    raw = str(comp.value)
    return literal.get(raw, raw)


def _compile(node: scim_ast.AST, prefix: str, schema: str) -> Node:
    if isinstance(node, scim_ast.Filter):
        if node.namespace is not None:
            inner_prefix = _path(node.namespace, prefix, schema)
            compiled = _compile(node.expr, inner_prefix, schema)
        else:
            compiled = _compile(node.expr, prefix, schema)
        return Not(compiled) if node.negated else compiled
    if isinstance(node, scim_ast.LogExpr):
        left, right = _compile(node.expr1, prefix, schema), _compile(node.expr2, prefix, schema)
        return And(left, right) if node.op.lower() == "and" else Or(left, right)
    if isinstance(node, scim_ast.AttrExpr):
        op = str(node.value).lower()
        if op not in OPERATORS:
            raise _invalid(f"Unknown operator '{node.value}'.")
        attr = node.attr_path
        if isinstance(attr.attr_name, scim_ast.Filter):
            # emails[type eq "work"].value eq "x": the bracketed filter, and the comparison of the
            # sub-attribute after the bracket, both on the same multi-valued attribute.
            value_filter = attr.attr_name
            namespace = value_filter.namespace
            base = _path(scim_ast.AttrPath(namespace.attr_name, None, namespace.uri), prefix, schema)
            selected = _compile(value_filter.expr, base, schema)
            if value_filter.negated:
                selected = Not(selected)
            target = _path(namespace, prefix, schema)
            return And(selected, Comparison(target, op, _value(node.comp_value)))
        return Comparison(_path(attr, prefix, schema), op, _value(node.comp_value))
    raise _invalid("The filter could not be read.")


def filter_parse(text: str, *, schema: str) -> Node:
    """Parse an RFC 7644 filter (``userName eq "x" and active eq true``) into a tree.

    ``schema`` is the resource's core schema URI (an attribute may be prefixed with it).
    Raises ``ScimError`` 400 ``invalidFilter`` for text that is not a filter, is longer than
    ``MAX_FILTER_LENGTH`` characters, or names another schema.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise _invalid(f"A filter is at most {MAX_FILTER_LENGTH} characters.")
    try:
        tree = SCIMParser().parse(SCIMLexer().tokenize(text))
    except (SCIMParserError, ValueError, IndexError) as exc:
        raise _invalid(f"The filter is not valid SCIM filter syntax (RFC 7644 §3.4.2.2): {exc}") from exc
    if tree is None:
        raise _invalid("The filter is empty.")
    return _compile(tree, "", schema)


_TEXT_LOOKUPS = {"eq": "exact", "co": "contains", "sw": "startswith", "ew": "endswith"}
_ORDER_LOOKUPS = {"gt": "gt", "ge": "gte", "lt": "lt", "le": "lte"}
_NOTHING = Q(pk__in=[])
# Not Q(): ~Q() matches everything too, so "not (active eq true)" would match all.
_ALL = Q(pk__isnull=False)


def _text_q(field: str, c: Comparison, *, case_exact: bool) -> Q:
    present = Q(**{f"{field}__isnull": False}) & ~Q(**{field: ""})
    if c.op == "pr":
        return present
    if c.value is None and c.op in {"eq", "ne"}:  # "externalId eq null": not present
        return ~present if c.op == "eq" else present
    op = "eq" if c.op == "ne" else c.op
    if op not in _TEXT_LOOKUPS or not isinstance(c.value, str):
        raise _invalid(f"'{c.path} {c.op}' takes a string value and one of eq, ne, co, sw, ew, pr.")
    lookup = _TEXT_LOOKUPS[op] if case_exact else f"i{_TEXT_LOOKUPS[op]}"
    q = Q(**{f"{field}__{lookup}": c.value})
    return ~q if c.op == "ne" else q


def _constant(c: Comparison, truth: Callable[[str | bool | None], bool]) -> Q:
    """A comparison with the one value every user has (``active``, ``emails.type``)."""
    if c.op == "pr":
        return _ALL
    if c.op not in {"eq", "ne"}:
        raise _invalid(f"'{c.path}' takes eq, ne or pr.")
    return _ALL if truth(c.value) == (c.op == "eq") else _NOTHING


def _user_leaf(c: Comparison) -> Q:
    path = c.path
    if path in {"username", "emails", "emails.value"}:
        return _text_q("user__email", c, case_exact=False)
    if path == "externalid":
        return _text_q("scim_external_id", c, case_exact=True)
    if path in {"displayname", "name.formatted"}:
        return _text_q("user__name", c, case_exact=False)
    if path == "id":
        if c.op not in {"eq", "ne"} or not isinstance(c.value, str):
            raise _invalid("'id' takes eq or ne and a string.")
        try:
            q = Q(scim_id=uuid.UUID(c.value))
        except ValueError:
            q = _NOTHING
        return ~q if c.op == "ne" else q
    if path == "active":
        return _constant(c, lambda v: v is True or (isinstance(v, str) and v.lower() == "true"))
    if path == "emails.type":
        return _constant(c, lambda v: isinstance(v, str) and v.lower() == "work")
    if path == "emails.primary":
        return _constant(c, lambda v: v is True)
    if path == "meta.created":
        if c.op not in _ORDER_LOOKUPS or not isinstance(c.value, str):
            raise _invalid("'meta.created' takes gt, ge, lt or le and a date-time.")
        try:
            when = dt.datetime.fromisoformat(c.value)
        except ValueError as exc:
            raise _invalid(f"'{c.value}' is not an ISO 8601 date-time.") from exc
        if when.tzinfo is None:
            raise _invalid("A date-time in a filter needs a time zone (e.g. 2026-01-31T00:00:00Z).")
        return Q(**{f"created_at__{_ORDER_LOOKUPS[c.op]}": when})
    raise _invalid(f"Users cannot be filtered on '{c.path}'. Filter on userName, externalId, id, emails, "
                   "displayName, active or meta.created.")


def users_q(node: Node) -> Q:
    """A ``Q`` over ``Membership`` for a parsed user filter. ``userName`` and ``emails`` compare
    case-insensitively, ``externalId`` exactly (RFC 7643 §4.1.1, §3.1). Raises ``ScimError``
    400 ``invalidFilter`` for an attribute or operator it cannot compare."""
    if isinstance(node, And):
        return users_q(node.left) & users_q(node.right)
    if isinstance(node, Or):
        return users_q(node.left) | users_q(node.right)
    if isinstance(node, Not):
        return ~users_q(node.node)
    return _user_leaf(node)


@dataclass(frozen=True)
class GroupFacts:
    """What a group filter can ask about one group: its id, display name and a way to learn
    whether a user id is among its members (called only when the filter asks)."""

    id: str
    display_name: str
    has_member: Callable[[str], bool]


def _group_text(actual: str, c: Comparison) -> bool:
    if c.op == "pr":
        return bool(actual)
    if not isinstance(c.value, str) or c.op not in {"eq", "ne", "co", "sw", "ew"}:
        raise _invalid(f"'{c.path}' takes a string value and one of eq, ne, co, sw, ew, pr.")
    a, v = actual.lower(), c.value.lower()
    result = {"eq": a == v, "ne": a != v, "co": v in a, "sw": a.startswith(v), "ew": a.endswith(v)}
    return result[c.op]


def group_matches(node: Node, group: GroupFacts) -> bool:
    """True when ``group`` satisfies the parsed filter ``node``. ``displayName`` and ``id``
    compare case-insensitively; ``members`` / ``members.value`` take eq with a user id. Raises
    ``ScimError`` 400 ``invalidFilter`` for anything else."""
    if isinstance(node, And):
        return group_matches(node.left, group) and group_matches(node.right, group)
    if isinstance(node, Or):
        return group_matches(node.left, group) or group_matches(node.right, group)
    if isinstance(node, Not):
        return not group_matches(node.node, group)
    if node.path == "displayname":
        return _group_text(group.display_name, node)
    if node.path == "id":
        return _group_text(group.id, node)
    if node.path in {"members", "members.value"}:
        if node.op not in {"eq", "ne"} or not isinstance(node.value, str):
            raise _invalid("'members.value' takes eq or ne and a user id.")
        return group.has_member(node.value) == (node.op == "eq")
    if node.path == "externalid":
        return node.op == "ne" if node.op != "pr" else False
    raise _invalid(f"Groups cannot be filtered on '{node.path}'. Filter on displayName, id or members.value.")
