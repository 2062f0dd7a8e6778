"""Every Redis key, channel and TTL of the shared registry, in one place.

Layout under one prefix P (default "turbofleet"):

    P:workers              SET     urls of registered workers
    P:worker:{url}         HASH    one WorkerRecord: to_dict() fields, JSON-encoded, plus "v" (its version)
    P:version              STRING  counter bumped by every fleet write (upsert, remove, state, heartbeat)
    P:epoch                STRING  random id of this Redis data set; a new id means Redis lost its data
    P:replicas             SET     ids of proxy replicas that have announced themselves
    P:replica:{id}         STRING  the replica's lease, PX LEASE_TTL, renewed every LEASE_REFRESH seconds
    P:inflight:{id}        HASH    worker url -> requests this replica has in flight there (absolute counts),
                                   and "sessions|" + url -> active sessions this replica placed there (issue 18)
    P:pin:{session}        STRING  worker url the session is pinned to, PX pin TTL (slides on every release)
    P:feed:{db}            pub/sub channel: one JSON message per fleet write and per new pin
    P:bucket:{key id}      HASH    a tenant key's token buckets (r requests, k tokens, s stamp), PX BUCKET_TTL

Pub/sub channels are shared by every database of a Redis server, hence the db number in the channel name.
The Lua scripts build per-replica names from the prefixes passed in, so names are only spelt here. They touch
keys they do not declare, which standalone Redis (and Sentinel) allows and Redis Cluster does not.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "turbofleet"

#: field prefix, in a replica's in-flight hash, of its active-session count per worker: the same hash, so
#: the same lease, the same MULTI rewrite and the same READ_LOAD script carry them (issue 18)
SESSIONS_FIELD = "sessions|"
#: field prefix of this replica's in-flight requests per API key (tenant ref, never the raw key): the per-key
#: concurrency cap counts the fleet (issue 11), carried like the session counts
TENANTS_FIELD = "tenant|"
#: a replica's in-flight counts stop counting this long after its last lease renewal (crash safety)
LEASE_TTL = 10.0
#: how often a replica renews its lease and rewrites its in-flight hash from its exact local counts
LEASE_REFRESH = 2.0
#: how long the writer lets changes gather before sending them (one pipeline for many requests); a tenth of
#: SYNC_INTERVAL, so other replicas see counts no later in practice, at a tenth of the pipelines of 2 ms
FLUSH_DELAY = 0.02
#: how often a replica reads the other replicas' in-flight counts (one script call, one round trip)
SYNC_INTERVAL = 0.2
#: a full re-read of the fleet even when the change feed looked complete (belt and braces)
RESYNC_INTERVAL = 30.0
#: how long a replica trusts a pin it set or read before reading it again (see pins.py)
PIN_REVALIDATE = 10.0
#: a pin's sliding TTL is renewed by a release at most once per min(PIN_SLIDE_SHARE x TTL, PIN_SLIDE_MAX) s
PIN_SLIDE_SHARE = 0.05
PIN_SLIDE_MAX = 30.0
#: how long a looked-up "no pin" answer is trusted locally
PIN_MISS_TTL = 1.0
#: pins kept in each replica's local cache (LRU)
LOCAL_PINS = 100_000
#: a replica that knows no workers waits this long before seeding an empty Redis (replicas that know the
#: fleet seed at once, restoring it after Redis lost its data)
SEED_GRACE = 3.0
#: per-call limit on every Redis command (on top of the socket timeouts)
OP_TIMEOUT = 1.0
#: a tenant bucket untouched this long is dropped (it would be full again by then: 1 minute refills it)
BUCKET_TTL = 120.0
#: reconnect backoff: first wait, cap
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0


@dataclass(frozen=True, slots=True)
class Keys:
    """The names for one deployment (prefix) on one database."""

    prefix: str = DEFAULT_PREFIX
    db: int = 0

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def worker_prefix(self) -> str:
        return f"{self.prefix}:worker:"

    def worker(self, url: str) -> str:
        return self.worker_prefix + url

    @property
    def version(self) -> str:
        return f"{self.prefix}:version"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}:replicas"

    @property
    def lease_prefix(self) -> str:
        return f"{self.prefix}:replica:"

    def lease(self, replica_id: str) -> str:
        return self.lease_prefix + replica_id

    @property
    def inflight_prefix(self) -> str:
        return f"{self.prefix}:inflight:"

    def inflight(self, replica_id: str) -> str:
        return self.inflight_prefix + replica_id

    def pin(self, session_key: str) -> str:
        return f"{self.prefix}:pin:{session_key}"

    def bucket(self, key_ref: str) -> str:
        """A tenant key's rate buckets (issue 11); `key_ref` is a digest of the key, never the key."""
        return f"{self.prefix}:bucket:{key_ref}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:feed:{self.db}"
