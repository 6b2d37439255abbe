"""Text that PostgreSQL cannot store: the NUL character and unpaired UTF-16 surrogates.

PostgreSQL refuses NUL in ``text``/``varchar`` and ``\\u0000`` in ``jsonb`` (a ``DataError``), and a
lone surrogate (JSON ``"\\ud800"`` decodes to one) cannot be encoded as UTF-8 at all, so either
reaching a query was a 500. The REST API refuses them in every JSON body and query string
(``config.api``); services check the fields they store, so the console and the chat socket,
which call the same services, refuse them too.
"""

from __future__ import annotations

import re
from typing import Any

from config.errors import ValidationFailed

# NUL, and the surrogate range: a str holds these only as unpaired halves (a valid pair decodes
# to one code point above U+FFFF).
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")

INVALID_CHARACTERS = "invalid_characters"


def unstorable_path(value: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """The location of the first string in ``value`` (a str, or JSON-shaped lists and dicts, keys
    included) holding a NUL or an unpaired surrogate, as a path of keys and indexes; ``None`` when
    every string can be stored."""
    if isinstance(value, str):
        return path if _UNSTORABLE_RE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _UNSTORABLE_RE.search(key):
                return (*path, key)
            found = unstorable_path(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = unstorable_path(item, (*path, index))
            if found is not None:
                return found
    return None


def require_storable(value: Any, *, field: str) -> None:
    """Raise ``ValidationFailed`` (code ``invalid_characters``, ``details.field``) when ``value``
    (a str or a JSON-shaped structure) holds a NUL character or an unpaired surrogate."""
    found = unstorable_path(value)
    if found is not None:
        loc = ".".join(str(p) for p in (field, *found))
        raise ValidationFailed(f"{loc} contains a NUL character or an unpaired surrogate, which cannot be stored.",
                               code=INVALID_CHARACTERS, details={"field": loc})


def strip_unstorable(value: str) -> str:
    """``value`` without NUL characters and unpaired surrogates (for names we may tidy, such as an
    upload's filename, rather than refuse)."""
    return _UNSTORABLE_RE.sub("", value)
