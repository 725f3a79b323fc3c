"""``dicomflow receive``: the C-STORE SCP that takes images into ``incoming/``.

One small daemon in the manner of pynetdicom's ``apps/storescp``: handlers are bound
to a :class:`Receiver` that holds its dependencies; nothing lives in module globals.

The promise it keeps (README, Design notes: promise 1): a C-STORE success (0x0000) is answered only after
the file is written, fsynced, renamed into ``incoming/`` and the directory fsynced.
Datasets stream to disk (pynetdicom's chunked receive, with the temp directory on the
spool's filesystem so publishing is a rename) so memory does not grow with object size.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import ssl
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pipeline import log as logmod
from pipeline.config import Config, TlsConfig
from pipeline.dicom import patches, pdu_guard
from pipeline.dicom.filemeta import stamp_ae_titles
from pipeline.intake import Command, Refusal, check_received, pad_deflated
from pipeline.lock import DaemonLock
from pipeline.log import escape, logger
from pipeline.names import is_valid_uid
from pipeline.spool import Spool

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
SHUTDOWN_GRACE = 25.0  # seconds to let in-flight associations finish on SIGTERM
TMP_SWEEP_INTERVAL = 60.0
PENDING_LOG_INTERVAL = 10.0  # seconds between log lines about refused pending connections


class _Pending(NamedTuple):
    """A connection accepted but not yet associated: who, and by when it must be."""

    address: Any
    deadline: float  # time.monotonic() by which its A-ASSOCIATE-RQ must have arrived


class _DicomFlowRequestHandler(RequestHandler):
    """pynetdicom's request handler, passing the connection's negotiation deadline on
    to its association (the PDU reader enforces it)."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        pdu_guard.negotiation_deadline(assoc, getattr(self.server.negotiating, "deadline", None))
        return assoc


