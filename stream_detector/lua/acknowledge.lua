-- KEYS: epoch, A alert-state keys, then E window keys and their E pending keys.
-- ARGV: expected epoch, ttl, A, A alert states (JSON), E acknowledged window ends.
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local A = tonumber(ARGV[3])
for i = 1, A do
  redis.call('SET', KEYS[1 + i], ARGV[3 + i], 'EX', ARGV[2])
end
local E = (#KEYS - 1 - A) / 2
for i = 1, E do
  local wkey, pkey = KEYS[1 + A + i], KEYS[1 + A + E + i]
  local acked = tonumber(ARGV[3 + A + i])
  local head = redis.call('GETRANGE', wkey, 0, 54)
  if #head == 55 then
    local pend = struct.unpack('<d', head, 48)
    if pend > 0 and pend <= acked then
      redis.call('SETRANGE', wkey, 47, struct.pack('<d', 0))
    end
  end
  local entries = redis.call('LRANGE', pkey, 0, -1)
  local done = 0
  while done < #entries and struct.unpack('<d', entries[done + 1], 9) <= acked do
    done = done + 1
  end
  if done == #entries then
    redis.call('DEL', pkey)
  elseif done > 0 then
    redis.call('LTRIM', pkey, done, -1)
  end
end
return 1
