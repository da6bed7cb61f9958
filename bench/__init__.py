"""Reproducible benchmarks for throttle_mw (not part of the installed package).

Layout, by concept:

- `variants`: the registry of variants (name -> how to build the ASGI app, the
  environment it is configured with, the services it needs).
- `apps`: the app under test and the variants' builders; the uvicorn
  subprocess imports ``bench.apps:make_app`` and picks a variant by ``BENCH_VARIANT``.
- `services`: external services a variant needs (Redis later), with counters
  sampled around every trial.
- `server`: one pinned uvicorn worker per trial, always cleaned up.
- `load`: load drivers (wrk; a Python fallback in `pyload`).
- `runner`: interleaves variants, repeats rounds, records trials and summaries.
- `throughput`: the command-line entry point.

See ``bench/README.md``.
"""