class _DicomFlowServer(ThreadedAssociationServer):
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
    """

    def __init__(self, *args: Any, allowed_networks: tuple = (), max_pending: int = 32,
                 negotiation_timeout: float = 30.0, handshake_timeout: float = 10.0,
                 **kwargs: Any) -> None:
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


class Receiver:
    """The receive daemon: owns the AE, the server and the store handler."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.router = config.router
        self.spool = spool
        self.stop_requested = threading.Event()
        self.server: _DicomFlowServer | None = None
        self.stored = 0
        self.refused = 0

    # -- set-up -------------------------------------------------------------

    def build_ae(self) -> AE:
        router = self.router
        ae = AE(ae_title=router.ae_title)
        # Only negotiated associations take one of max_associations (pdu_guard); the
        # connections still negotiating are bounded by max_pending_connections.
        pdu_guard.established_limit(ae, router.max_associations)
        ae.maximum_associations = router.max_associations + router.max_pending_connections
        ae.acse_timeout = router.acse_timeout
        ae.dimse_timeout = router.dimse_timeout
        ae.network_timeout = router.network_timeout
        ae.maximum_pdu_size = router.max_pdu
        ae.require_called_aet = True
        if router.allowed_calling_aets:
            ae.require_calling_aet = list(router.allowed_calling_aets)
        # Storage contexts: every SOP class (private ones too) with whatever transfer
        # syntax is proposed — see configure_pynetdicom (UNRESTRICTED_STORAGE_SERVICE).
        ae.add_supported_context(Verification)
        return ae

    def handlers(self) -> list:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ESTABLISHED, self.handle_established),
        ]

    # -- handlers -----------------------------------------------------------

    def handle_conn_open(self, event: evt.Event) -> None:
        """Nagle off (small files: ~17 → ~60/s, README: Design notes), keepalive on."""
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass

    def handle_established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        logger.debug("association from {} ({}:{})", escape(requestor.ae_title),
                     escape(requestor.address), requestor.port)

    def handle_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        logger.warning("association from {} calling {!s} at {} rejected",
                       escape(requestor.ae_title), escape(event.assoc.acceptor.ae_title),
                       escape(requestor.address))

    def handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """Publish the received file durably, then (and only then) answer success."""
        request = event.request
        uid = request.AffectedSOPInstanceUID
        calling = event.assoc.requestor.ae_title
        try:
            path = Path(event.dataset_path)
        except (AttributeError, ValueError):
            logger.error("store from {}: no dataset on disk", escape(calling))
            return STATUS_CANNOT_UNDERSTAND
        if not is_valid_uid(str(uid or "")) or not is_valid_uid(str(request.AffectedSOPClassUID or "")):
            self.refused += 1
            logger.warning("refused store from {}: invalid SOP Instance/Class UID {!s}",
                           escape(calling), escape(uid))
            return STATUS_CANNOT_UNDERSTAND
        if not self._enough_space():
            self.refused += 1
            return STATUS_OUT_OF_RESOURCES
        refusal = self._unroutable(path, event)
        if refusal is not None:
            self.refused += 1
            logger.warning("refused store of {} from {}: {}", escape(uid), escape(calling),
                           refusal.comment)
            return _failure(refusal)
        try:
            if pad_deflated(path, str(event.context.transfer_syntax)):
                logger.debug("{}: odd-length deflated data set padded to even length", escape(uid))
            stamp_ae_titles(path, calling, event.assoc.acceptor.ae_title)
            target = self.spool.publish_new(path, self.spool.incoming, str(uid))
        except OSError as exc:
            self.refused += 1
            logger.error("cannot store {} from {}: {}", escape(uid), escape(calling),
                         escape(exc.strerror or exc))
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # never let a handler exception become 0xC211
            self.refused += 1
            logger.exception("cannot store {} from {}: {}", escape(uid), escape(calling), escape(exc))
            return STATUS_OUT_OF_RESOURCES
        self.stored += 1
        logger.bind(file=target.name).info("stored from {}", escape(calling))
        return STATUS_SUCCESS

    def _unroutable(self, path: Path, event: evt.Event) -> Refusal | None:
        """Why the received data set cannot be routed (and must not be acknowledged).

        The filter would quarantine it: answering success would let the modality delete
        its only copy. Only cheap, seek-only checks (see :mod:`pipeline.intake`).
        """
        uid = str(event.request.AffectedSOPInstanceUID)
        command = Command(str(event.request.AffectedSOPClassUID), uid,
                          str(event.context.transfer_syntax))
        try:
            check_received(path, command, self.router.header_limits)
        except Refusal as refusal:
            return refusal
        except OSError as exc:
            return Refusal(STATUS_OUT_OF_RESOURCES, f"cannot read the received data set: "
                                                    f"{escape(exc.strerror or exc, 40)}")
        except Exception:  # a bug in a check must not refuse (or 0xC211) a good file
            logger.exception("cannot check the data set of {}; the filter will", escape(uid))
        return None

    def _enough_space(self) -> bool:
        """Keep the disk floor: prune ``sent/`` oldest-first, else refuse (0xA700)."""
        floor = self.router.disk_floor(self.spool.total_bytes())
        if self.spool.free_bytes() >= floor:
            return True
        pruned = self.spool.prune_sent(until_free=floor)
        if pruned:
            logger.warning("disk floor reached: pruned {} delivered file(s) from sent/", pruned)
        if self.spool.free_bytes() >= floor:
            return True
        logger.error("refusing store: free space in {} below the floor of {} bytes",
                     self.spool.root, floor)
        return False

    # -- running ------------------------------------------------------------

    def start(self) -> _DicomFlowServer:
        ae = self.build_ae()
        server = ae.make_server(
            (self.router.bind, self.router.port),
            evt_handlers=self.handlers(),
            ssl_context=build_ssl_context(self.router.tls),
            server_class=_DicomFlowServer,
            request_handler=_DicomFlowRequestHandler,
            allowed_networks=self.router.allowed_networks,
            max_pending=self.router.max_pending_connections,
            negotiation_timeout=self.router.acse_timeout,
        )
        ae._servers.append(server)  # what start_server does; shutdown() removes it
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        self.server = server
        return server

    def run(self, once: bool = False) -> int:
        """Serve until SIGTERM (or, with ``once``, return right after starting)."""
        server = self.start()
        logger.info("listening as {} on {}:{} (spool {})", self.router.ae_title,
                    self.router.bind, self.router.port, self.spool.root)
        if once:
            return 0
        next_sweep = time.monotonic() + TMP_SWEEP_INTERVAL
        while not self.stop_requested.wait(1.0):
            if time.monotonic() >= next_sweep:
                self._sweep_tmp()
                next_sweep = time.monotonic() + TMP_SWEEP_INTERVAL
        self.shutdown(server)
        return 0

    def shutdown(self, server: _DicomFlowServer) -> None:
        """Stop accepting, let established associations finish (bounded), then close.

        Connections that never completed association negotiation carry no stores:
        they are dropped at once rather than waited for.
        """
        def in_flight() -> list:
            return [a for a in server.active_associations if a.is_established]

        logger.info("stopping: no new associations; {} in flight", len(in_flight()))
        server.shutdown()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            if assoc.is_established:
                logger.warning("aborting association from {} at shutdown (its unacknowledged "
                               "store is not kept)", escape(assoc.requestor.ae_title))
            assoc.abort()
        logger.info("stopped ({} stored, {} refused)", self.stored, self.refused)

    def request_stop(self, *_: object) -> None:
        self.stop_requested.set()

    def _sweep_tmp(self) -> None:
        """Remove temp files of transfers that died (aborted, ENOSPC) long ago."""
        age = max(300.0, 2 * self.router.network_timeout)
        removed = self.spool.clean_tmp(self.spool.incoming, older_than=age)
        if removed:
            logger.info("removed {} abandoned temp file(s)", removed)


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
    logger.warning("{}: {}", category.__name__, escape(str(message)))


