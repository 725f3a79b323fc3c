"""``dicomflow web``: the HTTP daemon — metrics, health, and a read-only status page.

Runs under supervisord like the others when ``[web] enabled = true`` in router.ini,
on ``[web] bind`` (127.0.0.1 by default) and ``port``; HTTPS with ``tls_cert`` and
``tls_key``, basic auth with ``auth_file``. Its paths:

- ``/metrics`` — Prometheus text format (:mod:`pipeline.web.metrics`);
- ``/healthz`` — 200 when this node can take images, 503 with the reasons otherwise
  (:mod:`pipeline.web.health`); ``/healthz?full`` also checks the senders. Never behind
  basic auth: load balancers probe without credentials, and it tells nothing but
  states;
- ``/`` — the status page (:mod:`services.status_page`); ``/api/status`` — the same
  JSON as ``dicomflow status --json``.

It reads the spool and the journal, and writes nothing but its lock: stopping it never
affects routing. One small daemon on the skeleton of :mod:`pipeline.daemon`: the HTTP
server runs in its own thread, the main thread waits for a stop signal.
"""

from __future__ import annotations

import json
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable

from pipeline import log as logmod
from pipeline.config import Config
from pipeline.daemon import Signals, Step, run
from pipeline.dicom import scu
from pipeline.http_auth import load_users
from pipeline.journal import events as kinds
from pipeline.journal import reader, store
from pipeline.journal.tail import Tail
from pipeline.lock import DaemonLock
from pipeline.log import escape, logger
from pipeline.spool import Spool
from pipeline.web import health
from pipeline.web.metrics import Metrics
from pipeline.web.server import Response, Route, WebServer
from services import status, status_page

NAME = "web"
FAILURE_KINDS = (kinds.FAILED, kinds.QUARANTINED)
FAILURES_SHOWN = 20
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEALTH_FRESH = 1.0  # seconds a /healthz answer is reused


class WebApp:
    """The routes, bound to one configuration (no globals)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.journal_path = store.journal_path(Spool(config.spool).run_dir)
        self.metrics = Metrics(Tail(self.journal_path), self.report, self.disk,
                               endpoints=config.endpoints)
        self.receiver = health.receiver_address(config)
        self.health_cache = HealthCache(self.check_health)

    def routes(self) -> dict[str, Route]:
        return {"/metrics": self.get_metrics, "/healthz": self.get_health, "/": self.get_page,
                "/api/status": self.get_status}

    # -- what the routes read --------------------------------------------------------

    def report(self) -> dict:
        return status.collect(self.config)

    def disk(self) -> tuple[int, int]:
        return health.disk_space(self.config)

    def echo(self) -> str | None:
        router, web = self.config.router, self.config.router.web
        host, port = self.receiver
        try:
            return scu.echo_receiver(host, port, router.ae_title, router.ae_title,
                                     web.health_timeout, tls=router.tls.enabled)
        except Exception as exc:  # noqa: BLE001 - a receiver leaving mid-echo is an answer
            return f"the C-ECHO to the receiver failed: {type(exc).__name__}: {escape(exc)}"

    def check_health(self, full: bool) -> health.Health:
        """The checks, from the cheap report (locks and state files, no folder counted)."""
        return health.check(self.config, status.daemons(self.config), self.echo, full=full)

    def failures(self) -> tuple[list[reader.Entry], str]:
        """The newest failures in the journal, and a note when it cannot say."""
        if not self.config.router.journal:
            return [], "the journal is off ([router] journal = false): failures are in failed/"
        try:
            conn = reader.open_read(self.journal_path)
        except reader.JournalMissing as exc:  # none yet, or one that cannot be read
            return [], "none in the journal" if not self.journal_path.exists() else str(exc)
        try:
            return reader.latest(conn, FAILURE_KINDS, FAILURES_SHOWN), ""
        except sqlite3.DatabaseError as exc:
            return [], f"the journal cannot be read ({escape(exc)})"
        finally:
            conn.close()

    # -- the routes ------------------------------------------------------------------

    def get_metrics(self, path: str, query: dict[str, list[str]]) -> Response:
        return Response(200, self.metrics.exposition(), METRICS_TYPE)

    def get_health(self, path: str, query: dict[str, list[str]]) -> Response:
        answer = self.health_cache.get("full" in query)
        return Response(answer.status, answer.text().encode())

    def get_page(self, path: str, query: dict[str, list[str]]) -> Response:
        failures, note = self.failures()
        page = status_page.render(self.report(), failures, self.config.router.web.refresh, note)
        return Response(200, page.encode(), "text/html; charset=utf-8")

    def get_status(self, path: str, query: dict[str, list[str]]) -> Response:
        body = json.dumps(self.report(), indent=2).encode() + b"\n"
        return Response(200, body, "application/json")


class HealthCache:
    """``/healthz`` answers from a check at most :data:`HEALTH_FRESH` seconds old, made
    by one request at a time: load balancers probing every second from several nodes
    cost the receiver one C-ECHO association per second, not one per probe, and
    anonymous clients cannot take its association slots."""

    def __init__(self, check: Callable[[bool], health.Health]) -> None:
        self.check = check
        self._lock = threading.Lock()
        self._answers: dict[bool, tuple[float, health.Health]] = {}

    def get(self, full: bool) -> health.Health:
        with self._lock:
            made = self._answers.get(full)
            if made is None or time.monotonic() - made[0] > HEALTH_FRESH:
                made = (time.monotonic(), self.check(full))
                self._answers[full] = made
            return made[1]


class WebDaemon:
    """The server thread, started and stopped by :func:`pipeline.daemon.run`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.app = WebApp(config)
        self.stopping = False
        self._stop = threading.Event()
        self.server: WebServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        web = self.config.router.web
        users = load_users(web.auth_file) if web.auth_file is not None else None
        self.server = WebServer((web.bind, web.port), self.app.routes(), tls=_tls(self.config),
                                users=users, open_paths=frozenset({"/healthz"}))
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="web-server", daemon=True)
        self._thread.start()
        logger.info("web listening on {}://{}:{} (metrics /metrics, health /healthz, page /){}",
                    web.scheme, web.bind, web.port, ", basic auth" if users else "")

    def step(self) -> Step:
        return Step(None, idle=True) if self.stopping else Step(3600.0, idle=True)

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def request_stop(self) -> None:
        self.stopping = True
        self._stop.set()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.app.metrics.tail.close()
        logger.info("web stopped")


def _tls(config: Config) -> ssl.SSLContext | None:
    web = config.router.web
    if web.tls_cert is None or web.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(web.tls_cert), str(web.tls_key))
    return context


def main(config: Config) -> int:
    router = config.router
    logmod.setup_daemon(NAME, router)
    spool = Spool(router.spool).create(config.endpoints)
    with DaemonLock(spool.run_dir, NAME):
        daemon = WebDaemon(config)
        try:
            with Signals(daemon.request_stop):
                return run(daemon)
        except OSError as exc:
            logger.error("web: cannot listen on {}:{}: {}", router.web.bind, router.web.port,
                         exc.strerror or exc)
            return 1
        except ValueError as exc:  # the users file changed since the configuration check
            logger.error("web: [web] auth_file: {}", exc)
            return 1
