-- GCRA (generic cell rate algorithm) over several keys in one round trip, all-or-nothing:
-- a request is allowed only if every key allows it, and a rejected request consumes nothing.
--
-- KEYS[i]            limiter key i (all keys share one hash tag, so one cluster slot)
-- ARGV[2i-1]         limit of key i: requests per period, at most one per millisecond
--                    (limit <= period; the api refuses larger limits at start-up)
-- ARGV[2i]           period of key i in milliseconds
--
-- `now` comes from the Redis server clock (TIME), so replicas with skewed clocks agree.
-- Each key stores its theoretical arrival time (TAT) as an integer number of MICROseconds,
-- rounded down, with a PX TTL (milliseconds) equal to the time until it is fully replenished,
-- so idle keys disappear. Whole milliseconds were too coarse: rounding up cost up to 1 ms per
-- request whenever period / limit is not a whole number of milliseconds (999 per second
-- acted as 500 per second). In microseconds, rounded down, a request is undercharged by
-- less than 1 us, so a full burst is always allowed (7 per minute lets 7 through, not 6)
-- and the excess is at most one request per period / 1 us requests. The inputs (periods)
-- and the outputs (times) stay in milliseconds.
--
-- Returns {allowed, remaining_1, next_ms_1, retry_ms_1, remaining_2, next_ms_2, retry_ms_2, ...}
--   allowed    1 or 0
--   remaining  requests still allowed now for that key (after this one, if allowed)
--   next_ms    time until that key regains its next unit of quota: the retry time when
--              it has none left, 0 when its quota is full (nothing to regain)
--   retry_ms   time until that key would allow one more request (0 if it allows now)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- A duration in microseconds as whole milliseconds, rounded up.
local function ms(us)
  return math.ceil(us / 1000)
end

local n = #KEYS
local tats = {}
local new_tats = {}
local allowed = 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i]) * 1000
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
  local period = tonumber(ARGV[2 * i]) * 1000
  local interval = period / limit
  local tat = tats[i]
  if allowed == 1 then
    tat = math.floor(new_tats[i])
    -- '%.0f': Lua turns numbers into strings with 14 significant digits, too few for a
    -- 16-digit microsecond timestamp.
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.max(1, ms(tat - now)))
  end
  -- Units available now: those whose emission time (tat - period + k * interval) has come.
  local remaining = math.floor((now - (tat - period)) / interval)
  if remaining < 0 then
    remaining = 0
  end
  local next_unit = 0
  if remaining < limit then
    next_unit = ms(tat - period + (remaining + 1) * interval - now)
  end
  local retry = ms(new_tats[i] - period - now)
  if allowed == 1 or retry < 0 then
    retry = 0
  end
  out[#out + 1] = remaining
  out[#out + 1] = next_unit
  out[#out + 1] = retry
end
return out
