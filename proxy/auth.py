"""The three credentials (issue 11) and who may call what.

- **User API keys** (`--api-keys`, `TURBOFLEET_API_KEYS`, `--api-keys-file`): the inference routes. Each key
  belongs to a tenant (see tenants.py); the file is re-read on SIGHUP.
- **Admin token** (`--admin-token`, `TURBOFLEET_ADMIN_TOKEN`): every `/nodes/*` call, fleet details
  (`/nodes/status`, `/admin/fleet`: the dashboard's data), `terminate*`.
- **Worker token** (`--worker-token`, `TURBOFLEET_WORKER_TOKEN`): what an agent does for its own worker:
  `/nodes/add`, `/heartbeat`, `/state`, `/drain`, `/remove`, and a reduced `/nodes/status` (url -> state and
  in-flight count, which the agent's drain waits on). Never terminate, never the fleet's details.

Always open: `/health` and `/metrics` (probes and scrapers carry no credentials; neither shows a key, and
`/metrics` labels tenants by name only), `/openapi.json`, and the dashboard's static page (`/`, `/status`,
`/status/*`: no data in it; it asks for the admin token to read `/admin/fleet`).

Safe by default: with no admin token the node API takes writes only from callers inside `--allow-nodes` and
refuses `terminate*`; `--insecure-open-admin` restores LMDeploy's open node API.

Credentials are compared by their SHA-256 digests (a dict lookup: the time taken says nothing about how much
of a guess matched), are never logged, and never appear in an error body.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from enum import Enum

from aiohttp import web

from .errors import BadRequest, Forbidden, Unauthorized

log = logging.getLogger("turbofleet.auth")


class Role(Enum):
    NONE = "none"
    USER = "user"
    WORKER = "worker"
    ADMIN = "admin"


#: node API routes the worker token may call (the agent's lifecycle)
WORKER_ROUTES = frozenset({"/nodes/add", "/nodes/heartbeat", "/nodes/state", "/nodes/drain", "/nodes/remove",
                           "/nodes/status"})
#: routes that show the fleet (worker URLs, labels, GPU facts): admin-only once an admin token is set (the
#: dashboard page at /status is static and holds no fleet data; it reads /admin/fleet with the token it is given)
FLEET_VIEWS = frozenset({"/nodes/status", "/admin/fleet"})
#: routes anyone may call, with or without credentials
OPEN_ROUTES = frozenset({"/health", "/metrics", "/openapi.json"})


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def key_id(secret: str) -> str:
    """A short, non-secret name of a key for logs: 8 hex digits of its SHA-256 (not enough to guess it)."""
    return "k-" + digest(secret).hex()[:8]


def valid_secret(secret: str) -> bool:
    """A credential is printable ASCII without spaces (RFC 6750's token68 and then some)."""
    return bool(secret) and len(secret) <= 512 and all(0x21 <= ord(c) <= 0x7E for c in secret)


class BadCredential(ValueError):
    """A configured credential that cannot be sent in a header; the message names where, never the value."""


def check_secret(secret: str, where: str) -> str:
    if not valid_secret(secret):
        raise BadCredential(f"{where}: a credential must be 1-512 printable ASCII characters without spaces")
    return secret


def bearer(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme in any case); None when there is no header.
    A header in any other form is a 401: `Authorization: k1` is not accepted as a key."""
    raw = request.headers.get("Authorization")
    if raw is None:
        return None
    scheme, _, token = raw.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not valid_secret(token):
        # never echo what was sent: it may be a real key with a typo, or bytes no client should see
        raise Unauthorized("Malformed Authorization header. Send `Authorization: Bearer <key>`.")
    return token


@dataclass(frozen=True, slots=True)
class Secrets:
    """The admin and worker tokens as digests (the user keys live in the tenant table)."""

    admin: bytes | None
    worker: bytes | None

    @classmethod
    def of(cls, admin: str | None, worker: str | None) -> Secrets:
        return cls(digest(check_secret(admin, "--admin-token")) if admin else None,
                   digest(check_secret(worker, "--worker-token")) if worker else None)

    def role_of(self, token: str | None) -> Role:
        if token is None:
            return Role.NONE
        d = digest(token)
        if self.admin is not None and d == self.admin:
            return Role.ADMIN
        if self.worker is not None and d == self.worker:
            return Role.WORKER
        return Role.USER  # maybe a user key, maybe a guess: either way no node-API rights


def node_access(secrets: Secrets, path: str, method: str, token: str | None, *, open_admin: bool) -> Role:
    """Who the caller is on a node-API or fleet route, or a 401/403. Pure: decides from what it is given."""
    role = secrets.role_of(token)
    if open_admin:
        return Role.ADMIN
    if role is Role.ADMIN:
        return role
    if secrets.admin is not None:
        # an admin token is set: fleet details and admin calls need it; agent calls need it or the worker token
        if role is Role.WORKER and path in WORKER_ROUTES:
            return role
        if token is None:
            raise Unauthorized("This route needs `Authorization: Bearer <admin token>`.")
        raise Forbidden("The credentials given are not allowed to do this.")
    # no admin token: LMDeploy-compatible registration from allowed addresses, but never terminate*
    if path.startswith("/nodes/terminate"):
        raise Forbidden("terminate and terminate_all need an admin token (--admin-token); "
                        "or start the proxy with --insecure-open-admin.", code="admin_token_required")
    if secrets.worker is not None and path in WORKER_ROUTES and not (path == "/nodes/status" and method == "GET"):
        if role is Role.WORKER:
            return role
        if token is None:
            raise Unauthorized("This route needs `Authorization: Bearer <worker token>`.")
        raise Forbidden("The credentials given are not allowed to do this.")
    return Role.ADMIN if path in FLEET_VIEWS else role


def header_text_ok(value: str) -> bool:
    """A header value the proxy can read and forward: latin-1 without control bytes. aiohttp decodes bytes
    that are not UTF-8 as surrogates, which would blow up at the first `.encode()`."""
    return _NOT_HEADER_TEXT.search(value) is None


#: anything but tab, printable ASCII and latin-1's upper half (one C scan instead of a Python loop per char)
_NOT_HEADER_TEXT = re.compile(r"[^\t\x20-\x7e\x80-\xff]")


#: headers the proxy reads or forwards: each must be readable as latin-1 text
CHECKED_HEADERS = ("Content-Type", "Authorization", "Via", "X-Session-ID")


def check_headers(request: web.Request, names: tuple[str, ...] = CHECKED_HEADERS) -> None:
    for name in names:
        value = request.headers.get(name)
        if value is not None and not header_text_ok(value):
            if name == "Authorization":
                raise Unauthorized("Malformed Authorization header. Send `Authorization: Bearer <key>`.")
            raise BadRequest(f"The {name} header holds bytes that are not allowed.")
