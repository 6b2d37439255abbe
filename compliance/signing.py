"""The keys that sign the audit chain (``AUDIT_SIGNING_KEYS``), kept outside the database.

Each entry of ``AUDIT_SIGNING_KEYS`` (comma-separated, newest first) is a secret string used as
an HMAC-SHA256 key: the first signs new audit events and checkpoints, every entry verifies, so a
key is rotated by putting a new one in front and keeping the old ones behind it for as long as
the events they signed are kept. Each event and checkpoint records the *key id* that signed it:
a 16-hex-digit fingerprint, HMAC-SHA256(key, "audit-signing-key-id"), which names the key without
revealing it. Development (no keys set) derives one key from ``SECRET_KEY`` with HKDF-SHA256, as
``config.crypto`` does for ``FIELD_ENCRYPTION_KEYS``; production refuses to sign without keys
(and the system check ``compliance.E001`` says so at deploy time).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from config.crypto import derive_key

#: Shortest accepted key, in characters: 32 is the HMAC-SHA256 block-size guidance of RFC 2104
#: section 3 (keys shorter than the 32-byte output weaken it).
MIN_KEY_LENGTH = 32
KEY_ID_LENGTH = 16


def key_id_of(secret: bytes) -> str:
    """The fingerprint that names ``secret`` in stored rows: 16 lowercase hex digits."""
    return hmac.new(secret, b"audit-signing-key-id", hashlib.sha256).hexdigest()[:KEY_ID_LENGTH]


@dataclass(frozen=True)
class Keyring:
    """Signing keys, newest first, as ``(key_id, secret)`` pairs."""

    keys: tuple[tuple[str, bytes], ...]

    @property
    def current(self) -> tuple[str, bytes]:
        """The ``(key_id, secret)`` that signs new events and checkpoints."""
        return self.keys[0]

    def get(self, key_id: str) -> bytes | None:
        """The secret named ``key_id``, or ``None`` when no configured key has that id."""
        for candidate, secret in self.keys:
            if hmac.compare_digest(candidate, key_id):
                return secret
        return None


@lru_cache(maxsize=4)
def _keyring(keys: tuple[str, ...], secret_key: str, development: bool) -> Keyring:
    if not keys:
        if not development:
            raise ImproperlyConfigured("AUDIT_SIGNING_KEYS (or AUDIT_SIGNING_KEYS_FILE) is required in production: "
                                       "the audit chain is signed with it.")
        secrets = [derive_key(secret_key, purpose=b"audit-signing")]
    else:
        secrets = [key.encode() for key in keys]
    return Keyring(tuple((key_id_of(secret), secret) for secret in secrets))


def keyring() -> Keyring:
    """The configured keyring; raises ``ImproperlyConfigured`` in production without keys."""
    return _keyring(tuple(settings.AUDIT_SIGNING_KEYS), settings.SECRET_KEY, settings.DEVELOPMENT)
