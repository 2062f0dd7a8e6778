"""Short tombstones for workers their own agent has just removed (issue 18: ghost re-registration).

An agent that drains and deregisters may have a heartbeat in flight; if that heartbeat lands after the removal it
gets a 404, and an agent answers a 404 by registering again, bringing back a worker that is on its way out. The
agent no longer does that, but a proxy cannot count on every agent being new: for a short while after an agent
removes its own URL (`/nodes/remove` with its `agent_id`), a registration from that same agent, or an anonymous
one marked as an answer to a heartbeat 404 (`rejoin`), is refused. A registration from another agent id (a new
agent process on the same address) or a plain LMDeploy one clears the tombstone and is taken as usual.

Plain data and arithmetic; the caller hands in the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tombstones:
    """URL -> (agent id, expiry) for URLs removed by their own agent within the last `ttl` seconds."""

    ttl: float
    _graves: dict[str, tuple[str, float]] = field(default_factory=dict)

    def bury(self, url: str, agent_id: str, now: float) -> None:
        self._prune(now)
        self._graves[url] = (agent_id, now + self.ttl)

    def refuses(self, url: str, agent_id: str | None, rejoin: bool, now: float) -> bool:
        """True when a registration of `url` is the removed agent's ghost; any other clears the tombstone."""
        grave = self._graves.get(url)
        if grave is None:
            return False
        buried_by, until = grave
        if now >= until:
            del self._graves[url]
            return False
        if agent_id == buried_by or (agent_id is None and rejoin):
            return True
        del self._graves[url]
        return False

    def buried(self, url: str, now: float) -> bool:
        grave = self._graves.get(url)
        return grave is not None and now < grave[1]

    def _prune(self, now: float) -> None:
        for url in [u for u, (_, until) in self._graves.items() if now >= until]:
            del self._graves[url]
