"""The node API's SSRF guard (issue 11): which addresses may register, which URLs may be registered.

LMDeploy's proxy accepts any http(s) URL from anyone, health-checks it forever and forwards prompts and the
client's credentials to it: a port scanner and a fleet hijack in one. Here a worker URL must
- be plain `http(s)://host[:port]` (no userinfo, path, query or fragment),
- resolve only to addresses inside `--allow-nodes` (default: loopback and the RFC 1918 / ULA private ranges;
  link-local, which holds cloud metadata services, stays out),
- not be one of the proxy's own listeners (a self-registration loops the proxy into itself),
and the caller must itself come from an allowed address. `--insecure-open-admin` lifts all of it.

Decisions are plain functions over addresses (`Allowlist.allows`, `check_url_shape`); the only I/O is the
name lookup in `resolve`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from .errors import BadRequest, Forbidden

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: loopback + private ranges (RFC 1918, RFC 4193 ULA); not link-local (169.254/16 holds metadata services)
DEFAULT_ALLOW_NODES = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
UNSPECIFIED_HOSTS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Networks and host names allowed on the node API. A name listed is allowed as a URL host as written
    (it is the operator's own name); any other name is allowed only when all its addresses are."""

    networks: tuple[IPNetwork, ...]
    hosts: frozenset[str]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        nets: list[IPNetwork] = []
        hosts: set[str] = set()
        for raw in entries:
            for entry in raw.replace(",", " ").split():
                try:
                    nets.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    hosts.add(entry.lower().rstrip("."))
        return cls(tuple(nets), frozenset(hosts))

    def allows_address(self, addr: IPAddress) -> bool:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def allows_remote(self, remote: str | None) -> bool:
        """The caller's address (request.remote): an IP, or None for a UNIX socket (allowed: local)."""
        if remote is None:
            return True
        try:
            return self.allows_address(ipaddress.ip_address(remote.split("%", 1)[0]))
        except ValueError:
            return False


def check_url_shape(raw: str) -> SplitResult:
    """The parsed URL, or a 400 for anything but `http(s)://host[:port]` (the message never echoes it)."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
        raise BadRequest("`url` holds spaces or control characters.", param="url")
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw.rstrip("/"))
        parts.port  # noqa: B018 - raises ValueError on a malformed port
        host = parts.hostname
    except ValueError:
        raise BadRequest("`url` is not a valid http(s) URL (bad host or port).", param="url") from None
    if parts.scheme not in ("http", "https") or host is None:
        raise BadRequest("`url` must be an http(s) URL with a host.", param="url")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise BadRequest("`url` must not carry credentials (`name:secret@`); give workers an API key through "
                         "--worker-api-key instead.", param="url")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise BadRequest("`url` must be scheme://host[:port], without a path, query or fragment.", param="url")
    return parts


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(2.0):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return []
    out: list[IPAddress] = []
    for info in infos:
        try:
            out.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return out


def is_local(addr: IPAddress, own: Iterable[str]) -> bool:
    """An address of this host as far as the proxy knows: loopback, unspecified, or a listener address."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_unspecified or str(addr) in set(own)


async def check_target(allow: Allowlist, parts: SplitResult, own_port: int | None, own_hosts: Iterable[str]) -> None:
    """403 when the URL's host is outside the allowlist or is the proxy itself."""
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addrs = await resolve(host, port)
    listed = host in allow.hosts
    if not listed and (not addrs or not all(allow.allows_address(a) for a in addrs)):
        # the same answer for "unresolvable" and "outside": the caller learns nothing about the network
        raise Forbidden("`url` is outside the addresses this proxy may send to (--allow-nodes).",
                        code="node_not_allowed", param="url")
    if own_port is not None and port == own_port and any(is_local(a, own_hosts) for a in addrs):
        raise Forbidden("`url` is this proxy's own listener; a proxy cannot be its own worker.",
                        code="node_is_proxy", param="url")
