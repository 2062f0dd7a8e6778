"""Who a request comes from and how urgent it is: the contract between the edge (auth, tenants) and the
request path (queueing, logs, traces).

The auth middleware puts an `Identity` on the request as `request[IDENTITY]` (a key's tenant, its default
priority class and the highest class it may ask for); without keys configured it is absent and the request path
falls back to `ANONYMOUS`. The request id (`X-Request-ID`, validated or generated) goes in `request[REQUEST_ID]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

#: priority classes, most urgent first
PRIORITIES = ("interactive", "default", "batch")
DEFAULT_PRIORITY = "default"



@dataclass(frozen=True, slots=True)
class Identity:
    """The caller, as the proxy knows it. Never holds the key itself."""

    #: tenant name: what metrics and logs are labelled with
    tenant: str
    #: a short, non-secret id of the key (for logs), None when no key was used
    key_id: str | None = None
    #: the class a request gets when it names none
    priority: str = DEFAULT_PRIORITY
    #: the most urgent class this caller may ask for (a higher `X-Priority` is capped to it)
    max_priority: str = PRIORITIES[0]


ANONYMOUS = Identity(tenant="anonymous")


def priority_rank(name: str) -> int:
    """0 for the most urgent class; unknown names rank as the default class."""
    try:
        return PRIORITIES.index(name)
    except ValueError:
        return PRIORITIES.index(DEFAULT_PRIORITY)


#: request-scoped keys (aiohttp's request mapping; typed `web.RequestKey`s, as aiohttp 3.14 wants them;
#: `request.get(IDENTITY)` reads them as before)
IDENTITY = web.RequestKey("turbofleet.identity", Identity)
REQUEST_ID = web.RequestKey("turbofleet.request_id", str)
#: the `Via` value the relay sends upstream (the edge's hop detection, issue 11)
UPSTREAM_VIA = web.RequestKey("turbofleet.via", str)
#: the answer's `usage` object, set by the relay once known (tenant token limits and metrics, issue 11)
USAGE = web.RequestKey("turbofleet.usage", dict)
