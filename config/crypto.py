"""Encryption of secrets at rest (model endpoint API keys) with a rotatable key set.

Uses ``cryptography``'s Fernet (AES-128-CBC with HMAC-SHA256, authenticated) through
``MultiFernet``: the first key of ``FIELD_ENCRYPTION_KEYS`` encrypts, every key decrypts, and
``secret_rotate`` re-encrypts a token under the first key. Development (no keys set) derives one
key from ``SECRET_KEY`` with HKDF-SHA256 so a fresh checkout works; a system check refuses that
in production.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted with any configured key (wrong or removed key)."""


def derive_key(secret_key: str, *, purpose: bytes) -> bytes:
    """32 bytes derived from ``secret_key`` for one ``purpose`` (HKDF-SHA256, RFC 5869), so a
    development key per purpose needs no setting of its own; production sets its keys."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"agent-ops-portal", info=purpose)
    return hkdf.derive(secret_key.encode())


def _derived_key(secret_key: str) -> bytes:
    return base64.urlsafe_b64encode(derive_key(secret_key, purpose=b"field-encryption"))


@lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...], secret_key: str) -> MultiFernet:
    raw = list(keys) or [_derived_key(secret_key).decode()]
    try:
        return MultiFernet([Fernet(k.encode()) for k in raw])
    except ValueError as exc:
        raise ImproperlyConfigured(
            "FIELD_ENCRYPTION_KEYS must be comma-separated Fernet keys "
            "(make one with: python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
        ) from exc


def fernet() -> MultiFernet:
    """The configured ``MultiFernet``; raises ``ImproperlyConfigured`` for a malformed key."""
    return _fernet(tuple(settings.FIELD_ENCRYPTION_KEYS), settings.SECRET_KEY)


def secret_encrypt(plaintext: str) -> str:
    """Encrypt ``plaintext`` under the newest key; returns a URL-safe token ('' for '')."""
    if not plaintext:
        return ""
    return fernet().encrypt(plaintext.encode()).decode()


def secret_decrypt(token: str) -> str:
    """Decrypt a token made by ``secret_encrypt`` ('' for ''); raises ``SecretUnreadable``."""
    if not token:
        return ""
    try:
        return fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadable("The stored secret cannot be decrypted with FIELD_ENCRYPTION_KEYS.") from exc


def secret_rotate(token: str) -> str:
    """Re-encrypt ``token`` under the newest key; raises ``SecretUnreadable``."""
    if not token:
        return ""
    try:
        return fernet().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadable("The stored secret cannot be decrypted with FIELD_ENCRYPTION_KEYS.") from exc
