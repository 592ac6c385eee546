-- POSTs JSON bodies to the URL wrk was given, cycling through a file of bodies (one per line,
-- passed after `--`), and prints one `WRK_RESULT {...}` line that benchmarks/run.py parses.
--
-- Requests are formatted once in init(): formatting per request would cost wrk more CPU, and
-- on a small machine wrk shares the cores with the server it measures.

local bodies = {}
local index = 0
local threads = {}

-- Globals, not locals: done() reads them from each thread's own Lua state with thread:get().
non2xx = 0
statuses = ""

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  for line in io.lines(args[1]) do
    if #line > 0 then
      table.insert(bodies, wrk.format(nil, nil, nil, line))
    end
  end
  if #bodies == 0 then
    error("no request bodies in " .. tostring(args[1]))
  end
end

function request()
  index = index % #bodies + 1
  return bodies[index]
end

local seen = {}

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    -- Keep the distinct failing codes, so a report says 429 or 503 rather than just "errors".
    if not seen[status] then
      seen[status] = true
      statuses = statuses .. (#statuses > 0 and "," or "") .. tostring(status)
    end
  end
end

function done(summary, latency, requests)
  local failed = 0
  local codes = {}
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("non2xx")
    local codes_here = thread:get("statuses")
    if #codes_here > 0 then
      table.insert(codes, codes_here)
    end
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"duration_us":%d,"requests":%d,"non2xx":%d,"non2xx_codes":"%s",'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.duration, summary.requests, failed, table.concat(codes, ","),
    errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max
  ))
end
