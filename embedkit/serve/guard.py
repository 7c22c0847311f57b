"""What stands between the network and a collection: the token, the Host check, security
headers, and the one JSON error shape (``{"error": ...}`` with a 4xx status) for every refusal."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    EmbedkitError,
    IndexStateError,
    InvalidArgumentError,
    ProbeError,
    StoreChangedError,
    StoreLockedError,
    WeightsUnavailableError,
)
from .thumbs import MissingFileError

TOKEN_HEADER = "X-Embedkit-Token"
# The page is ours only: no inline script, no third-party origin (also: works offline).
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` and a message that says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status_of(exc: EmbedkitError) -> int:
    if isinstance(exc, MissingFileError):
        return 404
    if isinstance(
        exc,
        (StoreLockedError, StoreChangedError, IndexStateError, ProbeError, WeightsUnavailableError),
    ):
        return 409  # the store (or its model) cannot answer this now; the message says why
    if isinstance(exc, InvalidArgumentError):
        return 400
    return 422


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_host_header(host: str) -> bool:
    """Whether an HTTP Host header (``name[:port]``, ``[v6]:port``) names this machine."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    return bool(name) and is_loopback(name)


def resolve_token(host: str, token: str | None) -> str | None:
    """The API token: the one given, else a fresh random one for a non-loopback ``host``
    (anyone on the network could read the collection otherwise), else None."""
    if token:
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


# multipart framing around an uploaded file: boundaries, part headers, the k field
_FORM_OVERHEAD = 64 * 1024


def install_guards(app: FastAPI, token: str | None, max_body: int) -> None:
    """Token check, Host check, body size cap, security headers and the JSON error shape.

    ``max_body`` is refused from the declared Content-Length, before the form parser spools
    the body to disk; the upload route checks the bytes it reads as well (chunked requests).
    """

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        path = request.url.path
        if token is None and not _loopback_host_header(request.headers.get("host", "")):
            # Without a token only this machine may ask, by a loopback name: a web page that
            # re-points its own domain at 127.0.0.1 (DNS rebinding) sends its domain here.
            return JSONResponse(
                {
                    "error": "this server answers only at 127.0.0.1 or localhost; for other "
                    "names or hosts, restart it with --host and a --token"
                },
                status_code=403,
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body + _FORM_OVERHEAD:
            return JSONResponse(
                {"error": f"the request is over {max_body // 2**20} MiB; send a smaller copy"},
                status_code=413,
            )
        if token is not None and path.startswith("/api"):
            given = (
                request.headers.get(TOKEN_HEADER)
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                or request.query_params.get("token")
                or ""
            )
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse(
                    {"error": "missing or wrong token; open the URL `embedkit serve` printed"},
                    status_code=401,
                )
        response: Response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        if not path.startswith(("/docs", "/redoc")):  # FastAPI's doc pages load their own JS
            response.headers["Content-Security-Policy"] = _CSP
        return response

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.exception_handler(EmbedkitError)
    async def library_error(_: Request, exc: EmbedkitError) -> JSONResponse:
        return error(_status_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {e.get('msg')}")
        return error(400, "bad request: " + "; ".join(parts) + " (see /docs)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = "no such page or API path; the API is listed at /docs"
        return error(exc.status_code, message)
