"""Typed application state keys (aiohttp `web.AppKey`): the only way handlers reach shared objects."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from turbofleet.balancer.policy import Policy

from .auth import Secrets
from .config import Settings
from .flow import Flow
from .guard import Allowlist
from .health import HealthChecker, Outliers
from .history import History
from .metrics import Metrics
from .registry.base import Registry
from .relay import Relay
from .tenants import KeyTable
from .tombstones import Tombstones
from .upstream import UpstreamPool

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
POLICY = web.AppKey("policy", Policy)
METRICS = web.AppKey("metrics", Metrics)
OUTLIERS = web.AppKey("outliers", Outliers)
HEALTH = web.AppKey("health", HealthChecker)
CLIENT = web.AppKey("client", aiohttp.ClientSession)
POOL = web.AppKey("pool", UpstreamPool)
RELAY = web.AppKey("relay", Relay)
STARTED = web.AppKey("started", float)
#: characters per prefix block the policy indexes; 0 when the policy does not look at prefixes
BLOCK_CHARS = web.AppKey("block_chars", int)
#: the queue in front of routing (issue 10): `snapshot()` per model/priority depth, oldest wait, limits
QUEUE = web.AppKey("queue", Flow)

# security perimeter (issue 11)
SECRETS = web.AppKey("secrets", Secrets)
ALLOWLIST = web.AppKey("allowlist", Allowlist)
KEYTABLE = web.AppKey("keytable", KeyTable)
#: this proxy instance's name in `Via` headers (hop detection)
VIA_ID = web.AppKey("via_id", str)
#: issue 12: the last 15 minutes of metrics, for the dashboard
HISTORY = web.AppKey("history", History)
#: URLs their own agent removed a moment ago (issue 18: a late heartbeat 404 must not bring them back)
TOMBSTONES = web.AppKey("tombstones", Tombstones)
