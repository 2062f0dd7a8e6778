"""Issue 18: replicas share their per-worker active-session counts, so two replicas place new sessions as
evenly as one. The policy keeps its own session tracker (pure, balancer/sessions.py); the Redis registry
publishes that tracker's counts beside its in-flight counts and hands the other replicas' sums back to the
policy in each WorkerView (`sessions`). The in-memory registry has a single replica: nothing to share."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeGuard

from turbofleet.balancer.policy import Policy

from .limits import Limits
from .registry.base import Registry

if TYPE_CHECKING:
    from .registry.redis import RedisRegistry


def _on_redis(registry: Registry) -> TypeGuard[RedisRegistry]:
    """redis-py is imported only with `--registry redis://` (the embedded default needs no redis package): a
    registry can only be a RedisRegistry when that module was loaded to make it."""
    mod = sys.modules.get("turbofleet.proxy.registry.redis")
    return mod is not None and isinstance(registry, mod.RedisRegistry)


def share_sessions(registry: Registry, policy: Policy) -> None:
    tracker = getattr(policy, "sessions", None)
    counts = getattr(tracker, "counts", None)
    if _on_redis(registry) and isinstance(counts, dict):
        registry.session_counts = lambda: counts


def share_tenant_counts(registry: Registry, limits: Limits) -> None:
    """Issue 11: the per-key concurrency cap counts every replica (limits.py)."""
    if _on_redis(registry):
        registry.tenant_counts = limits.tenant_counts
        registry.tenant_others = limits.set_others
        limits.changed = registry.tenant_changed
