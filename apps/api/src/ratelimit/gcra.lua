-- GCRA (generic cell rate algorithm) over several keys in one round trip, all-or-nothing:
-- a request is allowed only if every key allows it, and a rejected request consumes nothing.
--
-- KEYS[i]            limiter key i (all keys share one hash tag, so one cluster slot)
-- ARGV[2i-1]         limit of key i: requests per period
-- ARGV[2i]           period of key i in milliseconds
--
-- `now` comes from the Redis server clock (TIME), so replicas with skewed clocks agree.
-- Each key stores its theoretical arrival time (TAT) as integer milliseconds, with a PX TTL
-- equal to the time until it is fully replenished, so idle keys disappear.
--
-- Returns {allowed, remaining_1, reset_ms_1, retry_ms_1, remaining_2, reset_ms_2, retry_ms_2, ...}
--   allowed    1 or 0
--   remaining  requests still allowed now for that key (after this one, if allowed)
--   reset_ms   time until that key's quota is fully restored
--   retry_ms   time until that key would allow one more request (0 if it allows now)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local n = #KEYS
local tats = {}
local new_tats = {}
local allowed = 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then
    tat = now
  end
  tats[i] = tat
  new_tats[i] = tat + interval
  if now < new_tats[i] - period then
    allowed = 0
  end
end

local out = {allowed}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local interval = period / limit
  local tat = tats[i]
  if allowed == 1 then
    tat = new_tats[i]
    local stored = math.ceil(tat)
    redis.call('SET', KEYS[i], stored, 'PX', math.max(1, stored - now))
  end
  local remaining = math.floor((now - (tat - period)) / interval)
  if remaining < 0 then
    remaining = 0
  end
  local retry = math.ceil(new_tats[i] - period - now)
  if allowed == 1 or retry < 0 then
    retry = 0
  end
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(tat - now)
  out[#out + 1] = retry
end
return out
