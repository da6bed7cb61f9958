"""The live page at ``/``: the throttle at work, per tenant, refreshed every second.

``page.html`` is plain HTML with inline CSS and JS (the page must work
offline: no CDN). Its script polls ``/api/throttle/stats`` (exempt from the throttle, so the page
keeps updating under overload) and redraws; tenant names are untrusted text
and only ever reach the DOM through ``textContent``.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def page() -> str:
    """The page's HTML (read once)."""
    return (files(__package__) / "page.html").read_text(encoding="utf-8")