def _failure(refusal: Refusal) -> Dataset:
    """A C-STORE failure status with its Error Comment (LO: at most 64 characters)."""
    status = Dataset()
    status.Status = refusal.status
    status.ErrorComment = refusal.comment.encode("ascii", "replace").decode("ascii")[:64]
    return status


def configure_pynetdicom(spool: Spool) -> None:
    """Process-wide pynetdicom settings of the receive daemon (README, Design notes)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    # Accept every storage SOP class, private and unknown ones included, in any
    # transfer syntax (compressed included): we store the bytes as sent.
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # The chunked temp file lives on the spool's filesystem: publishing is a rename.
    tempfile.tempdir = str(spool.incoming / ".tmp")
    # pydicom's value checks (on with DICOMFLOW_FASTPATH=0) warn with the peer's value in
    # the text: one escaped log line, not a raw line on stderr.
    warnings.showwarning = _warning_to_log


def main(config: Config) -> int:
    router = config.router
    logmod.setup("receive", router.log_level, router.log_json, router.pynetdicom_log_level)
    patches.install("receive")
    spool = Spool(router.spool).create(config.endpoints)
    with DaemonLock(spool.run_dir, "receive"):
        removed = spool.clean_tmp(spool.incoming)
        spool.clean_dead_tmp(spool.run_dir)
        if removed:
            logger.info("removed {} stale temp file(s) from incoming/.tmp", removed)
        configure_pynetdicom(spool)
        receiver = Receiver(config, spool)
        signal.signal(signal.SIGTERM, receiver.request_stop)
        signal.signal(signal.SIGINT, receiver.request_stop)
        try:
            return receiver.run()
        except OSError as exc:
            logger.error("cannot listen on {}:{}: {}", router.bind, router.port, exc.strerror or exc)
            return 1
