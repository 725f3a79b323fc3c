"""The listening side of the network boundary: the receive daemon's AE and what it hears.

:class:`Listener` sets up pynetdicom's AE from ``[router]`` (contexts, called-AE check,
timeouts, finite maximum PDU, the established-association limit of :mod:`pdu_guard`,
TLS) and serves it with :class:`~pipeline.dicom.scp_server.DicomFlowServer`. pynetdicom's
events are translated into DicomFlow's own types before the daemon sees them: a C-STORE
becomes a :class:`StoreRequest`, association events an :class:`AssociationInfo`; the
daemon answers a store with a status or a :class:`~pipeline.errors.Refusal`, which is
turned back into pynetdicom's status data set here. So ``services/receive.py`` never
imports pynetdicom (README, Design notes for contributors).

Modality Performed Procedure Step (N-CREATE, N-SET) is offered when the listener is
given an :class:`~pipeline.studies.mpps.MppsStore`: the handlers hand it the decoded
data set and answer its status, which it returns once the record is durable. The
receive data path serves C-STORE and C-ECHO only, so an association that proposes
MPPS is left to pynetdicom's path (:func:`store_receive.decline`, before negotiation).
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config, evt

from pipeline.config import RouterConfig
from pipeline.dicom import pdu_guard, store_receive
from pipeline.dicom.scp_server import DicomFlowRequestHandler, DicomFlowServer, build_ssl_context
from pipeline.errors import Refusal
from pipeline.log import escape, logger
from pipeline.studies.mpps import MPPS_SOP_CLASS, STATUS_PROCESSING_FAILURE, MppsStore

STATUS_SUCCESS = 0x0000
VERIFICATION = UID("1.2.840.10008.1.1")
SHUTDOWN_POLL = 0.05  # seconds between looks at the associations still in flight
ABORT_WAIT = 2.0  # seconds for an association on the receive data path to send its A-ABORT


@dataclass(frozen=True)
class Peer:
    """One end of an association, as its A-ASSOCIATE-RQ and its socket say."""

    ae_title: str
    address: str
    port: int


@dataclass(frozen=True)
class AssociationInfo:
    """An association as the daemon logs it: who called (and from where), and us.

    ``called_ae`` is the acceptor's AE title, i.e. ours: for an established association
    that is the title the peer called (the called-AE check passed); for a rejected one
    it is still ours, not what the peer asked for."""

    calling: Peer
    called_ae: str
    #: the association thread's ident: tells apart two associations of one peer
    association_id: int | None


@dataclass(frozen=True)
class StoreRequest:
    """A received C-STORE: the data set already on disk, and what the command announced.

    ``dataset_path`` is the temp file the data set was received into (on the spool, see
    :func:`configure`: pynetdicom's chunked receive, or :mod:`store_receive`), ``None``
    if there is none. UIDs are as received
    (``""`` when absent), not validated: that is the daemon's decision.
    """

    dataset_path: Path | None
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    association: AssociationInfo
    #: the file meta's AE-title slots already hold the calling/called titles (the
    #: receive data path writes them with the meta; pynetdicom's path leaves them blank)
    ae_titles_written: bool = False

    @property
    def calling_ae(self) -> str:
        return self.association.calling.ae_title

    @property
    def called_ae(self) -> str:
        return self.association.called_ae


class Application(Protocol):
    """What a :class:`Listener` answers with (the receive daemon)."""

    def on_store(self, request: StoreRequest) -> int | Refusal:
        """The C-STORE status to answer: an int, or a Refusal (status + Error Comment)."""
        ...

    def on_established(self, info: AssociationInfo) -> None: ...

    def on_rejected(self, info: AssociationInfo) -> None: ...


class Listener:
    """The SCP listening on ``[router] bind``/``port`` and answering through ``app``."""

    def __init__(self, router: RouterConfig, app: Application,
                 mpps: MppsStore | None = None) -> None:
        self.router = router
        self.app = app
        #: where N-CREATE / N-SET of Modality Performed Procedure Steps are recorded;
        #: None: the MPPS SOP class is not offered
        self.mpps = mpps
        self.server: DicomFlowServer | None = None

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
        # syntax is proposed — see configure (UNRESTRICTED_STORAGE_SERVICE).
        ae.add_supported_context(VERIFICATION)
        if self.mpps is not None:
            ae.add_supported_context(MPPS_SOP_CLASS)
        return ae

    def handlers(self) -> list:
        return [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_N_CREATE, self._on_n_create),
            (evt.EVT_N_SET, self._on_n_set),
        ]

    def start(self) -> None:
        """Bind and serve in a thread of its own. Raises OSError if it cannot listen."""
        ae = self.build_ae()
        server = ae.make_server(
            (self.router.bind, self.router.port),
            evt_handlers=self.handlers(),
            ssl_context=build_ssl_context(self.router.tls),
            server_class=DicomFlowServer,
            request_handler=DicomFlowRequestHandler,
            allowed_networks=self.router.allowed_networks,
            max_pending=self.router.max_pending_connections,
            negotiation_timeout=self.router.acse_timeout,
            reuse_port=self.router.receive_processes > 1,
        )
        assert isinstance(server, DicomFlowServer)
        ae._servers.append(server)  # what start_server does; shutdown() removes it
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        self.server = server

    def in_flight(self) -> int:
        """Established associations (the ones that may carry a store)."""
        return len(_established(self.server)) if self.server is not None else 0

    def close(self, grace: float) -> None:
        """Stop accepting, let established associations finish (within ``grace``
        seconds), then abort whatever is left.

        Connections that never completed association negotiation carry no stores:
        they are dropped at once rather than waited for.
        """
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace
        while _established(server) and time.monotonic() < deadline:
            time.sleep(SHUTDOWN_POLL)
        ours = []
        for assoc in server.active_associations:
            if assoc.is_established:
                logger.warning("aborting association from {} at shutdown (its unacknowledged "
                               "store is not kept)", escape(assoc.requestor.ae_title))
            if store_receive.abort(assoc):
                ours.append(assoc)  # its own thread sends the A-ABORT
            else:
                assoc.abort()
        deadline = time.monotonic() + ABORT_WAIT
        for assoc in ours:
            assoc.join(max(deadline - time.monotonic(), 0.0))

    # -- pynetdicom events -> DicomFlow's types ------------------------------

    def _on_store(self, event: evt.Event) -> int | Dataset:
        answer = self.app.on_store(store_request(event))
        return failure_status(answer) if isinstance(answer, Refusal) else answer

    def _on_conn_open(self, event: evt.Event) -> None:
        _tune_socket(event.assoc)
        store_receive.prepare(event.assoc, self._store_handler(event.assoc))

    def _store_handler(self, assoc: Any) -> store_receive.StoreHandler:
        """What the receive data path calls for each data set of this association."""
        def on_store(path: Path | None, sop_class: str, instance: str, syntax: str) -> int | Refusal:
            request = StoreRequest(path, sop_class, instance, syntax, association_info(assoc),
                                   ae_titles_written=path is not None)
            return self.app.on_store(request)
        return on_store

    def _on_established(self, event: evt.Event) -> None:
        self.app.on_established(association_info(event.assoc))

    def _on_rejected(self, event: evt.Event) -> None:
        self.app.on_rejected(association_info(event.assoc))

    def _on_requested(self, event: evt.Event) -> None:
        """An association that proposes MPPS stays on pynetdicom's path: the receive
        data path (:mod:`store_receive`) serves C-STORE and C-ECHO only, and the
        hand-over to it is decided before the first command arrives."""
        if self.mpps is not None and proposes(event.assoc, MPPS_SOP_CLASS):
            store_receive.decline(event.assoc)

    def _on_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-CREATE of a step: recorded durably before the answer. Without an Affected
        SOP Instance UID in the request we make one and answer it (PS3.7 10.1.5.1.4)."""
        request: Any = event.request
        uid = _uid(request.AffectedSOPInstanceUID)
        reply: Dataset | None = None
        if request.AffectedSOPInstanceUID is None:
            uid = str(generate_uid())
            reply = Dataset()
            reply.AffectedSOPInstanceUID = uid
        status = self._record(event, lambda store, ds, source: store.create(uid, ds, source))
        return status, reply if status == STATUS_SUCCESS else None

    def _on_n_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request: Any = event.request
        uid = _uid(request.RequestedSOPInstanceUID)
        return self._record(event, lambda store, ds, source: store.update(uid, ds, source)), None

    def _record(self, event: evt.Event, action: Any) -> int:
        """Decode the attribute/modification list and hand it to the store; never raise
        (pynetdicom would log a traceback): a data set we cannot decode is 0x0110."""
        if self.mpps is None:
            return STATUS_PROCESSING_FAILURE
        source = str(event.assoc.requestor.ae_title)
        try:
            ds = (event.attribute_list if event.event is evt.EVT_N_CREATE
                  else event.modification_list)
        except Exception as exc:  # noqa: BLE001 - the peer's bytes
            logger.warning("MPPS from {!r}: cannot decode the data set: {}", escape(source),
                           escape(exc, 120))
            return STATUS_PROCESSING_FAILURE
        try:
            return int(action(self.mpps, ds, source))
        except Exception:  # a bug must cost this message only
            logger.exception("MPPS from {!r}: internal error", escape(source))
            return STATUS_PROCESSING_FAILURE


def proposes(assoc: Any, abstract_syntax: str) -> bool:
    """True when the A-ASSOCIATE-RQ proposes a presentation context for that SOP class."""
    primitive = assoc.requestor.primitive
    contexts = getattr(primitive, "presentation_context_definition_list", None) or []
    return any(str(cx.abstract_syntax) == abstract_syntax for cx in contexts)


def _established(server: DicomFlowServer) -> list:
    return [a for a in server.active_associations if a.is_established]


def association_info(assoc: Any) -> AssociationInfo:
    requestor = assoc.requestor
    return AssociationInfo(Peer(requestor.ae_title, requestor.address, requestor.port),
                           assoc.acceptor.ae_title, assoc.ident)


def store_request(event: evt.Event) -> StoreRequest:
    request: Any = event.request  # a C_STORE primitive
    try:
        path: Path | None = Path(event.dataset_path)
    except (AttributeError, ValueError):
        path = None
    return StoreRequest(path, _uid(request.AffectedSOPClassUID),
                        _uid(request.AffectedSOPInstanceUID),
                        str(event.context.transfer_syntax), association_info(event.assoc))


def _uid(value: Any) -> str:
    return "" if value is None else str(value)


def failure_status(refusal: Refusal) -> Dataset:
    """A C-STORE failure status with its Error Comment (LO: at most 64 characters)."""
    status = Dataset()
    status.Status = refusal.status
    status.ErrorComment = refusal.comment.encode("ascii", "replace").decode("ascii")[:64]
    return status


def _on_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS


def _tune_socket(assoc: Any) -> None:
    """Nagle off (small files: ~17 → ~60/s, README: Design notes), keepalive on."""
    dul_socket = assoc.dul.socket
    sock = dul_socket.socket if dul_socket is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
    logger.warning("{}: {}", category.__name__, escape(str(message)))


def configure(tmp_dir: Path) -> None:
    """Process-wide pynetdicom settings of the receive daemon (README, Design notes);
    ``tmp_dir`` is the spool's ``incoming/.tmp``."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    # Accept every storage SOP class, private and unknown ones included, in any
    # transfer syntax (compressed included): we store the bytes as sent.
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # The chunked temp file lives on the spool's filesystem: publishing is a rename.
    tempfile.tempdir = str(tmp_dir)
    # pydicom's value checks (on with DICOMFLOW_FASTPATH=0) warn with the peer's value in
    # the text: one escaped log line, not a raw line on stderr.
    warnings.showwarning = _warning_to_log
