-- wrk script for the "varied" scenario: every request has its own target (a counter in the
-- query string), so no two request heads on a connection are the same.
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, wrk.path .. "?n=" .. n)
end
