-- wrk report script for bench/load.py.
-- Prints one line, "BENCH_JSON {...}", after the run: completed requests, the
-- run's duration (microseconds), socket errors by kind, responses that were not
-- 2xx/3xx ("status"), and latency percentiles (microseconds).
-- No per-response callback: that would slow wrk down and skew the numbers.

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.timeout, errors.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max
  ))
end
