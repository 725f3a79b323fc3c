"""The sender's association after the hand-over: the Link's own thread is the only one
that touches the socket (issue 13, item 2; README, Performance: switch ``datapath``).

Why: with :mod:`store_send` alone, the C-STORE-RQ is ours but pynetdicom's DUL thread
still reads and decodes every C-STORE-RSP (its state machine, PDV objects, a pydicom
decode, a queue hand-over to the waiting thread), and TLS associations could not
take the data path at all: OpenSSL allows one thread per SSL object, and the DUL
thread reads it. Here, as on the receive side (:mod:`store_receive`), pynetdicom
negotiates the association (A-ASSOCIATE, TLS), then its DUL thread stops right after
the A-ASSOCIATE-AC (:func:`pipeline.dicom.reactors.request_handover`) and the
association's reactor thread returns at once (:func:`store_receive._run_reactor`).
From then on the sending thread:

* writes each C-STORE-RQ with :mod:`store_send`'s stream (``sendfile`` on plain TCP;
  read + send on TLS), a transcoded data set first encoded into an anonymous temp
  file (memory stays bounded);
* reads the C-STORE-RSP itself with :mod:`store_receive`'s reader and command-set
  parser: P-DATA-TF PDUs, command fragments, (0000,0100) must be C-STORE-RSP,
  (0000,0120) our message ID, the status and Error Comment; within the DIMSE timeout;
* reads what a peer sent while we were still sending when the send fails (an early
  refusal, then the peer stops reading or closes: its status is the file's outcome);
* releases (A-RELEASE-RQ, then the A-RELEASE-RP within the release wait, anything
  else discarded, a peer A-ABORT ends it) or aborts, then closes.

A peer's A-RELEASE-RQ (answered), A-ABORT or an unexpected PDU, while idle or while a
response is awaited, ends the association; an invalid response aborts it. A cut from
another thread (:func:`transfer.cut`: a stalled destination, a shutdown) marks the
association and shuts the connection down through a ``dup`` of its descriptor, so a
blocked read or write returns while no descriptor number we still use is freed; the
sockets are closed by :meth:`SendSession.close` only.

The hand-over is asked for at connection open on the associations :class:`scu.Link`
requests (never on an echo's), only when the data path and the ``reactors`` switch
are on and nobody watches pynetdicom's PDU or DIMSE events; when it does not happen
(or :data:`_handover` is off) everything goes as before, through pynetdicom's DUL.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom import Dataset
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association

from pipeline.dicom import reactors, store_send, transfer
from pipeline.dicom.pdu_guard import PDU_NAMES, pdu_limit
from pipeline.dicom.peer_reset import describe_peer
from pipeline.dicom.store_receive import (
    A_ABORT,
    A_RELEASE_RP_PDU,
    A_RELEASE_RQ,
    COMMAND_LIMIT,
    P_DATA_TF,
    PDU_HEADER,
    PDV_HEADER,
    TICK,
    _Gone,
    _Protocol,
    _Reader,
    _Stopped,
    command_values,
    skip,
    us_value,
)
from pipeline.errors import EndpointTrouble
from pipeline.log import escape, logger

HANDOVER_WAIT = 5.0  # the DUL thread stops right after the A-ASSOCIATE-AC
EARLY_WAIT = 0.5  # for what a peer that refused early has already sent
IDLE_LOOK = 1.0  # at most this long for the rest of a PDU noticed while idle
A_RELEASE_RP = 0x06
A_RELEASE_RQ_PDU = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
C_STORE_RSP = 0x8001
SOURCE_USER, SOURCE_PROVIDER = 0x00, 0x02
_STANDARD = (standard_dimse_sent_handler, standard_pdu_sent_handler, standard_dimse_recv_handler,
             standard_pdu_recv_handler)
_WATCHED = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DATA_RECV, evt.EVT_DATA_SENT,
            evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)

_handover = True  # tests turn it off to exercise the path through pynetdicom's DUL


class _PeerEnded(Exception):
    """The peer released or aborted the association (it has ended)."""


def _watched(assoc: Any) -> bool:
    """Someone bound handlers to pynetdicom's PDU/DIMSE events (not its logging ones):
    only pynetdicom's own path triggers them."""
    for event in _WATCHED:
        for handler in assoc.get_handlers(event):
            func = handler[0] if isinstance(handler, tuple) else handler
            if func not in _STANDARD:
                return True
    return False


