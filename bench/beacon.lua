-- wrk script: every request posts a distinct tag beacon to /collect, as static/tag.js does
-- (text/plain JSON). Each beacon has its own event id and click id: a repeated id, or a second
-- form for the same click, would be answered "duplicate" and skip most of the work.
--
--   wrk -t1 -c64 -d10s -s bench/beacon.lua http://127.0.0.1:PORT/collect -- RUNHEX
--
-- RUNHEX (8 hex digits) keeps ids unique across runs against one database. When wrk is done,
-- one line starting with WRK_JSON carries the figures bench/loadgen.py reads.

local threads = {}

function setup(thread)
  thread:set("thread_hex", string.format("%02x", #threads))
  table.insert(threads, thread)
end

function init(args)
  run_hex = args[1] or "00000000"
  sent = 0
end

function request()
  sent = sent + 1
  local id = string.format("%s%s%022x", run_hex, thread_hex, sent)
  local body = '{"v":1,"id":"' .. id .. '","type":"form","callback":"bench-' .. id
    .. '","age_ms":0}'
  return wrk.format("POST", nil, {["Content-Type"] = "text/plain;charset=UTF-8"}, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"timeouts":%d,"non_2xx":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write,
    errors.timeout, errors.status, latency:percentile(50), latency:percentile(99), latency.max))
end
