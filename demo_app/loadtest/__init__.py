"""An open-loop load generator for SurveyTool (``python -m demo_app.loadtest``).

One engine serves two users: the CLI, for people load-testing the demo, and
the end-to-end tests, which call ``run`` against real uvicorn servers. The
plan is seeded and sent open loop (arrivals never wait for responses);
latency is measured from when each request was due. ``report`` summarises a
run, ``chart`` draws it (needs matplotlib, from the ``demo`` extra).
"""