def prepare(event: evt.Event) -> None:
    """EVT_CONN_OPEN of a Link's association: ask for the hand-over (see the module)."""
    assoc = event.assoc
    if not (_handover and store_send.enabled()) or _watched(assoc):
        return
    if reactors.request_handover(assoc.dul):
        assoc._df_requestor_handover = _Decision(assoc)  # type: ignore[attr-defined]


class _Decision:
    """Whether the DUL handed the socket over, decided once: the Link's thread and the
    association's reactor thread both ask, and must get the same answer."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.lock = threading.Lock()
        self.result: bool | None = None

    def __call__(self) -> bool:
        with self.lock:
            if self.result is None:
                self.result = bool(self.assoc.is_established) and \
                    reactors.handed_over(self.assoc.dul, HANDOVER_WAIT)
            return self.result


def take(assoc: Association) -> SendSession | None:
    """The session of a handed-over association (None: pynetdicom's DUL serves it)."""
    decision = getattr(assoc, "_df_requestor_handover", None)
    if decision is None or not decision():
        return None
    try:
        session = SendSession(assoc)
    except OSError as exc:  # no descriptor for the dups: nobody left to serve it
        logger.warning("cannot take the association to {} over ({}): aborting it",
                       describe_peer(assoc), escape(str(exc), limit=200))
        assoc.is_established = False
        assoc.is_aborted = True
        _abort_and_close(assoc)
        return None
    assoc._df_send_session = session  # type: ignore[attr-defined] # transfer.cut finds it
    return session


def abandon(assoc: Association) -> None:
    """An association pynetdicom did not establish after the hand-over (every context
    rejected: it queues an A-ABORT for a DUL thread that is gone): send that A-ABORT
    and close the connection ourselves."""
    event = getattr(assoc.dul, "_df_handover", None)
    if getattr(assoc, "_df_requestor_handover", None) is None or event is None or not event.is_set():
        return
    if not assoc.dul.is_alive():
        _abort_and_close(assoc)


def _abort_and_close(assoc: Association) -> None:
    """An A-ABORT (best effort, bounded) on a socket nobody else uses, then close it."""
    transport: Any = assoc.dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    with suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, SOURCE_PROVIDER, 0))
    with suppress(OSError):
        sock.close()
    transport.socket = None
    transport._is_connected = False


