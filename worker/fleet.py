"""The agent's side of the proxy's node API (`/nodes/add`, `/heartbeat`, `/state`, `/drain`, `/remove`,
`/status`), one client per proxy, sharing the agent's one `aiohttp.ClientSession`."""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

log = logging.getLogger("turbofleet.worker")


class ProxyError(Exception):
    """A call to the proxy did not succeed."""


class NotRegistered(ProxyError):
    """404 `worker_not_found`: the proxy does not know this worker (it restarted, or the TTL ran out)."""


class Rejected(ProxyError):
    """400/401/403: the proxy refuses the call as made (bad token, bad description); retrying will not help."""


class Unavailable(ProxyError):
    """The proxy cannot be reached, timed out, or answered 5xx (503 `registry_unavailable`): retry later."""


class ProxyClient:
    """Calls to one proxy, with the admin token when one is given."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, token: str | None = None, timeout: float = 5.0
    ) -> None:
        self.session = session
        self.base = base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:
        return f"ProxyClient({self.base})"

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, limit_s: float | None = None
    ) -> Any:
        t = self.timeout if limit_s is None else aiohttp.ClientTimeout(total=limit_s)
        try:
            async with self.session.request(method, self.base + path, json=body, headers=self.headers, timeout=t) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise Unavailable(f"{self.base}{path}: {type(e).__name__}: {e}") from e
        text = raw.decode(errors="replace")
        if status == 404:
            raise NotRegistered(f"{self.base}{path}: 404 {text[:200]}")
        if status in (400, 401, 403, 405, 413, 422):
            raise Rejected(f"{self.base}{path}: {status} {text[:300]}")
        if status >= 300:
            raise Unavailable(f"{self.base}{path}: {status} {text[:200]}")
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            return text

    async def add(self, description: dict[str, Any]) -> None:
        await self._call("POST", "/nodes/add", description)

    async def heartbeat(self, url: str, load: dict[str, Any], limit_s: float | None = None) -> None:
        """`limit_s`: how long this beat may take (default: the client's timeout), see agent.heartbeat_timeout."""
        await self._call("POST", "/nodes/heartbeat", {"url": url, "load": load}, limit_s)

    async def set_state(self, url: str, state: str) -> None:
        await self._call("POST", "/nodes/state", {"url": url, "state": state})

    async def drain(self, url: str) -> None:
        await self._call("POST", "/nodes/drain", {"url": url})

    async def remove(self, url: str, agent_id: str | None = None) -> None:
        body: dict[str, Any] = {"url": url}
        if agent_id:
            body["agent_id"] = agent_id  # the proxy keeps a short tombstone against this agent's late rejoin
        await self._call("POST", "/nodes/remove", body)

    async def status(self) -> dict[str, Any]:
        data = await self._call("GET", "/nodes/status")
        if not isinstance(data, dict):
            raise Unavailable(f"{self.base}/nodes/status: not a JSON object")
        return data
