"""Who may call the admin routes: a bearer token (PROMPTKD_ADMIN_TOKEN), checked where the route is decided.

An admin route is one that depends on `require_admin`. The dependency is the last word (the handler never runs
for a caller without the token), and AdminGate (rest/middleware.py) applies the same check earlier, before the body
is read, to the path routing matches against: the request's path less its root path (`--root-path`, a parent
app's mount prefix), compared with the admin routes' own path templates, so the gate sees what the router sees.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

from fastapi import APIRouter, Request
from starlette.routing import compile_path

from ..errors import RequestError

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def token_matches(authorization: str | None, token: str) -> bool:
    """A `Bearer <token>` header against the configured token, in constant time; empty never matches."""
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    return scheme.lower() == "bearer" and bool(given) and secrets.compare_digest(given.encode(), token.encode())


def admin_refusal(token: str | None, authorization: str | None) -> RequestError | None:
    """Why a caller with this Authorization header may not use an admin route (None: it may): 404 while admin is
    disabled (the routes do not exist for anyone), 401 without the right bearer token."""
    if token is None:
        return RequestError(404, "Not Found")
    if not token_matches(authorization, token):
        return RequestError(401, "missing or wrong bearer token", CHALLENGE)
    return None


def require_admin(request: Request) -> None:
    """The dependency that makes a route an admin route."""
    secret = request.app.state.service.settings.admin_token
    refusal = admin_refusal(None if secret is None else secret.get_secret_value(),
                            request.headers.get("authorization"))
    if refusal is not None:
        raise refusal


def admin_paths(routers: Iterable[APIRouter]) -> list[re.Pattern]:
    """The path patterns of every admin route of these routers, compiled as routing compiles them."""
    return [compile_path(route.path)[0] for router in routers for route in router.routes
            if any(d.call is require_admin for d in getattr(getattr(route, "dependant", None), "dependencies", ()))]


def is_admin_path(scope, patterns: list[re.Pattern]) -> bool:
    """Whether routing will match this request against an admin route's path (whatever its method)."""
    path = route_path(scope)
    return any(pattern.match(path) for pattern in patterns)


def route_path(scope) -> str:
    """The path routing sees: the request's path less the root path (a proxy's or a parent app's prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path
