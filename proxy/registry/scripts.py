"""The Lua scripts of the Redis registry. Key names come in through KEYS/ARGV (see keys.py).

Fleet writes are scripts rather than MULTI blocks because each one reads before it writes (does the worker
exist, when was it first registered) and must do both, bump the version and publish the change as one step:
a replica that re-reads the fleet between two of those steps would otherwise see a half-written worker or a
version that does not match the data. Timestamps come from Redis' clock (TIME) so that every replica compares
heartbeats against the same clock, whatever the skew between their hosts.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))
"""

#: KEYS: workers set, worker hash, version. ARGV: url, channel, field/value pairs (JSON values).
#: Replaces the worker's record, keeping registered_at; returns the stored hash (flat list).
UPSERT = (
    _NOW
    + """
local reg = redis.call('HGET', KEYS[2], 'registered_at') or now
redis.call('DEL', KEYS[2])
local v = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[2], 'registered_at', reg, 'last_heartbeat', now, 'v', v, unpack(ARGV, 3))
redis.call('SADD', KEYS[1], ARGV[1])
local fields = redis.call('HGETALL', KEYS[2])
redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'put', url = ARGV[1], v = v, f = fields}))
return fields
"""
)

#: KEYS: worker hash, version. ARGV: url, channel, stamp ("1": set last_heartbeat), field/value pairs.
#: Changes some fields of an existing worker; returns the stored hash, or nil when the worker is unknown.
PATCH = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local v = redis.call('INCR', KEYS[2])
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'last_heartbeat', now, 'v', v, unpack(ARGV, 4))
else
  redis.call('HSET', KEYS[1], 'v', v, unpack(ARGV, 4))
end
local fields = redis.call('HGETALL', KEYS[1])
redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'put', url = ARGV[1], v = v, f = fields}))
return fields
"""
)

#: KEYS: workers set, worker hash, version. ARGV: url, channel. Returns the new version, or 0 if unknown.
REMOVE = """
local n = redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[1])
if n == 0 then return 0 end
local v = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'del', url = ARGV[1], v = v}))
return v
"""

#: Issue 18, reaping. KEYS: workers set, worker hash, version. ARGV: url, channel, seconds.
#: Removes a heartbeating worker (heartbeat_ttl set) only if its last heartbeat is still more than `seconds`
#: old by Redis' clock: the check and the delete are one step, so a heartbeat that lands first keeps the
#: worker, and of two replicas reaping at once one removes it (publishes one 'del') and the other finds
#: nothing. Workers without heartbeats (static, LMDeploy's own registration) are never reaped.
#: Returns the new version, or 0 when nothing was removed.
REAP = (
    _NOW
    + """
local h = redis.call('HMGET', KEYS[2], 'heartbeat_ttl', 'last_heartbeat')
if not h[1] or h[1] == 'null' then return 0 end
if tonumber(now) - (tonumber(h[2]) or 0) <= tonumber(ARGV[3]) then return 0 end
"""
    + REMOVE  # the same delete, version bump and 'del' message as a removal
)

#: KEYS: workers set, version, epoch. ARGV: worker key prefix.
#: A consistent cut of the fleet: {epoch, version, {url, hash, url, hash, ...}}.
READ_FLEET = """
local out = {}
for _, url in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. url)
  if #fields > 0 then
    out[#out + 1] = url
    out[#out + 1] = fields
  end
end
return {redis.call('GET', KEYS[3]) or '', redis.call('GET', KEYS[2]) or '0', out}
"""

#: KEYS: epoch, workers set, version. ARGV: new epoch, worker key prefix, JSON [[url, [f, v, ...]], ...].
#: Check-and-write in one step so that only the first replica to find Redis empty (first start, or a restart
#: that lost the data) seeds it, from its local snapshot, adding only workers Redis does not have; the others
#: then read that fleet back.
#: Returns 1 when it seeded, 0 when Redis already had a data set.
SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
local v = redis.call('INCR', KEYS[3])
for _, rec in ipairs(cjson.decode(ARGV[3])) do
  local key = ARGV[2] .. rec[1]
  if redis.call('EXISTS', key) == 0 then  -- a worker written since is newer than our copy
    redis.call('HSET', key, 'v', v, unpack(rec[2]))
    redis.call('SADD', KEYS[2], rec[1])
  end
end
return 1
"""

#: KEYS: replicas set, version, epoch. ARGV: lease prefix, in-flight prefix, own replica id.
#: The other live replicas' in-flight hashes in one round trip, plus Redis' clock and the fleet version.
#: A replica whose lease expired is dropped here, inside the script, where it cannot renew its lease between
#: our check and the delete. Returns {{secs, usecs}, version, epoch, {id, hash, id, hash, ...}, live count}.
READ_LOAD = """
local out = {}
local live = 0
for _, r in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. r) == 1 then
    live = live + 1
    if r ~= ARGV[3] then
      out[#out + 1] = r
      out[#out + 1] = redis.call('HGETALL', ARGV[2] .. r)
    end
  else
    redis.call('DEL', ARGV[2] .. r)
    redis.call('SREM', KEYS[1], r)
  end
end
return {redis.call('TIME'), redis.call('GET', KEYS[2]) or '0', redis.call('GET', KEYS[3]) or '', out, live}
"""

#: Issue 11, tenant limits. KEYS: the key's bucket hash (keys.py `bucket`). ARGV: requests/s, request burst,
#: tokens/s, token burst, request cost, token cost, TTL in ms. Returns the seconds to wait as a string ("0":
#: admitted). A script, not MULTI, because the decision reads the bucket, refills it by Redis' clock and then
#: takes from it: two replicas doing those steps apart would both admit the last request of a minute. A
#: request (cost 1) is admitted while the request bucket holds one and the token bucket is not in debt; an
#: answer's tokens (request cost 0) are charged unconditionally, into debt if need be (usage is known only
#: after the answer). proxy/limits.py `bucket_step` is the same arithmetic, for the memory registry.
TENANT_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'r', 'k', 's')
local rr, br, rt, bt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cr, ct = tonumber(ARGV[5]), tonumber(ARGV[6])
local r, k, s = tonumber(h[1]) or br, tonumber(h[2]) or bt, tonumber(h[3]) or now
local dt = math.max(0, now - s)
if br > 0 then r = math.min(br, r + dt * rr) end
if bt > 0 then k = math.min(bt, k + dt * rt) end
local wait = 0
if cr > 0 then
  if br > 0 and r < cr then wait = (cr - r) / rr end
  if bt > 0 and k <= 0 then wait = math.max(wait, (1 - k) / rt) end
  if wait == 0 then r = r - cr end
else
  k = k - ct
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 'k', tostring(k), 's', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return tostring(wait)
"""
