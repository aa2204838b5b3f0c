"""Who is asking: the principal behind a request, as the auth middleware found it from the API key.

It lives in a module of its own, importing nothing, because three layers read it: the server (admin
routes), the store (whose rows a request may see) and the engines (whose prompts may share cached
tokens). A key is kept only as its SHA-256: enough to tell keys apart, useless to anyone who reads the
database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """``hash`` is the SHA-256 (hex) of the request's key, recorded on what it creates; None when the server
    has no keys. ``admin`` may change the models and sees every principal's data; anyone else sees only
    the rows recorded with their own hash."""

    hash: str | None
    admin: bool

    @property
    def cache_scope(self) -> str:
        """Whose cached prompt tokens a request may reuse: "" (shared) for admins and a server without keys,
        the key's hash for a user key, so one user never learns from timings what another one asked."""
        return "" if self.admin else self.hash or ""


#: A server without keys: every request may do and see everything, and records no principal.
OPEN = Principal(None, admin=True)
#: A public route asked without a (valid) key on a server with keys: sees nothing that has an owner.
ANONYMOUS = Principal(None, admin=False)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
