"""The web daemon's HTTP server: the standard library's, bounded.

``http.server`` gives a thread per connection and reads a request with the limits of
``http.client`` (64 KiB a line, 100 headers). What a router exposed to a hospital
network needs on top:

- **a bound on clients**: at most :data:`MAX_CLIENTS` connections are served at once;
  more are closed at once (a scraper or a browser retries), so a flood costs sockets,
  not threads;
- **a time bound on everything**: a connection has :data:`CLIENT_TIMEOUT` in all for
  its TLS handshake, its request and the answer — then its socket is shut down, so a
  silent client, or one sending a byte at a time, frees its slot; one request per
  connection (HTTP/1.0 answers: no keep-alive holding a slot between scrapes);
- **TLS off the accept loop**: the handshake runs in the connection's own thread
  (a client that connects and says nothing must not stop the others, as it would in
  ``ssl.SSLContext.wrap_socket`` on the listening socket);
- **basic auth** (:mod:`pipeline.http_auth`) on every path but the ones a load
  balancer must reach without credentials (``open_paths``);
- GET and HEAD only: everything is read-only.

The routes are the daemon's (:mod:`services.web`): a :data:`Route` takes the path and
query and returns a :class:`Response`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from pipeline.http_auth import authorized
from pipeline.log import escape, logger

MAX_CLIENTS = 16          # connections served at once; more are closed
CLIENT_TIMEOUT = 10.0     # seconds for a client's handshake, request and answer
LISTEN_BACKLOG = 32
REALM = "DicomFlow"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


#: a route: (path, query) -> Response
Route = Callable[[str, dict[str, list[str]]], Response]


def not_found(path: str) -> Response:
    return Response(404, f"not found: {escape(path, 200)}\n".encode())


class WebServer(ThreadingHTTPServer):
    """Serves ``routes`` (path -> handler) on ``address``; TLS when ``tls`` is given,
    basic auth when ``users`` is (except on ``open_paths``)."""

    daemon_threads = True
    block_on_close = False  # stopping never waits for a client (each is bounded anyway)
    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], routes: dict[str, Route], *,
                 tls: ssl.SSLContext | None = None, users: dict[str, str] | None = None,
                 open_paths: frozenset[str] = frozenset(), max_clients: int = MAX_CLIENTS,
                 client_timeout: float = CLIENT_TIMEOUT) -> None:
        self.routes = routes
        self.tls = tls
        self.users = users
        self.open_paths = open_paths
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self._slots = threading.BoundedSemaphore(max_clients)
        self._refused = 0          # connections closed for want of a slot, not yet said
        self._refused_said = 0.0   # when that was last logged (monotonic)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def _refuse(self, request: socket.socket, client_address) -> None:  # type: ignore[no-untyped-def]
        """Close at once; say so at most once a minute (a flood must not flood the log)."""
        self.shutdown_request(request)
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_said >= 60.0:
            logger.warning("web: {} clients at once: {} connection(s) closed (the last from {})",
                           self.max_clients, self._refused, escape(client_address[0]))
            self._refused, self._refused_said = 0, now

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        # the whole connection's bound: a read timeout alone lets a client that sends a
        # byte every few seconds keep its slot for ever
        current = [request]  # the TLS socket replaces it (wrap_socket detaches the plain one)
        cut = threading.Timer(self.client_timeout, lambda: _cut(current[0]))
        cut.daemon = True
        cut.start()
        try:
            request.settimeout(self.client_timeout)
            if self.tls is not None:
                request = self._handshake(request, client_address)
                if request is None:
                    return
                current[0] = request
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            self._slots.release()

    def _handshake(self, sock: socket.socket, client_address) -> ssl.SSLSocket | None:  # type: ignore[no-untyped-def]
        assert self.tls is not None
        try:
            return self.tls.wrap_socket(sock, server_side=True)
        except Exception as exc:  # noqa: BLE001 - a client's bad handshake is its own problem
            logger.info("web: TLS handshake with {} failed: {}", escape(client_address[0]),
                        escape(exc))
            self.shutdown_request(sock)
            return None

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away, or its time was up
            logger.debug("web: connection from {} ended: {}", escape(client_address[0]),
                         escape(error))
            return
        logger.opt(exception=True).warning("web: error answering {}", escape(client_address[0]))

    def respond(self, path: str, query: dict[str, list[str]], authorization: str | None
                ) -> Response:
        if self.users is not None and path not in self.open_paths and \
                not authorized(authorization, self.users):
            return Response(401, b"authentication required\n",
                            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
        route = self.routes.get(path)
        if route is None:
            return not_found(path)
        return route(path, query)


def _cut(sock: socket.socket) -> None:
    """A connection's time is up: shut its socket down (the handler's next read or
    write fails and its thread ends; the slot is released there)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = "DicomFlow"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive slot

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        parts = urlsplit(self.path)
        try:
            response = self.server.respond(parts.path, parse_qs(parts.query, keep_blank_values=True),
                                           self.headers.get("Authorization"))
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the daemon
            logger.opt(exception=True).error("web: {} failed: {}", escape(parts.path, 200),
                                             escape(exc))
            response = Response(500, b"internal error (see the web daemon's log)\n")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        logger.debug("web: {} {}", escape(self.client_address[0]), escape(format % args, 300))
