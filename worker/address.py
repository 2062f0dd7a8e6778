"""Which URL the agent probes its server at, and which URL it tells the proxy (never `0.0.0.0`).

Everything here is a plain function of its arguments except `detect_routable_ip`, which asks the kernel for
the source address it would use; the agent calls it once and hands the result in.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

#: hosts that mean "every interface": fine to bind, useless to tell anyone
UNSPECIFIED_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})

#: (host flag, port flag, default host, default port) per kind of server command
_LMDEPLOY = ("--server-name", "--server-port", "0.0.0.0", 23333)
_GENERIC = ("--host", "--port", "127.0.0.1", 23333)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a server listens: scheme, host as given (maybe unspecified) and port."""

    host: str
    port: int
    scheme: str = "http"


class AddressError(ValueError):
    """The server's address cannot be worked out from what was given."""


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The last value of `flag` in argv (`--flag V` or `--flag=V`), or None."""
    found: str | None = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


def endpoint_from_command(argv: Sequence[str]) -> Endpoint:
    """The address a server command will listen on.

    `lmdeploy serve api_server` takes `--server-name` (default 0.0.0.0) and `--server-port` (default 23333);
    `turbofleet sim-worker` and most others take `--host`/`--port`.
    """
    if any(a in ("api_server", "lmdeploy") or a.endswith("/lmdeploy") for a in argv):
        host_flag, port_flag, host, port = _LMDEPLOY
    else:
        host_flag, port_flag, host, port = _GENERIC
    given_host = _flag_value(argv, host_flag)
    given_port = _flag_value(argv, port_flag)
    if given_port is not None:
        try:
            port = int(given_port)
        except ValueError as e:
            raise AddressError(f"{port_flag} {given_port!r} is not a port number") from e
    return Endpoint(host=given_host if given_host is not None else host, port=port)


def endpoint_from_url(url: str) -> Endpoint:
    """An attach URL such as `http://0.0.0.0:23333` as an Endpoint (port defaults by scheme)."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as e:
        raise AddressError(f"{url!r} has a bad port") from e
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        raise AddressError(f"{url!r} is not an http(s) URL")
    return Endpoint(host=parts.hostname, port=port or (443 if parts.scheme == "https" else 80), scheme=parts.scheme)


def is_unspecified(host: str) -> bool:
    return host.strip("[]") in {h.strip("[]") for h in UNSPECIFIED_HOSTS}


def _netloc(host: str, port: int) -> str:
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a DNS name
    return f"{host}:{port}"


def url_of(ep: Endpoint, host: str | None = None) -> str:
    return f"{ep.scheme}://{_netloc(host or ep.host, ep.port)}"


def probe_url(ep: Endpoint) -> str:
    """Where the agent itself reaches the server: a wildcard bind is reachable on loopback."""
    if is_unspecified(ep.host):
        return url_of(ep, "::1" if ep.host.strip("[]") == "::" else "127.0.0.1")
    return url_of(ep)


def advertise_url(
    ep: Endpoint, explicit: str | None = None, env: Mapping[str, str] | None = None, detected_ip: str | None = None
) -> str:
    """The URL the proxy should use for this server.

    Order: `explicit` (--advertise-url) as given; else the server's own host when it is a real address; else,
    for a wildcard bind, the pod IP from `POD_IP` (Kubernetes downward API), then `detected_ip`, then
    127.0.0.1. The result never names an unspecified host.
    """
    if explicit:
        given = endpoint_from_url(explicit)
        if is_unspecified(given.host):
            raise AddressError(f"--advertise-url {explicit!r} names an unspecified host; give a reachable one")
        return url_of(given)
    if not is_unspecified(ep.host):
        return url_of(ep)
    pod_ip = (env or {}).get("POD_IP", "").strip()
    for candidate in (pod_ip, detected_ip or ""):
        if candidate and not is_unspecified(candidate):
            return url_of(ep, candidate)
    return url_of(ep, "127.0.0.1")


def _source_ip_toward(host: str) -> str | None:
    """The source address the kernel would use to reach `host` (a UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, 1, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            ip = str(s.getsockname()[0])
    except (OSError, IndexError):
        return None
    return ip


def routable(ip: str | None) -> bool:
    """An address another host could reach us at: not unspecified, loopback or link-local."""
    if not ip or is_unspecified(ip):
        return False
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_unspecified)


def interface_ips() -> list[str]:
    """The IPv4 address of every interface that has one (Linux SIOCGIFADDR), loopback included."""
    import fcntl
    import struct

    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address on this interface
            found.append(socket.inet_ntoa(packed[20:24]))
    return found


def detect_routable_ip(toward: Sequence[str] = ()) -> str | None:
    """This host's address as others would reach it, or None (the caller falls back to 127.0.0.1).

    In order: the source address toward each of `toward` (the proxies' hosts: the address they would see us
    at), the source address of the default route, then the first routable interface address (a host on a
    private network with no default route, such as a network namespace). Loopback only when nothing else
    exists; never 0.0.0.0.
    """
    for host in (*toward, "10.254.254.254"):
        ip = _source_ip_toward(host)
        if routable(ip):
            return ip
    try:
        candidates = interface_ips()
    except OSError:
        return None
    return next((ip for ip in candidates if routable(ip)), None)
