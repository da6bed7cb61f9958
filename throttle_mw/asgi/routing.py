"""Which tag applies to a request: THROTTLE_ROUTE_PRIORITIES, else ``@priority``, else default.

Matching walks the app's routes the way Starlette's router does (routers,
mounted sub-apps and hosts included) and caches the answer per method and
path, so the cost per request does not grow with the number of routes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from starlette.routing import Match
from starlette.types import Scope

from ..priorities import RouteTag, tag_of
from ..settings import RouteRule

#: Distinct (method, path) answers kept; the oldest half goes when it is full.
CACHE_SIZE = 8192
_MAX_DEPTH = 8
_METHODS = 16  # per-method caches kept; other methods share the bounded `_rooted` cache


class RouteTags:
    def __init__(self, rules: Sequence[RouteRule], default: RouteTag, app: Any) -> None:
        self._rules = tuple(rules)
        self._default = default
        self._app = app
        #: method -> path -> tag, for the usual empty root_path: nothing to build per
        #: request. Other root paths (mounted under a prefix) go in `_rooted`. The
        #: middleware reads it directly for every request (a hit needs no call).
        self.by_method: dict[str, dict[str, RouteTag]] = {}
        self._rooted: dict[tuple[str, str, str], RouteTag] = {}

    def tag_for(self, scope: Scope) -> RouteTag:
        if not scope.get("root_path"):
            paths = self.by_method.get(scope["method"])
            if paths is not None:
                tag = paths.get(scope["path"])
                if tag is not None:
                    return tag
                return self._remember(paths, scope["path"], scope)
            if len(self.by_method) < _METHODS:  # clients may send any method token
                paths = self.by_method[scope["method"]] = {}
                return self._remember(paths, scope["path"], scope)
        key = (scope["method"], scope["root_path"], scope["path"])
        found = self._rooted.get(key)
        return found if found is not None else self._remember(self._rooted, key, scope)

    def _remember(self, cache: dict[Any, RouteTag], key: Any, scope: Scope) -> RouteTag:
        tag = self._resolve(scope)
        if len(cache) >= CACHE_SIZE:
            for old in list(itertools.islice(cache, CACHE_SIZE // 2)):
                del cache[old]
        cache[key] = tag
        return tag

    def _resolve(self, scope: Scope) -> RouteTag:
        method, path = scope["method"], scope["path"]
        for rule in self._rules:
            if rule.matches(method, path):
                return rule.tag
        app = scope.get("app", self._app)
        try:
            found = _endpoint_tag(app, dict(scope), 0)
            if found is None and path != "/":
                # Starlette redirects /x to /x/ (and back) when only the other matches:
                # the redirect belongs to the route it leads to (an exempt mount stays exempt).
                other = path[:-1] if path.endswith("/") else path + "/"
                found = _endpoint_tag(app, {**scope, "path": other}, 0)
        except Exception:  # a route's matcher failed: the router will answer for it
            found = None
        return found or self._default


def _routes_of(app: Any) -> Sequence[Any] | None:
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None) if router is not None else None
    if routes is None:
        routes = getattr(app, "routes", None)
    return routes if isinstance(routes, Sequence) else None


def _endpoint_tag(app: Any, scope: dict[str, Any], depth: int) -> RouteTag | None:
    routes = _routes_of(app)
    return _match_routes(routes, scope, depth) if routes is not None else None


def _match_routes(routes: Sequence[Any], scope: dict[str, Any], depth: int) -> RouteTag | None:
    if depth > _MAX_DEPTH:
        return None
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        match, child = matches(scope)
        if match is not Match.FULL:
            continue
        endpoint = child.get("endpoint")
        tag = tag_of(endpoint, scope.get("method")) if endpoint is not None else None
        if tag is not None:
            return tag
        target = child.get("app", endpoint)
        if target is not None and _routes_of(target) is not None:
            return _endpoint_tag(target, {**scope, **child}, depth + 1)
        # FastAPI >= 0.16x includes routers lazily: the included router matches as a
        # whole and names no endpoint; its candidates do.
        candidates = getattr(route, "effective_candidates", None)
        if endpoint is None and callable(candidates):
            return _match_routes(candidates(), {**scope, **child}, depth + 1)
        return None
    return None
