"""What a request must pass before any work is done for it, in front of every route: a foreign
`Host` (DNS rebinding) on a loopback server and a foreign `Origin` are refused (`RequestGuard`);
with a key, the API and FastAPI's docs need it (`check_key`); a body must be `application/json`,
within the size limit and in time (`read_json`); and a connection must send its request head in
time (`HeadTimeoutH11Protocol`)."""

import asyncio
import ipaddress
import json
import secrets
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from bumblecore.inference.openai_request import APIError
from bumblecore.inference.serve_settings import ServeSettings

PUBLIC_PATHS = ("/", "/health")  # the page asks for the key itself; load balancers probe /health without one
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # FastAPI's: behind the key when one is set
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


async def read_json(request: Request, limit: int, timeout: float = 30.0):
    """The body as JSON: only `application/json` (a page on another site can POST text/plain to any
    server without asking; JSON needs the browser's CORS permission first), refusing bodies over
    `limit` bytes before reading them whole, and a body that takes longer than `timeout` to arrive."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415, f"Content-Type must be application/json, got {media_type or 'none'!r}.", code="unsupported_media_type"
        )
    declared = request.headers.get("content-length", "")
    too_large = APIError(
        413, f"The request body is larger than this server's limit of {limit} bytes.", code="request_too_large"
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g} s.", code="request_timeout") from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"The request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None


def check_key(key: Optional[str], authorization: str) -> None:
    if key is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>`.", code="invalid_api_key"
        )


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port: "localhost:8000" -> "localhost", "[::1]:80" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware in front of every route, against requests a hostile web page makes a browser
    send. DNS rebinding: the page's own name resolves to 127.0.0.1, so the browser thinks the
    server is same-origin; its Host header still names the page, so a loopback server serves only
    loopback names (plus --allowed_hosts). Cross-site requests: the browser sends the page's
    Origin; a foreign one is refused (unless --allowed_origins), before any work is done. And,
    with a key, FastAPI's /docs and /openapi.json need it as the API does."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.any_host = "*" in settings.allowed_hosts
        self.hosts = {h.lower() for h in settings.allowed_hosts}
        self.loopback = is_loopback(host_name(settings.host))
        if self.loopback:
            self.hosts |= set(LOOPBACK_NAMES)
        elif not self.hosts:
            self.any_host = True  # exposed on purpose (0.0.0.0, a LAN address): every name reaching it
        self.any_origin = "*" in settings.allowed_origins
        self.origins = {o.lower().rstrip("/") for o in settings.allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.check(scope, headers)
        except APIError as err:
            return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope, headers: dict) -> None:
        host = headers.get("host", "")
        name = host_name(host)
        if host and not (self.any_host or name in self.hosts or (self.loopback and is_loopback(name))):
            raise APIError(
                403,
                f"Host {host!r} is not served here; start the server with --allowed_hosts {name} to serve it.",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self.any_origin:
            origin = origin.lower().rstrip("/")
            own = origin.partition("://")[2] == host.lower() and origin.partition("://")[0] in ("http", "https")
            if not own and origin not in self.origins:
                raise APIError(
                    403,
                    f"Requests from the web origin {origin!r} are refused; start the server with "
                    f"--allowed_origins {origin} to allow its pages.",
                    code="origin_not_allowed",
                )
        if scope["path"] in DOCS_PATHS:
            check_key(self.settings.api_key, headers.get("authorization", ""))


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for the request line and headers: uvicorn arms its
    keep-alive timer only after a response, so a client that connects and sends half a request
    line (or nothing) would hold its connection, and a file descriptor, forever."""

    head_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.head_timeout, self.head_timed_out)

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self.head_timer is None:  # the first bytes of a next request on a kept-alive connection
            self.head_timer = self.loop.call_later(self.head_timeout, self.head_timed_out)
        super().data_received(data)
        if self.head_timer is not None and self.cycle is not None and not self.cycle.response_complete:
            self.head_timer.cancel()  # a whole request head arrived
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if getattr(self, "head_timer", None) is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)
