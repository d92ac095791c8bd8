"""Optional API keys: a pure ASGI middleware in front of every route.

- No keys configured: nothing is checked (the server binds to 127.0.0.1 by default).
- `api_keys` set: every route but `/health` and the web page itself (`/` and its static assets)
  needs `Authorization: Bearer KEY` or `X-API-Key: KEY`; `/docs` and `/openapi.json` too.
- `admin_keys` set: write routes (any method but GET/HEAD, except the read-only `POST /search`
  and `POST /duplicates/plan`) need an admin key; an admin key is also valid everywhere an ordinary key is.

Keys are compared in constant time: each offered key is hashed and compared with
`hmac.compare_digest` against the hash of every configured key, without stopping early.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
from collections.abc import Iterable

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

# Routes anyone may reach even when keys are configured: liveness, and the web page that asks
# for a key (its own document and static assets, never the data routes it calls).
PUBLIC_PATHS = frozenset({"/", "/health", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
READ_METHODS = frozenset({"GET", "HEAD"})
# A query with an uploaded image, and a removal plan the page downloads: they write nothing.
READ_ONLY_POSTS = frozenset({"/search", "/duplicates/plan"})

MISSING_KEY = "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
INVALID_KEY = "invalid API key"
NOT_ADMIN = "this route changes data and needs an admin key"


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _any_matches(offered: list[bytes], digests: tuple[bytes, ...]) -> bool:
    """Constant time in the keys: every offered key is compared with every configured one."""
    found = False
    for candidate in offered:
        wanted = _digest(candidate)
        for digest in digests:
            found |= hmac.compare_digest(wanted, digest)
    return found


def offered_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    keys = []
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    return keys


def is_public(path: str) -> bool:
    if path in PUBLIC_PATHS:
        return True
    # Only clean paths: no `..`, `.` or doubled slashes sneaking past the prefix.
    return path.startswith(PUBLIC_PREFIXES) and posixpath.normpath(path) == path.rstrip("/")


def is_write(method: str, path: str) -> bool:
    return method not in READ_METHODS and not (method == "POST" and path in READ_ONLY_POSTS)


def _route_path(scope: Scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


class ApiKeyAuth:
    """Answer 401 (no or unknown key) or 403 (a non-admin key on a write route) before the app runs."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str] = (), admin_keys: Iterable[str] = ()):
        self.app = app
        self.api_digests = tuple(_digest(k.encode()) for k in api_keys)
        self.admin_digests = tuple(_digest(k.encode()) for k in admin_keys)

    @property
    def enabled(self) -> bool:
        return bool(self.api_digests or self.admin_digests)

    def decide(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        """None to let the request through, else (status, message)."""
        offered = offered_keys(headers)
        is_admin = _any_matches(offered, self.admin_digests)
        is_user = _any_matches(offered, self.api_digests) or is_admin
        if self.admin_digests and is_write(method, path):
            if is_admin:
                return None
            if is_user:
                return 403, NOT_ADMIN
            return 401, INVALID_KEY if offered else MISSING_KEY
        if is_public(path) or not self.api_digests or is_user:
            return None
        return 401, INVALID_KEY if offered else MISSING_KEY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.enabled:
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        refusal = self.decide(method, _route_path(scope), scope.get("headers") or [])
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await self._refuse(send, *refusal)

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        body = json.dumps({"detail": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_auth(app: FastAPI, api_keys: list[str], admin_keys: list[str]) -> None:
    """Add the middleware (outermost, so a refused request reaches nothing else) and, when keys
    are configured, document the two ways to send one and the 401/403 answers in OpenAPI."""
    app.add_middleware(ApiKeyAuth, api_keys=api_keys, admin_keys=admin_keys)
    if not (api_keys or admin_keys):
        return
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build_schema()
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(
            {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
        )
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                write = bool(admin_keys) and is_write(method.upper(), path)
                if not write and (is_public(path) or not api_keys):
                    continue
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {"description": "No API key, or an unknown one", "content": error})
                if write:
                    responses.setdefault("403", {"description": "Not an admin key", "content": error})
        schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
            "ErrorOut",
            {
                "title": "ErrorOut",
                "type": "object",
                "properties": {"detail": {"type": "string"}},
                "required": ["detail"],
            },
        )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
