"""Who may ask what: the Host allowlist, the Origin check, and principals from admin and user keys.

Why each check (``middlewares.access_middleware`` runs them, in this order, on every request):

- Host, when no keys are set. The API is then open, so a page on any site could reach
  ``http://127.0.0.1:8080`` through its visitor's browser by DNS rebinding: a name of the attacker's that
  resolves to 127.0.0.1 makes the page's requests same-origin for the browser, which then lets it read the
  answers. Those requests carry the attacker's name in ``Host``, so only the names the server is bound to
  or told about (``--allowed-hosts``) are answered: Ollama's fix for CVE-2024-28224. With keys, a request
  needs one, which such a page does not have. The health probes are exempt: orchestrators send the pod's
  address as Host, and the probes change nothing.
- Origin, keys or not. A browser sends a form or multipart POST to any site without asking first (no CORS
  preflight), and the page need not read the answer to have done its harm (a model reload, an upload).
  A POST, PUT, PATCH or DELETE whose ``Origin`` is neither this server's own nor one ``--cors-allow-origins``
  names is refused. Requests without ``Origin`` (curl, the SDKs) are not sent by web pages.
- Keys. Admin keys may do everything; user keys may not change the models or read /metrics (routes marked
  ``admin_only``) and see only what they made (``principal.Principal``). With only ``--api-keys``, every key
  is an admin, as before admin keys existed.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from localai_aio.errors import HostNotAllowed, OriginNotAllowed
from localai_aio.principal import OPEN, Principal, key_hash

if TYPE_CHECKING:
    from localai_aio.config import ServerSettings

T = TypeVar("T")

#: Set on handlers only admin keys may call (see ``admin_only``).
ADMIN_ONLY = "__localai_admin_only__"
#: The methods a page must not send from another site.
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Paths answered whatever the Host: health probes.
ANY_HOST_PATHS = frozenset({"/healthz", "/readyz"})
ANY = "*"
#: What ``--address`` names when it listens on every interface: not a name clients send.
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})
DEFAULT_PORTS = {"http": 80, "https": 443}


def admin_only(handler: T) -> T:
    """Mark a route that changes the models or shows the whole server (the access middleware refuses it
    to user keys with 403)."""
    setattr(handler, ADMIN_ONLY, True)
    return handler


def _split(authority: str, default_port: int | None = None) -> tuple[str, int | None]:
    """(name, port) of a Host header or a URL's authority: lower case, without brackets or a final dot."""
    try:
        parts = urlsplit("//" + authority.strip())
        return (parts.hostname or "").rstrip("."), parts.port or default_port
    except ValueError:  # a port that is not a number
        return "", None


def _origin(value: str) -> tuple[str, str, int | None] | None:
    """An origin (``https://host[:port]``) as (scheme, name, port), the default port made explicit; None
    for what is not one (``null``, from sandboxed frames and files)."""
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return None
    name, port = _split(parts.netloc, DEFAULT_PORTS[scheme])
    return (scheme, name, port) if name else None


def _matches(key: str, allowed: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key (no early exit on the first match)."""
    found = False
    for candidate in allowed:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


@dataclass(frozen=True)
class AccessPolicy:
    """The settings' answer to "may this request go on, and who is asking", built once per app."""

    admin_keys: tuple[str, ...]
    user_keys: tuple[str, ...]
    hosts: frozenset[str]  # names answered without keys (loopback addresses always are); ANY: every name
    origins: frozenset[tuple[str, str, int | None]]  # other sites' origins allowed to change state
    any_origin: bool
    listens_everywhere: bool

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> AccessPolicy:
        admins = settings.admin_api_keys or settings.api_keys
        users = tuple(key for key in settings.api_keys if key not in admins)
        bound = _split(settings.host)[0]
        hosts = {"localhost", bound, *(ANY if name.strip() == ANY else _split(name)[0]
                                       for name in settings.allowed_hosts)}
        origins = {_origin(value) for value in settings.cross_origins if value != ANY}
        if settings.base_url:
            hosts.add(_split(urlsplit(settings.base_url).netloc)[0])
            origins.add(_origin(settings.base_url))
        return cls(admins, users, frozenset(hosts - EVERY_INTERFACE), frozenset(origins - {None}),
                   ANY in settings.cross_origins, bound in EVERY_INTERFACE)

    @property
    def keyed(self) -> bool:
        return bool(self.admin_keys)

    def identify(self, key: str | None) -> Principal | None:
        """Who ``key`` stands for: everyone is ``OPEN`` on a server without keys; None for a missing or
        unknown key on one with keys."""
        if not self.keyed:
            return OPEN
        if key is None:
            return None
        admin, user = _matches(key, self.admin_keys), _matches(key, self.user_keys)
        return Principal(key_hash(key), admin) if admin or user else None

    def check_host(self, path: str, host: str | None) -> None:
        """Without keys, refuse a Host that names none of this server's names (a missing Host is no
        browser's: they always send one)."""
        if self.keyed or ANY in self.hosts or path in ANY_HOST_PATHS or not host:
            return
        name = _split(host)[0]
        if name in self.hosts:
            return
        try:
            if ipaddress.ip_address(name).is_loopback:
                return
        except ValueError:
            pass
        hint = (" It listens on every interface: list the names clients use to reach it with --allowed-hosts."
                if self.listens_everywhere else "")
        raise HostNotAllowed(f"Host '{name}' is not served: without API keys this server answers only for "
                             f"{', '.join(sorted(self.hosts))} and loopback addresses, so that web pages on other "
                             f"sites cannot reach it through a browser. Add the name with --allowed-hosts "
                             f"(environment LOCALAI_ALLOWED_HOSTS), or set API keys.{hint}")

    def check_origin(self, method: str, origin: str | None, own: Iterable[str | None]) -> None:
        """Refuse a state-changing request from another site's page: its ``Origin`` must be this server
        (one of ``own``, the authorities the request names it by, or ``--base-url``) or an allowed origin."""
        if method not in STATE_CHANGING or origin is None or self.any_origin:
            return
        parsed = _origin(origin)
        if parsed is not None:
            scheme, name, port = parsed
            if parsed in self.origins or any(
                    authority and _split(authority, DEFAULT_PORTS[scheme]) == (name, port) for authority in own):
                return
        raise OriginNotAllowed(f"A web page of {origin} may not send {method} requests to this server. Name its "
                               f"origin with --cors-allow-origins (environment LOCALAI_CORS_ALLOW_ORIGINS) to allow "
                               f"it; behind a proxy that changes the Host header, set --base-url to the server's "
                               f"public URL.")
