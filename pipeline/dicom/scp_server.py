"""The listening side's server: pynetdicom's threaded server and request handler with
the fixes a production listener needs (README, Design notes: *TLS*; Security).

:class:`DicomFlowServer` checks the source-network allow-list, bounds the connections
that have not negotiated an association yet, gives each connection one negotiation
deadline and does the TLS handshake in the connection's own thread;
:func:`build_ssl_context` makes the server-side TLS context from ``[router]``.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from typing import Any, NamedTuple

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pipeline.config import TlsConfig
from pipeline.dicom import pdu_guard
from pipeline.log import escape, logger

PENDING_LOG_INTERVAL = 10.0  # seconds between log lines about refused pending connections


class _Pending(NamedTuple):
    """A connection accepted but not yet associated: who, and by when it must be."""

    address: Any
    deadline: float  # time.monotonic() by which its A-ASSOCIATE-RQ must have arrived


class DicomFlowRequestHandler(RequestHandler):
    """pynetdicom's request handler, passing the connection's negotiation deadline on
    to its association (the PDU reader enforces it)."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        negotiating = getattr(self.server, "negotiating", None)  # DicomFlowServer's
        pdu_guard.negotiation_deadline(assoc, getattr(negotiating, "deadline", None))
        return assoc


class DicomFlowServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the fixes a production listener needs.

    * The TLS handshake happens in the connection's own thread with a timeout, not in
      the accept loop: one silent TCP client no longer blocks every new TLS
      association (README, Design notes).
    * ``verify_request`` enforces the source-network allow-list before any DICOM (an
      IPv4 client of a dual-stack ``::`` listener is matched by its IPv4 address).
    * At most ``max_pending`` connections may be between accept and association; more
      are closed at once, so connections that never negotiate cannot multiply threads.
    * Each connection has one deadline (``negotiation_timeout`` after accept) for
      everything before its association: speaking at all, the TLS handshake and the
      whole A-ASSOCIATE-RQ.
    * ``reuse_port`` (``[router] receive_processes`` > 1) binds with ``SO_REUSEPORT``,
      so several receive processes listen on one port and the kernel spreads new
      connections over them. Only then: with one process the bind stays exclusive,
      and a second router started on the same port by mistake fails to listen.
    """

    def __init__(self, *args: Any, allowed_networks: tuple = (), max_pending: int = 32,
                 negotiation_timeout: float = 30.0, handshake_timeout: float = 10.0,
                 reuse_port: bool = False, **kwargs: Any) -> None:
        self.reuse_port = reuse_port
        self.allowed_networks = allowed_networks
        self.max_pending = max_pending
        self.negotiation_timeout = negotiation_timeout
        self.handshake_timeout = handshake_timeout
        self.negotiating = threading.local()  # the deadline of this thread's connection
        self._starting = 0  # connections in their thread, before an Association exists
        self._pending_lock = threading.Lock()
        self._refused_pending = 0
        self._refused_logged = -1e9
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # ``bind = ::`` means every address, IPv4 included, whatever the system default
        # (net.ipv6.bindv6only) says.
        assert self.socket is not None
        if self.address_family == socket.AF_INET6 and self.server_address[0] in ("::", ""):
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        if self.reuse_port:
            # Every process sharing the port sets it before its bind (the kernel then
            # requires the same user); a process without it cannot join, nor they it.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        try:
            address = ipaddress.ip_address(client_address[0])
        except ValueError:
            return False
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        if any(a in network for a in candidates for network in self.allowed_networks
               if a.version == network.version):
            return True
        logger.warning("refused connection from {} (not in allowed_networks)",
                       escape(client_address[0]))
        return False

    def pending_connections(self) -> int:
        """Connections accepted whose association is not negotiated (yet)."""
        with self._pending_lock:
            starting = self._starting
        return starting + sum(
            1 for a in self.active_associations
            if not (a.is_established or a.is_released or a.is_aborted or a.is_rejected))

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accept loop: refuse beyond ``max_pending``, else start the thread."""
        if self.pending_connections() >= self.max_pending:
            self._refuse_pending(client_address)
            self.shutdown_request(request)
            return
        with self._pending_lock:
            self._starting += 1
        deadline = time.monotonic() + self.negotiation_timeout
        try:
            super().process_request(request, _Pending(client_address, deadline))
        except Exception:
            with self._pending_lock:
                self._starting -= 1
            raise

    def _refuse_pending(self, client_address: Any) -> None:
        """One log line per burst of refusals (an attack must not flood the log)."""
        self._refused_pending += 1
        now = time.monotonic()
        if now - self._refused_logged >= PENDING_LOG_INTERVAL:
            logger.warning("refused connection from {}: {} connections not yet associated "
                           "(max_pending_connections); {} refused since the last report",
                           escape(client_address[0]), self.max_pending, self._refused_pending)
            self._refused_logged = now
            self._refused_pending = 0

    def process_request_thread(self, request: Any, pending: Any) -> None:
        client_address, deadline = pending
        try:
            request = self._open(request, client_address, deadline)
            if request is None:
                return
            self.negotiating.deadline = deadline
            # accept() returns a blocking socket: reads time out instead (and the PDU
            # reader bounds each PDU as a whole).
            request.settimeout(self.ae.network_timeout)
            super().process_request_thread(request, client_address)
        finally:
            self.negotiating.deadline = None
            with self._pending_lock:
                self._starting -= 1

    def _open(self, request: Any, client_address: Any, deadline: float) -> Any:
        """Wait for the first byte, then the TLS handshake, all by ``deadline``; the
        socket to use, or None (closed) for a client that did not make it.

        A connection that sends nothing (a port probe, a silent client) would hold an
        association slot until the ACSE timeout: only a peer that speaks gets one."""
        try:
            request.settimeout(max(deadline - time.monotonic(), 0.001))
            spoke = request.recv(1, socket.MSG_PEEK)
        except OSError:
            spoke = b""
        if not spoke:
            self.shutdown_request(request)
            return None
        if self.ssl_context is None:
            return request
        try:
            # CPython bounds a handshake as a whole by the socket's timeout (not per
            # read), so a client trickling its ClientHello is dropped in time too.
            request.settimeout(max(min(deadline - time.monotonic(), self.handshake_timeout), 0.001))
            return self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            logger.warning("TLS handshake with {} failed: {}", escape(client_address[0]),
                           escape(exc))
            self.shutdown_request(request)
            return None


def build_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """A server-side TLS context, or None for plain DICOM."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert and tls.key:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca:
        # A configured CA always verifies: a client certificate it did not sign fails the
        # handshake; tls_require_client_cert decides whether a client may present none.
        context.load_verify_locations(str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
