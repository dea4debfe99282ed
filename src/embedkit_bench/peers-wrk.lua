-- wrk script: POST the request bodies of a file (one JSON body per line) in turn.
-- Usage: wrk -t1 -s bodies.lua URL -- BODIES_FILE PATH
local requests = {}
local next_index = 1

function init(args)
  local file, path = args[1], args[2]
  local headers = {["Content-Type"] = "application/json"}
  for line in io.lines(file) do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("POST", path, headers, line)
    end
  end
  if #requests == 0 then error("no request bodies in " .. file) end
end

function request()
  local r = requests[next_index]
  next_index = next_index % #requests + 1
  return r
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
    '"latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p95": %d, "p99": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read,
    e.write, e.timeout, latency.mean, latency.max, latency:percentile(50),
    latency:percentile(95), latency:percentile(99)))
end
