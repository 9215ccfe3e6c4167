"""The dashboard's web server: the page, and the view as server-sent events, read-only.

aiohttp (a well-kept asyncio HTTP server): it runs on the coordinator's own event loop, so the
view is read where it lives, with no thread and no copy between processes; server-sent events are
one ``StreamResponse`` (the page only ever listens, so websockets would add a protocol for
nothing). Routes: ``/`` the page (scripts and styles inlined, the current view embedded),
``/events`` the view after every change (``text/event-stream``), ``/view.json`` the view now.

Listening on anything but loopback needs the run's token: ``/?token=...`` once (printed on the
run's console, never put on the page or in the stream) sets an HttpOnly cookie and redirects to
``/`` without it; a request with neither gets 401, and the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from nmoe.errors import ConfigError

from .page import render

log = logging.getLogger(__name__)
COOKIE = "nmoe_dashboard"
KEEPALIVE_S = 15.0


class ViewSource(Protocol):
    def current(self) -> tuple[int, dict[str, Any]]:
        """(version, view): the version grows with every change."""
        ...

    async def wait_change(self, version: int, timeout: float) -> None:
        """Return once the version is past ``version``, or after ``timeout`` seconds."""
        ...


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Served:
    """A dashboard being served: where, and the token a browser needs (None on loopback)."""

    host: str
    port: int
    token: str | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The URL to open (with the token when one is needed): for the console, never for the page."""
        return self.url + (f"?token={self.token}" if self.token else "")


def make_app(source: ViewSource, token: str | None, closing: asyncio.Event) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if token is None:
            return await handler(request)
        given = request.query.get("token")
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            response = web.Response(status=302, headers={"Location": request.path})  # out of the address bar
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
            return response
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), token.encode()):
            return await handler(request)
        return web.Response(status=401, text="401: this dashboard needs the run's token (see the run's console)\n")

    async def page(request: web.Request) -> web.Response:
        _, view = source.current()
        return web.Response(text=render(view, live=True), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def view_json(request: web.Request) -> web.Response:
        _, view = source.current()
        return web.json_response(view, headers={"Cache-Control": "no-store"})

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        sent = -1
        try:
            while not closing.is_set():
                version, view = source.current()
                if version != sent:
                    await response.write(f"data: {json.dumps(view, allow_nan=False)}\n\n".encode())
                    sent = version
                else:
                    await response.write(b": keepalive\n\n")
                waiter = asyncio.ensure_future(source.wait_change(sent, KEEPALIVE_S))
                closed = asyncio.ensure_future(closing.wait())
                try:
                    await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (waiter, closed):
                        t.cancel()
        except ConnectionResetError:  # the page was closed
            log.debug("an event stream's page went away")
        return response

    app = web.Application(middlewares=[guard], client_max_size=4096)  # read-only: no request has a body
    app.router.add_get("/", page)
    app.router.add_get("/events", events)
    app.router.add_get("/view.json", view_json)
    return app


@contextlib.asynccontextmanager
async def serving(source: ViewSource, host: str, port: int, flag: str = "--dashboard",
                  require_token: bool | None = None) -> AsyncIterator[Served]:
    """Serve the dashboard on host:port (0: a free port) until the block ends. A port in use is a
    ConfigError naming it; off loopback (or with ``require_token``) a token is generated and required."""
    needed = not is_loopback(host) if require_token is None else require_token
    token = secrets.token_urlsafe(24) if needed else None
    closing = asyncio.Event()
    runner = web.AppRunner(make_app(source, token, closing), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"{flag}: port {port} on {host} is already in use (give another port, or 0 "
                                  f"for a free one)") from err
            raise ConfigError(f"{flag}: cannot listen on {host}:{port} ({err.strerror or err})") from err
        bound = int(runner.addresses[0][1]) if runner.addresses else port  # the port the OS chose for 0
        yield Served(host, bound, token)
    finally:
        closing.set()
        await runner.cleanup()
