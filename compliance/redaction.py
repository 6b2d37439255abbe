"""Redaction of secrets from anything that is stored or logged (audit payloads first)."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"

# Keys whose values are secrets, matched case-insensitively anywhere in the key name.
_SECRET_KEY_RE = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api[_-]?key|authorization|credential|private[_-]?key|"
    r"cookie|session[_-]?id|otp|signature)",
    re.IGNORECASE,
)
# Values that look like credentials whatever their key is called: our own API keys and
# bearer tokens.
_SECRET_VALUE_RE = re.compile(r"(\baop_[a-z0-9]+_[A-Za-z0-9_-]{20,})|(\bBearer\s+\S+)", re.IGNORECASE)


def redact(value: Any, *, key: str | None = None) -> Any:
    """Return a copy of ``value`` with secrets replaced by ``"[REDACTED]"``.

    Dict entries whose key names a secret are replaced whole; strings that contain an API
    key or a bearer token have that part replaced. Nested dicts and lists are walked.
    """
    if key is not None and _SECRET_KEY_RE.search(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, key=str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SECRET_VALUE_RE.sub(REDACTED, value)
    return value
