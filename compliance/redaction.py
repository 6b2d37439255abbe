"""Redaction of secrets from anything that is stored or logged (audit payloads first)."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"

# Key names are split into words (snake_case, kebab-case, camelCase); a key is secret when one
# of its words, or two adjacent words, name a secret. Whole words, so that counts such as
# ``max_tokens`` or words such as ``footprint`` and ``bypass`` are kept.
_SECRET_WORDS = frozenset({
    "password", "passwd", "passphrase", "pass", "secret", "secrets", "apikey", "authorization",
    "credential", "credentials", "cookie", "otp", "signature", "privatekey", "sessionid", "dsn",
})
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("session", "id"), ("access", "key")})
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def is_secret_key(key: str) -> bool:
    """True when the dict key ``key`` names a secret (``password``, ``api_key``, ``csrfToken``…)."""
    words = [w.lower() for w in _WORD_RE.findall(key)]
    if any(w in _SECRET_WORDS for w in words):
        return True
    # "token" is a credential as the last word (access_token, csrfToken), a count otherwise
    # (token_count, max_tokens).
    if words and words[-1] == "token":
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))
# Values that look like credentials whatever their key is called: our own API keys and
# bearer tokens.
_SECRET_VALUE_RE = re.compile(r"(\baop_[a-z0-9]+_[A-Za-z0-9_-]{20,})|(\bBearer\s+\S+)", re.IGNORECASE)


def redact(value: Any, *, key: str | None = None) -> Any:
    """Return a copy of ``value`` with secrets replaced by ``"[REDACTED]"``.

    Dict entries whose key names a secret are replaced whole; strings that contain an API
    key or a bearer token have that part replaced. Nested dicts and lists are walked.
    """
    if key is not None and is_secret_key(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, key=str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, set | frozenset):
        # Walked too (payload normalization turns sets into lists sorted the same way), so a
        # secret inside a set is not stored in clear.
        return [redact(v) for v in sorted(value, key=str)]
    if isinstance(value, str):
        return _SECRET_VALUE_RE.sub(REDACTED, value)
    return value
