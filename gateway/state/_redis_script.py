"""The Lua script behind the Redis store: every shared-state step is one atomic call of it."""

# Kept as a Python string (not a package data file) so it ships with any install of the package.
SCRIPT = r"""-- One atomic step of Cachet's shared routing state for one model (all keys share a hash tag).
-- KEYS: 1 load HASH (label -> requests in flight, label|t -> prefill tokens in flight)
--       2 leases ZSET (lease id -> expiry, ms of server time)  3 lease HASH (lease id -> label\ntokens)
--       4 events STREAM (prefix-index updates published by every gateway)
--       5 prefill ZSET (lease id -> when its prompt is expected prefilled; its tokens stop counting)
-- ARGV: op, origin, last_event_id, want_all_loads, max_events, stream_maxlen, then per op:
--   reserve: lease_id, ttl_ms, prefill_tokens, prefill_ms (0: until release), blocks_blob, n_choices,
--            (label, max_inflight)*n
--            takes the first choice within its max_inflight, else the least loaded choice
--   release: n_ids, id*n
--   renew:   ttl_ms, n_ids, id*n
--   sync:    (nothing)
-- then for every op: n_outbox, (kind, label, blob)*n  -- index updates to publish
-- Returns {chosen (1-based, 0 if none), renewed, last_event_id, events, loads}
local load, leases, lease, events, prefill = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, origin, last_id = ARGV[1], ARGV[2], ARGV[3]
local want_all = ARGV[4] == '1'
local max_events = tonumber(ARGV[5])
local maxlen = ARGV[6]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local touched = {}

local function count(field)
  return tonumber(redis.call('HGET', load, field) or '0') or 0
end

local function add(label, requests, tokens)
  touched[label] = true
  if requests ~= 0 and redis.call('HINCRBY', load, label, requests) <= 0 then
    redis.call('HDEL', load, label)
  end
  -- (tokens may be -0 in Lua, which Redis does not accept as an integer)
  if tokens ~= 0 and redis.call('HINCRBY', load, label .. '|t', tokens) <= 0 then
    redis.call('HDEL', load, label .. '|t')
  end
end

local function end_lease(id)
  local held = redis.call('HGET', lease, id)
  redis.call('ZREM', leases, id)
  redis.call('ZREM', prefill, id)
  if not held then return 0 end
  local sep = string.find(held, '\n', 1, true)
  add(string.sub(held, 1, sep - 1), -1, 0 - tonumber(string.sub(held, sep + 1)))
  redis.call('HDEL', lease, id)
  return 1
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', prefill, '-inf', now, 'LIMIT', 0, 512)) do
  redis.call('ZREM', prefill, id)
  local held = redis.call('HGET', lease, id)
  if held then
    local sep = string.find(held, '\n', 1, true)
    local label = string.sub(held, 1, sep - 1)
    add(label, 0, 0 - tonumber(string.sub(held, sep + 1)))
    redis.call('HSET', lease, id, label .. '\n0')
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 512)) do
  end_lease(id)
end

local function publish(kind, label, blob)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'o', origin, 'k', kind, 't', label, 'h', blob)
end

local i = 7
local chosen, renewed = 0, 0
if op == 'reserve' then
  local lease_id, ttl, tokens = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
  local prefill_ms, blob = tonumber(ARGV[10]), ARGV[11]
  local n = tonumber(ARGV[12])
  i = 13
  local labels = {}
  local lightest, lightest_count = 1, nil
  for c = 1, n do
    labels[c] = ARGV[i]
    local current = count(ARGV[i])
    if chosen == 0 and current <= tonumber(ARGV[i + 1]) then chosen = c end
    if lightest_count == nil or current < lightest_count then lightest, lightest_count = c, current end
    i = i + 2
  end
  -- every choice filled up beyond what the policy saw: the least loaded of them
  if chosen == 0 then chosen = lightest end
  local label = labels[chosen]
  redis.call('ZADD', leases, now + ttl, lease_id)
  redis.call('HSET', lease, lease_id, label .. '\n' .. tokens)
  add(label, 1, tokens)
  if prefill_ms > 0 and tokens > 0 then redis.call('ZADD', prefill, now + prefill_ms, lease_id) end
  if blob ~= '' then publish('r', label, blob) end
elseif op == 'release' then
  local n = tonumber(ARGV[7])
  for c = 1, n do end_lease(ARGV[7 + c]) end
  i = 8 + n
elseif op == 'renew' then
  local ttl, n = tonumber(ARGV[7]), tonumber(ARGV[8])
  for c = 1, n do
    if redis.call('ZADD', leases, 'XX', 'CH', now + ttl, ARGV[8 + c]) == 1 then renewed = renewed + 1 end
  end
  i = 9 + n
end

local n_out = tonumber(ARGV[i])
for c = 1, n_out do
  publish(ARGV[i + 3 * c - 2], ARGV[i + 3 * c - 1], ARGV[i + 3 * c])
end

local out_events = {}
if last_id == '' then
  local newest = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)
  if newest[1] then last_id = newest[1][1] else last_id = '0-0' end
else
  for _, entry in ipairs(redis.call('XRANGE', events, '(' .. last_id, '+', 'COUNT', max_events)) do
    last_id = entry[1]
    local f = entry[2]
    -- fields are written in a fixed order: o, k, t, h
    if f[2] ~= origin then
      out_events[#out_events + 1] = f[4]
      out_events[#out_events + 1] = f[6]
      out_events[#out_events + 1] = f[8]
    end
  end
end

local out_loads
if want_all then
  out_loads = redis.call('HGETALL', load)
else
  out_loads = {}
  for label in pairs(touched) do
    out_loads[#out_loads + 1] = label
    out_loads[#out_loads + 1] = tostring(count(label))
    out_loads[#out_loads + 1] = label .. '|t'
    out_loads[#out_loads + 1] = tostring(count(label .. '|t'))
  end
end
return {chosen, renewed, last_id, out_events, out_loads}
"""
