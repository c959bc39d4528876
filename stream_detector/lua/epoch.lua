-- Read a partition's epoch marker, writing ARGV[1] first if it is missing.
-- KEYS: the epoch marker.
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
