-- Append one Kafka partition's readings to its sensors' windows (windows.py,
-- WindowStore.append_batch; the layout is in that module's docstring). One call touches
-- one partition's keys only, so on a Redis Cluster they share a slot.
--
-- KEYS: the partition's epoch marker, its applied-offsets hash, S window keys, then the
--       same S sensors' pending-window lists.
-- ARGV: window_length, channels, stride, ttl_s, a fresh epoch token (written if the
--       marker is missing), the epoch the caller expects ('' before it has seen one),
--       T, T offsets-hash fields (topic:partition), then per sensor its readings'
--       metadata ('<ddI4' each: ts_ms, offset, field index), their float32 values and its
--       stride phase.
-- Returns {epoch} if the marker differs from the expected one (nothing written), else
--   {epoch, applied, replayed, late, duplicate_ts, reset, due}, due being flat 5-tuples
--   (sensor index, start_ts, end_ts, values, recovered) in the order to score them.

local HDR = '<BHI4I4I4ddddd'
local L = tonumber(ARGV[1])
local C = tonumber(ARGV[2])
local stride = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local rs = C * 4

redis.call('SET', KEYS[1], ARGV[5], 'NX')
local epoch = redis.call('GET', KEYS[1])
if ARGV[6] ~= '' and epoch ~= ARGV[6] then
  return {epoch}
end

local T = tonumber(ARGV[7])
local fields, applied, newmax = {}, {}, {}
for t = 1, T do
  fields[t] = ARGV[7 + t]
  local v = redis.call('HGET', KEYS[2], fields[t])
  applied[t] = v and tonumber(v) or -1
  newmax[t] = applied[t]
end

local function varint(v)
  local bytes = {}
  while v >= 128 do
    bytes[#bytes + 1] = v % 128 + 128
    v = math.floor(v / 128)
  end
  bytes[#bytes + 1] = v
  return string.char(unpack(bytes))
end

local function read_varint(s, pos)
  local v, scale = 0, 1
  while true do
    local b = string.byte(s, pos)
    pos = pos + 1
    if b < 128 then return v + b * scale, pos end
    v = v + (b - 128) * scale
    scale = scale * 128
  end
end

local n_applied, n_replayed, n_late, n_dup, n_reset = 0, 0, 0, 0, 0
local due = {}
local argi = 8 + T
local S = (#KEYS - 2) / 2
for i = 3, 2 + S do
  local meta, vals, phase = ARGV[argi], ARGV[argi + 1], tonumber(ARGV[argi + 2])
  argi = argi + 3
  local sensor = i - 2
  local n, since, tail, last_ts, start_ts, fd, ld, pend = 0, 0, 0, 0, 0, 0, 0, 0
  local data, stream = '', ''
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local ver, ch, pos
    ver, ch, n, since, tail, last_ts, start_ts, fd, ld, pend, pos = struct.unpack(HDR, raw)
    if ver == 1 and ch == C then
      data = string.sub(raw, pos, pos + n * rs - 1)
      stream = string.sub(raw, pos + n * rs)
    else
      n, since, tail, last_ts, start_ts, fd, ld, pend = 0, 0, 0, 0, 0, 0, 0, 0
      n_reset = n_reset + 1
    end
  end
  local load_pend = pend

  local parts, accepted = {data}, {}
  local any_replayed, running_last = false, last_ts
  for j = 0, #meta / 20 - 1 do
    local ts, off, t = struct.unpack('<ddI4', meta, j * 20 + 1)
    if off <= applied[t] then
      n_replayed = n_replayed + 1
      any_replayed = true
    else
      if off > newmax[t] then newmax[t] = off end
      if (n > 0 or #accepted > 0) and ts <= running_last then
        if ts == running_last then n_dup = n_dup + 1 else n_late = n_late + 1 end
      else
        accepted[#accepted + 1] = ts
        parts[#parts + 1] = string.sub(vals, j * rs + 1, (j + 1) * rs)
        running_last = ts
      end
    end
  end

  local sensor_due, pending_new = {}, {}
  if #accepted > 0 then
    local all = table.concat(parts)
    local cursor = 1
    local sp, front_run, out, oh = 1, 0, {}, 1
    for a = 1, #accepted do
      local ts = accepted[a]
      if n == 0 then
        start_ts = ts
      elseif n == 1 then
        fd = ts - last_ts
        ld = fd
      else
        local d = ts - last_ts
        local e = d - ld
        if e == 0 then
          tail = tail + 1
        else
          if tail > 0 then
            out[#out + 1] = 2 * (tail - 1) + 1
            tail = 0
          end
          out[#out + 1] = (e >= 0) and 4 * e or (-4 * e - 2)
        end
        ld = d
      end
      last_ts = ts
      n = n + 1
      since = since + 1
      local filled = n == L  -- full for the first time: its first due window
      if n > L then
        cursor = cursor + rs
        start_ts = start_ts + fd
        if n >= 3 then
          local e = 0
          if front_run > 0 then
            front_run = front_run - 1
          else
            local v
            if sp <= #stream then
              v, sp = read_varint(stream, sp)
            elseif oh <= #out then
              v = out[oh]
              oh = oh + 1
            else
              tail = tail - 1
            end
            if v then
              if v % 2 == 1 then
                front_run = (v - 1) / 2
              else
                local z = v / 2
                if z % 2 == 0 then e = z / 2 else e = -(z + 1) / 2 end
              end
            end
          end
          fd = fd + e
        end
        n = n - 1
      end
      if n == L and since >= stride then
        local payload = string.sub(all, cursor, cursor + L * rs - 1)
        for _, v in ipairs({sensor, start_ts, last_ts, payload, 0}) do
          sensor_due[#sensor_due + 1] = v
        end
        pending_new[#pending_new + 1] = struct.pack('<dd', start_ts, last_ts) .. payload
        since = filled and phase or 0
        pend = last_ts
      end
    end
    local tokens = {}
    if front_run > 0 then tokens[1] = varint(2 * (front_run - 1) + 1) end
    tokens[#tokens + 1] = string.sub(stream, sp)
    for o = oh, #out do tokens[#tokens + 1] = varint(out[o]) end
    redis.call('SET', KEYS[i],
      struct.pack(HDR, 1, C, n, since, tail, last_ts, start_ts, fd, ld, pend)
        .. string.sub(all, cursor, cursor + n * rs - 1) .. table.concat(tokens),
      'EX', ttl)
    n_applied = n_applied + #accepted
  end
  local pkey = KEYS[i + S]
  if any_replayed and load_pend > 0 then
    for _, entry in ipairs(redis.call('LRANGE', pkey, 0, -1)) do
      local first_ts, end_ts = struct.unpack('<dd', entry)
      for _, v in ipairs({sensor, first_ts, end_ts, string.sub(entry, 17), 1}) do
        due[#due + 1] = v
      end
    end
  end
  for _, v in ipairs(sensor_due) do due[#due + 1] = v end
  if #pending_new > 0 then
    redis.call('RPUSH', pkey, unpack(pending_new))
    redis.call('EXPIRE', pkey, ttl)
  end
end

for t = 1, T do
  if newmax[t] > applied[t] then
    redis.call('HSET', KEYS[2], fields[t], string.format('%d', newmax[t]))
  end
end

return {epoch, n_applied, n_replayed, n_late, n_dup, n_reset, due}