@contextmanager
def _encoded(ds: Dataset) -> Iterator[BinaryIO]:
    """The data set as a Part-10 file in an anonymous temp file (never whole in memory
    beyond what pydicom holds already), in its file meta's transfer syntax."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not syntax:
        raise ValueError("the data set has no file meta Transfer Syntax UID")
    with tempfile.TemporaryFile(suffix=".dcm") as fileobj:
        pydicom.dcmwrite(fileobj, ds, enforce_file_format=True)
        fileobj.flush()
        yield fileobj  # type: ignore[misc]


class SendSession(store_send.Answers):
    """One handed-over association, used by the Link's thread (``cut`` from any)."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        transport: Any = assoc.dul.socket
        raw: socket.socket = transport.socket
        self.raw = raw
        self.tls = isinstance(raw, ssl.SSLSocket)
        # shutdown from another thread goes through this one; the I/O keeps its own
        self._cutter = socket.socket(fileno=os.dup(raw.fileno()))
        self.io = raw if self.tls else socket.socket(fileno=os.dup(raw.fileno()))
        self._stop = threading.Event()
        # held by whoever does I/O: a store, a close, a look at an idle socket (the
        # sender asks ``alive`` of other lanes' links from its own threads)
        self._io = threading.Lock()
        self.reader = _Reader(self.io, self._stop)
        self.closed = False
        self.peer = describe_peer(assoc)
        self.fragment = store_send.fragment_size(assoc.acceptor.maximum_length)
        self.network_timeout = float(assoc.network_timeout or 60.0)
        logger.debug("association to {} on the send data path{}", self.peer, " (TLS)" if self.tls else "")

    # -- the Link's interface --

    def store(self, source: Path | Dataset, msg_id: int) -> store_send.Response:
        """C-STORE ``source`` and read its answer. FileNotFoundError passes; a file
        nobody can send (no context, unreadable) raises for the caller to charge it;
        :class:`EndpointTrouble` when the association has already ended."""
        if not self.usable():
            raise EndpointTrouble(f"association with {self.peer} was lost: "
                                  f"{transfer.stall_reason(self.assoc) or 'it has ended'}")
        if self.fragment is None:
            raise EndpointTrouble(f"{self.peer} declared a maximum PDU too small for any data")
        with self._io:
            if isinstance(source, Dataset):
                with _encoded(source) as fileobj:
                    return self._store_file(fileobj, msg_id)
            with open(source, "rb", buffering=0) as fileobj:
                return self._store_file(fileobj, msg_id, source)

    def usable(self) -> bool:
        """Established and not ended; a PDU the peer sent while we were idle (an
        A-RELEASE-RQ, an A-ABORT, anything else) is read now and ends it."""
        if self.closed or not transfer.is_usable(self.assoc):
            return False
        if not self._io.acquire(blocking=False):
            return True  # a store is in flight on another thread: it finds out itself
        try:
            self._look_while_idle()
        finally:
            self._io.release()
        return transfer.is_usable(self.assoc)

    def _look_while_idle(self) -> None:
        if self.closed:
            return
        if self.reader.available:  # read with the last response: already ours, not the socket's
            readable = True
        else:
            try:
                readable = bool(select.select([self.io], [], [], 0)[0]) or \
                    (self.tls and self.io.pending() > 0)  # type: ignore[attr-defined]
            except (OSError, ValueError):
                readable = True
        if readable:
            self._read_while_idle()

    def cut(self, reason: str) -> None:
        """Any thread: mark the association ended and shut its connection down (see
        the module); idempotent."""
        assoc = self.assoc
        if getattr(assoc, "_dicomflow_cut", None) is None:
            assoc._dicomflow_cut = reason  # type: ignore[attr-defined]
        self._ended(aborted=True)
        self._stop.set()
        with suppress(OSError):
            self._cutter.shutdown(socket.SHUT_RDWR)

    def close(self, abort: bool, timeout: float) -> None:
        """Release (A-RELEASE-RQ, then the A-RELEASE-RP within ``timeout``) or abort,
        then close every descriptor. From another thread than a store in flight,
        the store is cut first (and its descriptors closed once it has returned)."""
        if not self._io.acquire(blocking=False):
            self.cut("closed while a transfer was in flight")
            if not self._io.acquire(timeout=HANDOVER_WAIT):
                return  # it did not return: its descriptors are left to it (never freed under it)
        try:
            if self.closed or not self.assoc.is_established or self._stop.is_set():
                return
            if abort:
                self._send_abort(SOURCE_USER)
            else:
                self._release(timeout)
        finally:
            self._close()
            self._io.release()

    # -- the exchange (store_send.Answers) --

    def writer(self, deadline: float) -> store_send._Writer:
        if self.tls:
            return store_send._TlsWriter(self.assoc, deadline, sock=self.io)
        return store_send._Writer(self.assoc, deadline, sock=self.io)

    def response(self, msg_id: int) -> store_send.Response:
        """The C-STORE-RSP to ``msg_id`` within the DIMSE timeout."""
        deadline = time.monotonic() + float(self.assoc.dimse_timeout or 60.0)
        try:
            data = self._read_command(deadline, TICK)
        except _Gone as exc:
            if isinstance(exc.cause, TimeoutError):
                logger.warning("no C-STORE response from {} within the DIMSE timeout of {:g} s: "
                               "aborting the association", self.peer, float(self.assoc.dimse_timeout or 60))
                self._send_abort(SOURCE_USER)
            else:
                logger.info("the connection to {} was lost while awaiting a C-STORE response",
                            self.peer)
                self._ended(aborted=True)
            return store_send.Response(None)
        except (_Stopped, _PeerEnded):
            return store_send.Response(None)
        except _Protocol as exc:
            logger.warning("dropped connection to {}: {}", self.peer, exc.reason)
            self._send_abort(SOURCE_PROVIDER)
            return store_send.Response(None)
        answer = self._decode(data, msg_id)
        if answer is None:
            self._send_abort(SOURCE_PROVIDER)
            return store_send.Response(None)
        return answer

    def early_failure(self, msg_id: int) -> store_send.Response | None:
        """A failure response the peer sent before our request was complete (then it
        stopped reading or closed): whatever of it has arrived, read now."""
        if self._stop.is_set():
            return None
        try:
            data = self._read_command(time.monotonic() + EARLY_WAIT, EARLY_WAIT / 5)
        except (_Gone, _Stopped, _PeerEnded, _Protocol, OSError):
            return None
        answer = self._decode(data, msg_id, quiet=True)
        if answer is None or answer.status is None or store_send._stored(answer.status):
            return None  # an early *success* never counts for an incomplete request
        return answer

    # -- inside --

    def _store_file(self, fileobj: BinaryIO, msg_id: int, path: Path | None = None) -> store_send.Response:
        assoc = self.assoc
        size = os.fstat(fileobj.fileno()).st_size
        meta = store_send._meta_uids(fileobj, size)
        if meta is None:
            if path is None:
                raise ValueError("the encoded data set has no usable file meta")
            # unusual file meta (pynetdicom's path would have read it with pydicom)
            with _encoded(pydicom.dcmread(path)) as encoded:
                return self._store_file(encoded, msg_id)
        (sop_class, sop_instance, syntax), offset = meta
        context_id = store_send._context_id(assoc, sop_class, syntax)
        if context_id is None:
            raise ValueError(f"no accepted presentation context for {sop_class} with {syntax}")
        assert self.fragment is not None
        plan = store_send._Plan(context_id, sop_class, sop_instance, offset, size - offset, self.fragment)
        command = store_send.command_set(msg_id, sop_class, sop_instance)
        assoc._reactor_checkpoint.clear()  # "an exchange is in flight" (transfer.exchange_quiet_for)
        try:
            return store_send.guarded_exchange(assoc, plan, command, fileobj, msg_id, self)
        except store_send._NothingSent as exc:  # nothing to hand back to: the DUL is gone
            self.cut(f"the data path could not start: {exc.__cause__}")
            return store_send.Response(None)
        finally:
            assoc._reactor_checkpoint.set()

    def _decode(self, data: bytes, msg_id: int, quiet: bool = False) -> store_send.Response | None:
        try:
            values = command_values(data)
            field = us_value(values, 0x0100, "Command Field")
            responding_to = us_value(values, 0x0120, "Message ID Being Responded To")
            status = us_value(values, 0x0900, "Status")
        except _Protocol as exc:
            problem = exc.reason
        else:
            if field == C_STORE_RSP and responding_to == msg_id:
                raw = values.get(0x0902, b"").rstrip(b"\0 ")
                return store_send.Response(status, raw.decode("ascii", "replace") or None)
            problem = f"command 0x{field:04X} answering message {responding_to}"
        if not quiet:
            logger.error("invalid C-STORE response from {} ({} to message {}): aborting the "
                         "association", self.peer, escape(problem, limit=200), msg_id)
        return None

    def _read_command(self, deadline: float, tick: float) -> bytes:
        """The next whole command set the peer sends (a response): P-DATA-TF PDUs of
        command PDVs; a release or abort ends the association (:class:`_PeerEnded`)."""
        self.io.settimeout(tick)
        command = bytearray()
        while True:
            pdu_type, length = self._pdu_header(deadline)
            if pdu_type != P_DATA_TF:
                self._control_pdu(pdu_type, length, deadline)
                continue
            if length < PDV_HEADER:
                raise _Protocol(f"P-DATA-TF PDU of {length} bytes holds no PDV")
            last = False
            while length:
                if length < PDV_HEADER or last:
                    raise _Protocol("P-DATA-TF PDU with bytes after the response's last fragment")
                self.reader.fill(PDV_HEADER, deadline, mid_pdu=True)
                item_length, _context, control = struct.unpack_from(">LBB", self.reader.take(PDV_HEADER))
                size = item_length - 2
                if item_length < 2 or item_length + 4 > length:
                    raise _Protocol(f"PDV item of {item_length} bytes in a P-DATA-TF PDU with "
                                    f"{length - 4} left")
                if not control & 0x01:
                    raise _Protocol("a data-set fragment where a response was expected")
                if len(command) + size > COMMAND_LIMIT:
                    raise _Protocol(f"response command set of more than {COMMAND_LIMIT} bytes")
                length -= item_length + 4
                while size:
                    if not self.reader.available:
                        self.reader.more(deadline)
                    chunk = self.reader.take(min(size, self.reader.available))
                    command += chunk
                    size -= len(chunk)
                last = bool(control & 0x02)
            if last:
                return bytes(command)

    def _pdu_header(self, deadline: float) -> tuple[int, int]:
        self.reader.fill(PDU_HEADER, deadline, mid_pdu=False)
        header = self.reader.take(PDU_HEADER)
        pdu_type, length = header[0], struct.unpack_from(">L", header, 2)[0]
        limit = pdu_limit(self.assoc.dul, pdu_type)  # as pynetdicom's path (pdu_guard)
        if length > limit:
            name = PDU_NAMES.get(pdu_type, f"type 0x{pdu_type:02X}")
            raise _Protocol(f"{name} PDU declaring {length} bytes (limit {limit})")
        return pdu_type, length

    def _control_pdu(self, pdu_type: int, length: int, deadline: float) -> None:
        """A PDU other than P-DATA-TF while we expect a response: the association ends."""
        if pdu_type == A_ABORT:
            skip(self.reader, length, deadline)
            logger.info("association to {} aborted by the peer", self.peer)
            self._ended(aborted=True)
            raise _PeerEnded
        if pdu_type == A_RELEASE_RQ:
            skip(self.reader, length, deadline)
            logger.info("association to {} released by the peer", self.peer)
            self._write(A_RELEASE_RP_PDU, self.network_timeout)
            self._ended(released=True)
            raise _PeerEnded
        name = PDU_NAMES.get(pdu_type)
        raise _Protocol(f"unexpected {name} PDU on an established association" if name
                        else f"unknown PDU type 0x{pdu_type:02X}")

    def _read_while_idle(self) -> None:
        try:
            self._read_command(time.monotonic() + IDLE_LOOK, IDLE_LOOK / 5)
        except (_PeerEnded, _Stopped):
            return
        except _Gone as exc:
            if isinstance(exc.cause, TimeoutError):
                self._send_abort(SOURCE_PROVIDER)
            else:
                logger.info("the connection to {} was closed by the peer", self.peer)
                self._ended(aborted=True)
            return
        except _Protocol as exc:
            logger.warning("dropped connection to {}: {}", self.peer, exc.reason)
            self._send_abort(SOURCE_PROVIDER)
            return
        logger.warning("dropped connection to {}: a DIMSE message while no request was "
                       "outstanding", self.peer)
        self._send_abort(SOURCE_PROVIDER)

    def _release(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not self._write(A_RELEASE_RQ_PDU, timeout):
            return
        self.io.settimeout(min(TICK, max(timeout, 0.01)))
        try:
            while True:
                pdu_type, length = self._pdu_header(deadline)
                skip(self.reader, length, deadline)
                if pdu_type == A_RELEASE_RP:
                    self._ended(released=True)
                    return
                if pdu_type in (A_ABORT, A_RELEASE_RQ):  # aborted, or a release collision
                    self._ended(aborted=pdu_type == A_ABORT, released=pdu_type == A_RELEASE_RQ)
                    return
                # anything else (a late response) is discarded while the release is awaited
        except (_Gone, _Stopped, _Protocol):
            self._ended(aborted=True)

    def _send_abort(self, source: int) -> None:
        self._write(struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, source, 0), 1.0)
        self._ended(aborted=True)

    def _write(self, data: bytes, timeout: float) -> bool:
        """A control PDU, within ``timeout`` (False if it could not be written)."""
        try:
            self.io.settimeout(max(timeout, 0.01))
            self.io.sendall(data)
            return True
        except OSError:
            return False

    def _ended(self, released: bool = False, aborted: bool = False) -> None:
        assoc = self.assoc
        was = assoc.is_established
        assoc.is_established = False
        if released and not assoc.is_released:
            assoc.is_released = True
            if was:
                evt.trigger(assoc, evt.EVT_RELEASED, {})
        elif aborted and not assoc.is_aborted:
            assoc.is_aborted = True
            if was:
                evt.trigger(assoc, evt.EVT_ABORTED, {})

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._ended(aborted=not self.assoc.is_released)
        self._stop.set()
        for sock in (self.io, self._cutter, self.raw):
            with suppress(OSError):
                sock.close()
        transport: Any = self.assoc.dul.socket
        transport.socket = None
        transport._is_connected = False

