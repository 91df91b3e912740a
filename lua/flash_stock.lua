-- flash_stock
-- The flash sale's stock left, read in the sale's slot like its other scripts so that it
-- shares their round trips (a buyer that came after the sale sold out costs this read,
-- not a purchase's script with a whole transaction in its arguments).
-- KEYS[1] = stock counter           flash:stock:{pN}:<item>
-- returns the units left (0 when there is no counter)

return tonumber(redis.call('GET', KEYS[1]) or '0')
