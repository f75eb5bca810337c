-- wrk script for the "varied" scenario: every request differs, as real traffic does. Eight
-- header fields as a browser sends them (Host from wrk, the rest here), the target with a
-- counter in its query string, a cookie and a request id that change on every request, so
-- no two request heads on a connection are the same. (The backend adds a request id to every
-- response: see bench/run.py.)
local n = 0
request = function()
  n = n + 1
  local headers = {
    ["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
    ["Accept"] = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    ["Accept-Language"] = "en-US,en;q=0.5",
    ["Accept-Encoding"] = "gzip, deflate",
    ["Referer"] = "http://127.0.0.1/page/" .. (n % 100),
    ["Cookie"] = "session=" .. n .. "; theme=dark",
    ["X-Request-Id"] = string.format("%032x", n),
  }
  return wrk.format(nil, wrk.path .. "?n=" .. n, headers)
end
