"""DicomFlow's own C-STORE receive on a pynetdicom-negotiated association (issue 13,
item 1; README, Performance: switch ``recvpath``).

Why: on pynetdicom's path every P-DATA-TF PDU goes through the DUL thread's state
machine, is decoded into PDV objects and a P-DATA primitive, queued to the DIMSE
provider, written to a ``NamedTemporaryFile`` and flushed, and each message is decoded
with pydicom and dispatched through events and a service class: most of the receive
daemon's CPU. Here, once pynetdicom has negotiated the association (A-ASSOCIATE, TLS,
the allow-lists and the established-association limit stay pynetdicom's and ours as
they were), the association's own thread reads the rest of the connection itself:

* the PDUs into one reusable buffer (``recv_into``); data-set fragments are written
  from it straight into the temp file on the spool's disk as they arrive, so neither a
  PDU nor a data set is ever held whole, whatever a header declares;
* the PDV headers and the small C-STORE-RQ / C-ECHO-RQ command set (Implicit VR Little
  Endian, at most :data:`COMMAND_LIMIT` bytes, its group length checked);
* the answer, after the daemon's store handler has checked the file and made it
  durable (fsync, rename, directory fsync: ``services/receive.py``), as an encoded
  C-STORE-RSP, with the handler's status and Error Comment.

What a peer may do is what PS3.8 allows on an association without an asynchronous
window: one operation at a time (we read the next command only after answering),
command fragments and data-set fragments each on one accepted presentation context,
data only after its command, P-DATA-TF PDUs no longer than the maximum we advertised
(refused by the header, before anything is read), PDVs within their PDU. A-RELEASE-RQ is
always answered with A-RELEASE-RP, A-ABORT ends the association; anything else (an
unexpected PDU, a malformed PDV or command set, a DIMSE message other than C-STORE or
C-ECHO) ends it with an A-ABORT and one log line. Each PDU must arrive whole within the
network timeout from its first byte, and the connection may be idle at most that long
(as :mod:`pdu_guard` and pynetdicom's idle timer do on the other path), or the DIMSE
timeout while the rest of a message is awaited; every write is bounded by the network
timeout. No ARTIM wait: after an A-RELEASE-RP or an A-ABORT we close at once. The temp
file of a store that does not complete is removed: nothing half-written is ever
visible, nothing is acknowledged that is not durable.

The hand-over: :func:`prepare` (at connection open) asks the DUL thread to stop once
it has sent the A-ASSOCIATE-AC (:func:`pipeline.dicom.reactors.request_handover`); the
association thread then runs :class:`Session` instead of pynetdicom's reactor. Only
this thread touches the socket from then on, so TLS associations take this path too.
An association is left to pynetdicom when pynetdicom's PDU/DIMSE logging handlers are
bound (``pynetdicom_log_level`` INFO or DEBUG: its lines describe its own path) or the
hand-over does not happen (rejected, or the DUL thread did not stop in time), and
when the A-ASSOCIATE-RQ proposes a service other than storage and verification that the
daemon offers (MPPS: :func:`decline`, from the listener's ``EVT_REQUESTED`` handler).
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association

from pipeline.dicom import reactors
from pipeline.dicom.filemeta import received_file_head
from pipeline.dicom.pdu_guard import CONTROL_PDU_LIMIT, PDU_NAMES, UNLIMITED_PDATA_LIMIT
from pipeline.dicom.peer_reset import connection_lost_line, describe_peer
from pipeline.errors import Refusal
from pipeline.log import escape, logger
from pipeline.names import is_valid_uid

KiB = 1024
BUFFER_SIZE = 256 * KiB  # the one read buffer of a session (PDUs stream through it)
COMMAND_LIMIT = 64 * KiB  # a command set is ~100-300 bytes; more is hostile
COMMAND_ELEMENTS = 64
HANDOVER_WAIT = 5.0  # the DUL thread stops right after the A-ASSOCIATE-AC
TICK = 1.0  # seconds between looks at the stop flag while a read waits
PDU_HEADER, PDV_HEADER = 6, 6
P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x04, 0x05, 0x07
A_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATA_SET = 0x0101
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0xC211
SOURCE_USER, SOURCE_PROVIDER = 0x00, 0x02
REASON_UNSPECIFIED, REASON_UNRECOGNIZED_PDU, REASON_UNEXPECTED_PDU = 0x00, 0x01, 0x02
REASON_INVALID_PARAMETER = 0x06
#: pynetdicom's events that describe its own PDU/DIMSE path: bound, they keep it
_PATH_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DATA_RECV, evt.EVT_DATA_SENT,
                evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)

_enabled = False
_prior_run_reactor: Callable[[Association], None] | None = None
_lock = threading.Lock()

#: What the session asks the daemon, for a received data set (its temp file, None if
#: none was written) and what its command announced (SOP class, SOP instance, transfer
#: syntax): the status, or a refusal.
StoreHandler = Callable[[Path | None, str, str, str], "int | Refusal"]


def install() -> None:
    """Switch the receive data path on (process-wide, idempotent; :mod:`fastpath`,
    switch ``recvpath``, which needs the ``reactors`` switch for the hand-over)."""
    global _enabled
    with _lock:
        _enabled = True
    install_reactor()


def install_reactor() -> None:
    """Dispatch ``Association._run_reactor`` through :func:`_run_reactor` (idempotent;
    also the send data path's, :mod:`send_session`, which needs no receive path)."""
    global _prior_run_reactor
    with _lock:
        if _prior_run_reactor is not None:
            return
        _prior_run_reactor = Association._run_reactor
        Association._run_reactor = _run_reactor  # type: ignore[method-assign]


def enabled() -> bool:
    return _enabled


def prepare(assoc: Any, on_store: StoreHandler) -> None:
    """At connection open (before negotiation): ask for the hand-over, unless the data
    path is off or pynetdicom's own path logging is bound to this association."""
    if not _enabled or any(assoc.get_handlers(event) for event in _PATH_EVENTS):
        return
    if reactors.request_handover(assoc.dul):
        assoc._df_session = Session(assoc, on_store)


def decline(assoc: Any) -> None:
    """Leave this association to pynetdicom's path after all (it proposes a service this
    path does not serve, e.g. MPPS). Only before negotiation (``EVT_REQUESTED``, in the
    association's thread): the DUL thread looks at the hand-over request only once it
    has sent the A-ASSOCIATE-AC."""
    if getattr(assoc, "_df_session", None) is not None:
        assoc.dul._df_handover = None
        assoc._df_session = None


def abort(assoc: Any) -> bool:
    """Abort an association this path serves (shutdown); False if it is pynetdicom's.

    ``Association.abort`` would close the socket under the session's thread (a
    descriptor it may still read): the session is told instead, and sends the A-ABORT
    itself."""
    session: Session | None = getattr(assoc, "_df_session", None)
    return session is not None and session.stop()


def _run_reactor(self: Association) -> None:
    """``Association._run_reactor``: our session once the DUL has handed over; on a
    requested association handed over to the sender's own path (:mod:`send_session`)
    nothing: the sender's thread has the socket, and pynetdicom's reactor would kill
    the association on seeing the DUL thread gone."""
    requestor_handover = getattr(self, "_df_requestor_handover", None)
    if requestor_handover is not None and requestor_handover():
        return
    session: Session | None = getattr(self, "_df_session", None)
    if session is not None and session.take(reactors.handed_over(self.dul, HANDOVER_WAIT)):
        session.serve()
        return
    if session is not None and session.stopped:  # asked to stop before it was declined
        self.abort()
        return
    assert _prior_run_reactor is not None
    _prior_run_reactor(self)


# -- what goes wrong ------------------------------------------------------------------

class _Protocol(Exception):
    """The peer broke the protocol: one log line, then an A-ABORT."""

    def __init__(self, reason: str, source: int = SOURCE_PROVIDER,
                 diagnostic: int = REASON_INVALID_PARAMETER) -> None:
        super().__init__(reason)
        self.reason, self.source, self.diagnostic = reason, source, diagnostic


class _Gone(Exception):
    """The peer closed or reset the connection, or went silent for too long."""

    def __init__(self, cause: BaseException | None, mid_pdu: bool) -> None:
        super().__init__(cause)
        self.cause, self.mid_pdu = cause, mid_pdu


class _Stalled(Exception):
    """The peer took none of our bytes within the network timeout (it stopped reading)."""


class _Stopped(Exception):
    """We are shutting down (:func:`abort`)."""


# -- the command set ---------------------------------------------------------------

@dataclass
class Command:
    """A decoded request command set: the raw values we use (UIDs as sent)."""

    field: int
    message_id: int
    data_set: bool
    sop_class: bytes = b""
    sop_instance: bytes = b""

    @property
    def sop_class_uid(self) -> str:
        return _uid_text(self.sop_class)

    @property
    def sop_instance_uid(self) -> str:
        return _uid_text(self.sop_instance)


def _uid_text(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", "replace")


def decode_command(data: bytes | bytearray) -> Command:
    """The C-STORE-RQ or C-ECHO-RQ in ``data`` (Implicit VR Little Endian, group 0000);
    :class:`_Protocol` for anything malformed or another command."""
    values = command_values(data)
    field_ = us_value(values, 0x0100, "Command Field")
    if field_ not in (C_STORE_RQ, C_ECHO_RQ):
        raise _Protocol(f"DIMSE command 0x{field_:04X} on a storage association (only C-STORE and "
                        "C-ECHO are served)", SOURCE_USER, REASON_UNSPECIFIED)
    return Command(field_, us_value(values, 0x0110, "Message ID"),
                   us_value(values, 0x0800, "Command Data Set Type") != NO_DATA_SET,
                   values.get(0x0002, b""), values.get(0x1000, b""))


def command_values(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set by element number, its group length checked
    (shared with the send side's response reader, :mod:`send_session`)."""
    values: dict[int, bytes] = {}
    offset, count, size = 0, 0, len(data)
    while offset < size:
        if offset + 8 > size:
            raise _Protocol("command set cut short in an element header", SOURCE_USER, REASON_UNSPECIFIED)
        group, element, length = struct.unpack_from("<HHL", data, offset)
        if group != 0x0000:
            raise _Protocol(f"command set element ({group:04X},{element:04X}) outside group 0000",
                            SOURCE_USER, REASON_UNSPECIFIED)
        if offset + 8 + length > size:
            raise _Protocol(f"command set element (0000,{element:04X}) of {length} bytes runs past "
                            f"the command's {size}", SOURCE_USER, REASON_UNSPECIFIED)
        count += 1
        if count > COMMAND_ELEMENTS:
            raise _Protocol(f"command set of more than {COMMAND_ELEMENTS} elements", SOURCE_USER,
                            REASON_UNSPECIFIED)
        values[element] = bytes(data[offset + 8: offset + 8 + length])
        offset += 8 + length
    _check_group_length(values, size)
    return values


def _check_group_length(values: dict[int, bytes], size: int) -> None:
    """(0000,0000) is required and counts the bytes after its own 12 (PS3.7 E.1)."""
    raw = values.get(0x0000)
    if raw is None or len(raw) != 4:
        raise _Protocol("command set without a 4-byte Command Group Length", SOURCE_USER,
                        REASON_UNSPECIFIED)
    declared = struct.unpack("<L", raw)[0]
    if declared != size - 12:
        raise _Protocol(f"command set group length {declared} but {size - 12} bytes follow it",
                        SOURCE_USER, REASON_UNSPECIFIED)


def us_value(values: dict[int, bytes], element: int, name: str) -> int:
    """The US value of ``element`` (:class:`_Protocol` when absent or not 2 bytes)."""
    raw = values.get(element)
    if raw is None or len(raw) != 2:
        raise _Protocol(f"command set without a valid {name} (0000,{element:04X})", SOURCE_USER,
                        REASON_UNSPECIFIED)
    return int(struct.unpack("<H", raw)[0])


def encode_response(command: Command, status: int, comment: str | None = None) -> bytes:
    """The C-STORE-RSP or C-ECHO-RSP command set for ``command`` (UIDs echoed as sent)."""
    response_field = command.field | 0x8000
    parts = [_element(0x0002, command.sop_class, b"\0"), _element(0x0100, struct.pack("<H", response_field)),
             _element(0x0120, struct.pack("<H", command.message_id)),
             _element(0x0800, struct.pack("<H", NO_DATA_SET)), _element(0x0900, struct.pack("<H", status))]
    if comment:
        text = comment.encode("ascii", "replace")[:64].replace(b"\\", b"/")
        parts.append(_element(0x0902, text, b" "))
    if command.field == C_STORE_RQ:
        parts.append(_element(0x1000, command.sop_instance, b"\0"))
    body = b"".join(parts)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def _element(element: int, value: bytes, pad: bytes = b"") -> bytes:
    if len(value) % 2:
        value += pad or b"\0"
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


# -- the read buffer ----------------------------------------------------------------

class _Reader:
    """One reusable buffer over the socket: headers are parsed in it, data-set bytes
    are handed out of it in place; a read never asks for more than the buffer holds."""

    def __init__(self, sock: socket.socket, stop: threading.Event, size: int = BUFFER_SIZE) -> None:
        self.sock = sock
        self.stop = stop
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    @property
    def available(self) -> int:
        return self.end - self.start

    def fill(self, need: int, deadline: float, mid_pdu: bool) -> None:
        """At least ``need`` (at most the buffer's size) bytes available, by ``deadline``."""
        if self.start + need > len(self.buf):
            held = bytes(self.view[self.start:self.end])
            self.buf[:len(held)] = held
            self.start, self.end = 0, len(held)
        while self.end - self.start < need:
            self.end += self._recv(self.view[self.end:], deadline, mid_pdu)

    def more(self, deadline: float) -> None:
        """Read whatever comes next (at least one byte) into an emptied buffer."""
        if self.start == self.end:
            self.start = self.end = 0
        self.fill(self.available + 1, deadline, mid_pdu=True)

    def take(self, count: int) -> memoryview:
        chunk = self.view[self.start:self.start + count]
        self.start += count
        return chunk

    def _recv(self, into: memoryview, deadline: float, mid_pdu: bool) -> int:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                got = self.sock.recv_into(into)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise _Gone(TimeoutError(), mid_pdu) from None
                continue
            except OSError as exc:
                if self.stop.is_set():
                    raise _Stopped from None
                raise _Gone(exc, mid_pdu) from None
            if got == 0:
                if self.stop.is_set():
                    raise _Stopped
                raise _Gone(None, mid_pdu)
            return got


def skip(reader: _Reader, length: int, deadline: float) -> None:
    """Read and drop the next ``length`` bytes (the rest of a PDU)."""
    while length:
        if not reader.available:
            reader.more(deadline)
        length -= len(reader.take(min(length, reader.available)))


# -- the message being received -------------------------------------------------------

@dataclass
class _Incoming:
    """A C-STORE data set on its way to the temp file (or discarded, with the refusal)."""

    command: Command
    context_id: int
    syntax: str
    fd: int | None = None
    path: Path | None = None
    refusal: Refusal | None = None
    written: int = 0

    def write(self, chunk: memoryview) -> None:
        if self.fd is None:
            return
        try:
            while chunk:
                done = os.write(self.fd, chunk)
                chunk = chunk[done:]
                self.written += done
        except OSError as exc:
            self.fail(Refusal(STATUS_OUT_OF_RESOURCES, "cannot write the data set: "
                                                       f"{exc.strerror or exc}"))

    def fail(self, refusal: Refusal) -> None:
        """Stop writing: the rest of the data set is read and dropped, then refused."""
        logger.error("cannot receive {}: {}", escape(self.command.sop_instance_uid), refusal.comment)
        self.refusal = refusal
        self.discard()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            with suppress(OSError):
                self.path.unlink()
            self.path = None


def _open_temp(incoming: _Incoming, calling: str, called: str) -> None:
    """The temp file (``tempfile.tempdir``: the spool's ``incoming/.tmp``, set by
    :func:`pipeline.dicom.scp.configure`) with the preamble and our file meta, the
    AE-title slots already filled."""
    command = incoming.command
    try:
        head = received_file_head(command.sop_class_uid, command.sop_instance_uid, incoming.syntax,
                                  calling, called)
    except Exception as exc:  # noqa: BLE001 - values from a peer pydicom cannot encode
        incoming.refusal = Refusal(STATUS_CANNOT_UNDERSTAND, "cannot encode a file meta for it: "
                                                            f"{escape(exc, 40)}")
        return
    try:
        fd, name = tempfile.mkstemp(suffix=".dcm")
    except OSError as exc:
        incoming.fail(Refusal(STATUS_OUT_OF_RESOURCES, f"cannot create a temp file: {exc.strerror or exc}"))
        return
    incoming.fd, incoming.path = fd, Path(name)
    incoming.write(memoryview(head))


# -- the session --------------------------------------------------------------------

class Session:
    """The rest of one association, after the A-ASSOCIATE-AC: see the module's doc."""

    def __init__(self, assoc: Any, on_store: StoreHandler) -> None:
        self.assoc = assoc
        self.on_store = on_store
        self.serving = False
        self.declined = False
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._message: _Incoming | None = None
        self._command = bytearray()
        self._command_context: int | None = None

    # -- life cycle --

    def take(self, handed_over: bool) -> bool:
        """In the association's thread: serve it (True), or leave it to pynetdicom."""
        with self._state:
            self.declined = not handed_over
            return handed_over

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> bool:
        """From another thread: end the association (its thread sends the A-ABORT within
        a ``TICK``: a read or a write waits at most that long between looks at the flag).
        False once it was left to pynetdicom (abort it pynetdicom's way then).

        No ``shutdown`` to wake a read sooner: on a TLS socket it would leave OpenSSL
        unable to write the A-ABORT."""
        with self._state:
            if self.declined:
                return False
            self._stop.set()
            return True

    def serve(self) -> None:
        """Answer the association until it is released or aborted (its own thread)."""
        sock = self._socket()
        if sock is None:
            self._finish(aborted=True)
            return
        self.serving = True
        self.sock = sock
        self.network_timeout = float(self.assoc.network_timeout or 60.0)
        self.dimse_timeout = float(self.assoc.dimse_timeout or self.network_timeout)
        ours = int(self.assoc.acceptor.maximum_length or 0)
        self.max_pdu = ours if ours else UNLIMITED_PDATA_LIMIT
        theirs = int(self.assoc.requestor.maximum_length or 0)
        self.peer_fragment = max(theirs - PDV_HEADER, 2) if theirs else COMMAND_LIMIT
        self.peer = describe_peer(self.assoc)
        self.calling = str(self.assoc.requestor.ae_title)
        self.called = str(self.assoc.acceptor.ae_title)
        sock.settimeout(TICK)
        self.reader = _Reader(sock, self._stop)
        logger.debug("association from {} on the receive data path", self.peer)
        try:
            self._run()
        finally:
            self._drop_message()
            self.serving = False

    def _run(self) -> None:
        try:
            while True:
                pdu_type, length, deadline = self._pdu_header()
                if pdu_type == P_DATA_TF:
                    self._p_data(length, deadline)
                elif pdu_type == A_RELEASE_RQ:
                    self._skip(length, deadline)
                    self._released()
                    return
                elif pdu_type == A_ABORT:
                    self._skip(length, deadline)
                    self._aborted_by_peer()
                    return
                else:
                    name = PDU_NAMES.get(pdu_type)
                    raise _Protocol(f"unexpected {name} PDU on an established association" if name
                                    else f"unknown PDU type 0x{pdu_type:02X}", SOURCE_PROVIDER,
                                    REASON_UNEXPECTED_PDU if name else REASON_UNRECOGNIZED_PDU)
        except _Protocol as exc:
            logger.warning("aborted association from {}: {}", self.peer, exc.reason)
            self._send_abort(exc.source, exc.diagnostic)
        except _Gone as exc:
            self._lost(exc)
        except _Stalled:
            logger.warning("aborted association from {}: it stopped reading (our answer could not "
                           "be written within the network timeout of {:g} s)", self.peer,
                           self.network_timeout)
            self._send_abort(SOURCE_PROVIDER, REASON_UNSPECIFIED)
        except _Stopped:  # the listener has logged it
            self._send_abort(SOURCE_USER, REASON_UNSPECIFIED)
        except Exception:  # a bug here must end this association only, and be seen
            logger.exception("aborted association from {}: internal error in the receive path", self.peer)
            self._send_abort(SOURCE_PROVIDER, REASON_UNSPECIFIED)

    # -- PDUs --

    def _pdu_header(self) -> tuple[int, int, float]:
        """The next PDU's type and length, the deadline of its body (a PDU must arrive
        whole within the network timeout of its first byte; idle as long at most)."""
        reader = self.reader
        if reader.available < PDU_HEADER:
            idle = self.network_timeout
            if self._message is not None or self._command:  # the rest of a DIMSE message
                idle = min(idle, self.dimse_timeout)
            reader.fill(1, time.monotonic() + idle, mid_pdu=False)
        deadline = time.monotonic() + self.network_timeout
        reader.fill(PDU_HEADER, deadline, mid_pdu=True)
        header = reader.take(PDU_HEADER)
        pdu_type, length = header[0], struct.unpack_from(">L", header, 2)[0]
        limit = self.max_pdu if pdu_type == P_DATA_TF else CONTROL_PDU_LIMIT
        if length > limit:
            name = PDU_NAMES.get(pdu_type, f"type 0x{pdu_type:02X}")
            raise _Protocol(f"{name} PDU of {length} bytes, above the limit of {limit}")
        return pdu_type, length, deadline

    def _skip(self, length: int, deadline: float) -> None:
        skip(self.reader, length, deadline)

    def _p_data(self, length: int, deadline: float) -> None:
        if length < PDV_HEADER:
            raise _Protocol(f"P-DATA-TF PDU of {length} bytes holds no PDV")
        while length:
            if length < PDV_HEADER:
                raise _Protocol(f"P-DATA-TF PDU ends in {length} stray bytes")
            self.reader.fill(PDV_HEADER, deadline, mid_pdu=True)
            pdv = self.reader.take(PDV_HEADER)
            item_length, context_id, control = struct.unpack_from(">LBB", pdv)
            if item_length < 2 or item_length + 4 > length:
                raise _Protocol(f"PDV item of {item_length} bytes in a P-DATA-TF PDU with "
                                f"{length - 4} left")
            length -= item_length + 4
            self._pdv(context_id, control, item_length - 2, deadline)

    def _pdv(self, context_id: int, control: int, size: int, deadline: float) -> None:
        context = self.assoc._accepted_cx.get(context_id)
        if context is None:
            raise _Protocol(f"PDV on presentation context {context_id}, which was not accepted")
        last = bool(control & 0x02)
        if control & 0x01:
            self._command_fragment(context_id, size, last, deadline)
        else:
            self._data_fragment(context_id, size, last, deadline)

    def _command_fragment(self, context_id: int, size: int, last: bool, deadline: float) -> None:
        if self._message is not None:
            raise _Protocol("command fragment while a data set was expected")
        if self._command_context not in (None, context_id):
            raise _Protocol(f"command fragments on presentation contexts {self._command_context} "
                            f"and {context_id}")
        if len(self._command) + size > COMMAND_LIMIT:
            raise _Protocol(f"command set of more than {COMMAND_LIMIT} bytes")
        self._command_context = context_id
        while size:
            if not self.reader.available:
                self.reader.more(deadline)
            chunk = self.reader.take(min(size, self.reader.available))
            self._command += chunk
            size -= len(chunk)
        if last:
            data, self._command, self._command_context = bytes(self._command), bytearray(), None
            self._start(decode_command(data), context_id)

    def _data_fragment(self, context_id: int, size: int, last: bool, deadline: float) -> None:
        message = self._message
        if message is None:
            raise _Protocol("data-set fragment before any command" if not self._command
                            else "data-set fragment in the middle of a command set")
        if context_id != message.context_id:
            raise _Protocol(f"data-set fragment on presentation context {context_id}, its command "
                            f"on {message.context_id}")
        reader = self.reader
        while size:
            if not reader.available:
                reader.more(deadline)
            chunk = reader.take(min(size, reader.available))
            message.write(chunk)
            size -= len(chunk)
        if last:
            self._complete(message)

    # -- DIMSE --

    def _start(self, command: Command, context_id: int) -> None:
        if command.field == C_ECHO_RQ:
            if command.data_set:
                raise _Protocol("C-ECHO-RQ announcing a data set", SOURCE_USER, REASON_UNSPECIFIED)
            self._respond(command, context_id, STATUS_SUCCESS)
            return
        syntax = str(self.assoc._accepted_cx[context_id].transfer_syntax[0])
        message = _Incoming(command, context_id, syntax)
        if not command.data_set:
            self._respond(command, context_id, STATUS_CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
            return
        if is_valid_uid(command.sop_class_uid) and is_valid_uid(command.sop_instance_uid):
            _open_temp(message, self.calling, self.called)
        # else nothing is written: the daemon refuses the UIDs (it is given no file)
        self._message = message

    def _complete(self, message: _Incoming) -> None:
        """The whole data set is in: the daemon decides, then we answer."""
        self._message = None
        status, comment = STATUS_PROCESSING_FAILURE, None
        try:
            message.close()
            status, comment = self._decide(message)
        finally:
            if status == STATUS_SUCCESS:
                message.path = None  # published under its new name: the temp name is free
            message.discard()  # refused: not kept
        self._respond(message.command, message.context_id, status, comment)

    def _decide(self, message: _Incoming) -> tuple[int, str | None]:
        if message.refusal is not None:
            return message.refusal.status, message.refusal.comment
        command = message.command
        try:
            answer = self.on_store(message.path, command.sop_class_uid, command.sop_instance_uid,
                                   message.syntax)
        except Exception:  # the daemon's handler catches its own; this is a last resort
            logger.exception("store handler failed for {}", escape(command.sop_instance_uid))
            return STATUS_PROCESSING_FAILURE, "internal error"
        if isinstance(answer, Refusal):
            return answer.status, answer.comment
        return int(answer), None

    def _respond(self, command: Command, context_id: int, status: int, comment: str | None = None) -> None:
        encoded = encode_response(command, status, comment)
        pieces = [encoded[i:i + self.peer_fragment] for i in range(0, len(encoded), self.peer_fragment)]
        out = bytearray()
        for index, piece in enumerate(pieces):
            control = 0x03 if index == len(pieces) - 1 else 0x01
            out += struct.pack(">BBLLBB", P_DATA_TF, 0, len(piece) + PDV_HEADER, len(piece) + 2,
                               context_id, control)
            out += piece
        self._send(bytes(out))

    def _send(self, data: bytes) -> None:
        """Write within the network timeout (a peer that stops reading is cut). A stop
        does not prevent the write (an answer for a durable file should still go out),
        but a write that makes no progress for a ``TICK`` after it gives up."""
        view = memoryview(data)
        deadline = time.monotonic() + self.network_timeout
        while view:
            try:
                view = view[self.sock.send(view):]
            except TimeoutError:
                if self._stop.is_set():
                    raise _Stopped from None
                if time.monotonic() >= deadline:
                    raise _Stalled from None
            except OSError as exc:
                raise _Gone(exc, True) from None

    # -- the end --

    def _released(self) -> None:
        if self._message is not None or self._command:
            logger.warning("association from {} released in the middle of a C-STORE: "
                           "nothing of it is kept", self.peer)
        with suppress(_Gone, _Stalled, _Stopped):
            self._send(A_RELEASE_RP_PDU)
        self._finish(released=True)

    def _aborted_by_peer(self) -> None:
        if self._message is not None:
            logger.warning("association from {} aborted by the peer during a C-STORE of {}: "
                           "nothing of it is kept", self.peer,
                           escape(self._message.command.sop_instance_uid))
        self._finish(aborted=True)

    def _lost(self, exc: _Gone) -> None:
        """One line: INFO for a connection closed between messages, else WARNING."""
        cause = exc.cause
        line = connection_lost_line(self.assoc, cause, exc.mid_pdu)
        if self._message is not None:
            line = line.replace("in the middle of a PDU", "in the middle of a C-STORE").replace(
                "after its last PDU", "in the middle of a C-STORE")
        busy = self._message is not None or exc.mid_pdu
        (logger.warning if busy else logger.info)(line)
        if isinstance(cause, TimeoutError):
            self._send_abort(SOURCE_PROVIDER, REASON_UNSPECIFIED)
        else:
            self._finish(aborted=True)

    def _send_abort(self, source: int, diagnostic: int) -> None:
        pdu = struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, source, diagnostic)
        with suppress(OSError):
            self.sock.settimeout(0)
            self.sock.send(pdu)
        self._finish(aborted=True)

    def _finish(self, released: bool = False, aborted: bool = False) -> None:
        assoc = self.assoc
        assoc.is_established = False
        if released:
            assoc.is_released = True
            evt.trigger(assoc, evt.EVT_RELEASED, {})
        elif aborted and not assoc.is_aborted:
            assoc.is_aborted = True
            evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc._kill = True

    def _drop_message(self) -> None:
        if self._message is not None:
            self._message.discard()
            self._message = None

    def _socket(self) -> socket.socket | None:
        transport = getattr(self.assoc.dul, "socket", None)
        return getattr(transport, "socket", None)
