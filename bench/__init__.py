"""Reproducible benchmarks for throttle_mw (not part of the installed package).

Layout, by concept:

- `variants`: the registry of variants (name -> how to build the ASGI app, the
  environment it is configured with, the services it needs, its baseline).
- `endpoints`: the one route every variant serves (hello-world, or the
  overload story's backend of finite capacity) and the plain apps around it.
- `apps`: throttle_mw's variants and the controls; the uvicorn subprocess
  imports ``bench.apps:make_app`` and picks a variant by ``BENCH_VARIANT``.
- `peers`: slowapi, fastapi-limiter and asgi-ratelimit, per-tenant, in memory
  and on Redis.
- `services`: the private, pinned redis-server, with the counters (round
  trips) sampled around every trial.
- `server`: one pinned uvicorn worker per trial, always cleaned up.
- `load`: load drivers (wrk; a Python fallback in `pyload`); `storyload`: the
  story's open-loop load (``demo_app.loadtest.engine``).
- `runner`: interleaves variants, repeats rounds, records trials and summaries.
- Entry points: `throughput`, `roundtrips`, `grant_latency`, `story`, and
  `run_all` (every one, and the Markdown table built by `report`).

See ``bench/README.md``.
"""
