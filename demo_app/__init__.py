"""SurveyTool: the demo app that shows throttle_mw at work under real overload.

Employees of many companies (tenants) submit survey responses; managers watch
dashboards and live stats. The store has a real, finite capacity, so a load
test overloads it for real, and the page at ``/`` shows the throttle live.

Run one process with ``uvicorn demo_app.app:app`` (configure the throttle with
``THROTTLE_*`` variables and the app with ``SURVEYTOOL_*``), the whole fleet
with ``python -m demo_app.fleet``, or the compose file at the repo root.
"""
