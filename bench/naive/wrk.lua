-- wrk script for the naive peer: every request is PUT /items/i<N> {"n": 1} by user u<N>
-- with its own token (N random over the subjects: uncontended, like `lockstep bench`).
-- Usage: wrk -t2 -cC -dSs -s bench/naive/wrk.lua http://127.0.0.1:PORT -- TOKENS.lua
-- done() prints one line: "wrk <requests/s> <p50 ms> <p99 ms> <non-2xx> <socket errors>".
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  dofile(args[1])
  math.randomseed(os.time() * 1000 + tid)
end

function request()
  local n = math.random(#tokens) - 1
  return wrk.format("PUT", "/items/i" .. n,
    { ["Authorization"] = "Bearer " .. tokens[n + 1], ["Content-Type"] = "application/json" }, '{"n":1}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk %.0f %.2f %.2f %d %d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
