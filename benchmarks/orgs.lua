-- wrk script for the credit_guard benchmark.
--   wrk ... -s orgs.lua URL -- rotate 1000     each request pays with the next of org-0..org-999
--   wrk ... -s orgs.lua URL -- fixed hot       every request pays with the one org "hot"
--   wrk ... -s orgs.lua URL -- rotate 1000 N   ... and carries a fresh Idempotency-Key (prefix N)
-- Prints one line "WRK_JSON {...}" with the numbers run.py reads.

wrk.method = "POST"
wrk.body = ""

local mode, orgs, fixed, nonce = "rotate", 1000, nil, nil
local counter = 0
local threads = 0

function setup(thread)
  -- Threads start at different orgs so they do not walk the accounts in lockstep.
  thread:set("offset", threads * 397)
  threads = threads + 1
end

function init(args)
  mode = args[1] or "rotate"
  if mode == "fixed" then
    fixed = args[2] or "hot"
  else
    orgs = tonumber(args[2] or "1000")
  end
  nonce = args[3]
  counter = offset or 0
end

function request()
  counter = counter + 1
  local org = fixed or ("org-" .. (counter % orgs))
  local headers = { ["X-Org"] = org }
  if nonce then
    headers["Idempotency-Key"] = nonce .. "-" .. (offset or 0) .. "-" .. counter
  end
  return wrk.format(nil, nil, headers, "")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50.0), latency:percentile(99.0)))
end
