"""DicomFlow's own C-STORE-RQ send on a pynetdicom-negotiated association (issue 13,
item 2; README, Performance: switch ``datapath``).

Why: pynetdicom's ``send_c_store(path)`` reads a file in chunks, wraps each chunk in a
P-DATA primitive, queues it for the DUL thread, which encodes and writes it — several
Python objects, queue hand-overs and thread wake-ups per PDU. Here the sending thread
writes the PDUs itself: the command set (:func:`commands.encode_c_store_command`) in
P-DATA-TF PDUs with the command bit, then the data set straight from the spool file
with ``os.sendfile`` (the 12 bytes of PDU + PDV header go first with ``MSG_MORE`` so
they share a segment with the data; TLS associations stay on pynetdicom's path), in PDV
fragments of at most the peer's maximum PDU length minus 6 (pynetdicom's rule; 0 =
unlimited, and anything above, gets our own cap, :data:`PDU_CAP`, so no buffer is
sized by a peer's declaration), of even length but the last (DCMTK's rule). A data set
of odd length (a broken file) ends in an odd fragment, as on pynetdicom's path, and
DCMTK refuses it.

On an association handed over after negotiation (:mod:`send_session`, with the
``reactors`` switch) the same stream is written through the session's own socket
(TLS: :class:`_TlsWriter`, read + send) and the session reads the response
(:class:`Answers` is where the two differ). Without the hand-over, everything else
stays pynetdicom's: negotiation, TLS, release and abort; its DUL thread still reads
the socket and decodes the C-STORE-RSP, taken from the DIMSE queue
as ``send_c_store`` does, with the association's reactor paused the same way (so the
response race fix of :mod:`transfer` keeps applying). One operation is outstanding at
a time and nothing is queued for the DUL while we write (checked first), so nobody
else writes to the socket — except pynetdicom's DUL itself answering a protocol error
from the peer with an A-ABORT, which ends the association anyway.

Every write is bounded: by the socket's send timeout (set by :mod:`transfer`; a
destination that takes no byte for that long is cut with :func:`transfer.stalled_reason`)
and by the message's DIMSE timeout over the whole transfer
(:func:`transfer.overdue_reason`), as the bounded send queue of :mod:`reactors` does on
pynetdicom's path. ``transfer``'s ``_dicomflow_sending_since``/``_last_sent``
bookkeeping is kept, so a shutdown still tells a blocked transfer from a slow one.

Plain TCP writes go through a ``dup`` of the socket's descriptor: :func:`transfer.cut`
from another thread shuts the connection down (our next write fails) but its ``close``
cannot free a descriptor number we are still writing to. Without the hand-over, TLS
associations take pynetdicom's ``send_c_store`` (:func:`send` returns None for them):
the DUL thread reads the SSL socket while this thread would write it, and OpenSSL
does not allow one SSL object to be used by two threads at once.

:func:`send` returns None, having sent nothing, whenever a precondition does not hold
(TLS, unusual file meta, no exactly matching context, a peer maximum PDU below 8, a socket
without a timeout, something queued for the DUL, handlers bound to the sent-events):
the caller then takes pynetdicom's ``send_c_store``.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import pynetdicom.dimse_messages as dimse_messages
from pynetdicom import Association, evt
from pynetdicom._handlers import standard_dimse_sent_handler, standard_pdu_sent_handler
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as _pydicom_encode

from pipeline.dicom import store_receive, transfer
from pipeline.dicom.commands import encode_c_store_command
from pipeline.dicom.filemeta import MetaError, read_meta_group
from pipeline.log import escape, logger

MiB = 1024 * 1024
PDU_CAP = MiB  # our own maximum P-DATA-TF length: for a peer declaring 0, or more
PDU_HEADER = 6
PDV_HEADER = 6
MSG_MORE = getattr(socket, "MSG_MORE", 0)  # Linux: a header shares its segment with the data
PAUSE_WAIT = 5.0  # the reactor pauses at its next turn (≤ IDLE_TICK); longer means it is stuck
_COMMAND, _LAST = 0x01, 0x02
_META_TAGS = (0x00020002, 0x00020003, 0x00020010)
_STANDARD_SENT = (standard_dimse_sent_handler, standard_pdu_sent_handler)

_enabled = False


def install() -> None:
    """Switch the data path on (process-wide; :mod:`fastpath`, switch ``datapath``),
    with the association reactor that leaves a handed-over association to its Link
    (:mod:`send_session`)."""
    global _enabled
    _enabled = True
    store_receive.install_reactor()


def enabled() -> bool:
    return _enabled


@dataclass(frozen=True)
class Response:
    """The C-STORE-RSP: ``status`` is None when none came (timeout, abort, invalid)."""

    status: int | None
    comment: str | None = None


class _NothingSent(Exception):
    """The data path failed before any byte went out: pynetdicom's path can take the file."""


class _Stalled(Exception):
    """No byte could be written for the socket's send timeout."""


class _Overdue(Exception):
    """The transfer took longer than the message's DIMSE timeout."""


@dataclass(frozen=True)
class _Plan:
    """Everything decided before the first byte: nothing has been sent if it fails."""

    context_id: int
    sop_class: str
    sop_instance: str
    offset: int
    length: int
    fragment: int


def _meta_uids(fileobj: BinaryIO, size: int) -> tuple[list[str], int] | None:
    """The file meta's SOP class, instance and transfer syntax UIDs and where the data
    set starts (:func:`read_meta_group` on the open file), or None when unusual."""
    fd = fileobj.fileno()
    try:
        group = read_meta_group(lambda offset, count: os.pread(fd, count, offset), size)
    except MetaError:
        return None
    uids = [group.values.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace") for tag in _META_TAGS]
    return (uids, group.end) if all(uids) else None


def _context_id(assoc: Association, sop_class: str, syntax: str) -> int | None:
    """The accepted context for exactly this (SOP class, transfer syntax) in the SCU role
    (pynetdicom's chunked send needs the same exact match)."""
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax and cx.as_scu:
            return int(cx.context_id)  # type: ignore[arg-type]
    return None


def fragment_size(peer_max: int | None) -> int | None:
    """The longest PDV value we send: peer maximum PDU minus the PDV header (our cap for
    0 = unlimited, or anything above it), rounded down to even — DCMTK refuses an odd
    fragment ("Odd Fragment Length") and a declared odd maximum would make every one
    odd; None for a maximum too small to carry two bytes."""
    limit = PDU_CAP if not peer_max or peer_max > PDU_CAP else int(peer_max)
    fragment = (limit - PDV_HEADER) & ~1
    return fragment if fragment > 0 else None


def _custom_sent_handlers(assoc: Association) -> bool:
    """Someone wants to see sent PDUs or messages (not pynetdicom's DEBUG loggers):
    only pynetdicom's path triggers those events."""
    for event in (evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT):
        for handler in assoc.get_handlers(event):
            func = handler[0] if isinstance(handler, tuple) else handler
            if func not in _STANDARD_SENT:
                return True
    return False


def _fragment_for(assoc: Association) -> int | None:
    """The PDV fragment size if the association can take the data path now (established,
    plain TCP, a socket with a send timeout, nobody watching sent-events), else None."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is None or not getattr(assoc, "is_established", False) or _custom_sent_handlers(assoc):
        return None
    if isinstance(sock, ssl.SSLSocket):
        return None  # TLS: see the module's docstring
    timeout = sock.gettimeout()
    if timeout is None or timeout <= 0:
        return None
    return fragment_size(assoc.acceptor.maximum_length)


def _plan(assoc: Association, fileobj: BinaryIO, fragment: int) -> _Plan | None:
    size = os.fstat(fileobj.fileno()).st_size
    meta = _meta_uids(fileobj, size)
    if meta is None:
        return None
    (sop_class, sop_instance, syntax), offset = meta
    context_id = _context_id(assoc, sop_class, syntax)
    if context_id is None:
        return None
    return _Plan(context_id, sop_class, sop_instance, offset, size - offset, fragment)


def command_set(msg_id: int, sop_class: str, sop_instance: str, priority: int = 2,
                originator_aet: str | None = None, originator_id: int | None = None) -> bytes:
    """The encoded C-STORE-RQ command set (data set present), as pynetdicom would
    encode it: directly in the common case, through pynetdicom's message and pydicom's
    writer with a Move Originator or any unusual value."""
    primitive = C_STORE()
    primitive.MessageID = msg_id
    primitive.Priority = priority
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.MoveOriginatorApplicationEntityTitle = originator_aet
    primitive.MoveOriginatorMessageID = originator_id
    primitive._dataset_path = (Path(os.devnull), 0)  # type: ignore[attr-defined] # "present"
    encoded = encode_c_store_command(primitive)
    if encoded is not None:
        return encoded
    message = dimse_messages.C_STORE_RQ()
    message.primitive_to_message(primitive)
    data = _pydicom_encode(message.command_set, True, True)
    if data is None:
        raise ValueError("cannot encode the C-STORE-RQ command set")
    return data


def pdu_header(context_id: int, control: int, length: int) -> bytes:
    """A P-DATA-TF header with one PDV of ``length`` value bytes."""
    return struct.pack(">BBLLBB", 0x04, 0x00, length + PDV_HEADER, length + 2, context_id, control)


class _Writer:
    """Bounded writes to the association's socket, with :mod:`transfer`'s bookkeeping."""

    def __init__(self, assoc: Association, deadline: float, sock: socket.socket | None = None) -> None:
        """``sock``: the handed-over association's own socket (:mod:`send_session`),
        else a ``dup`` of the transport's, closed with the writer."""
        self.assoc = assoc
        transport: Any = assoc.dul.socket  # it carries transfer's bookkeeping attributes
        self.transport = transport
        self.send_timeout = transfer.send_timeout(assoc)
        self.deadline = deadline
        self.handed_over = sock is not None
        self.own = sock if sock is not None else socket.socket(fileno=os.dup(transport.socket.fileno()))
        self._prepare()
        self.sent = False  # a byte went out: the association can no longer be handed back

    def _prepare(self) -> None:
        self.own.setblocking(False)  # the shared description is already (timeout mode)
        self.poller = select.poll()
        self.poller.register(self.own.fileno(), select.POLLOUT)

    def close(self) -> None:
        self.transport._dicomflow_sending_since = None
        if not self.handed_over:
            self.own.close()

    def _progress(self) -> None:
        self.sent = True
        self.transport._dicomflow_sending_since = self.transport._dicomflow_last_sent = time.monotonic()

    def _allowed(self) -> tuple[float, type[Exception]]:
        """How long the next wait for the socket may take (the send timeout, within the
        deadline), and what running out of it means."""
        now = time.monotonic()
        if self.transport._dicomflow_sending_since is None:
            self.transport._dicomflow_sending_since = now
        remaining = self.deadline - now
        if remaining <= 0:
            raise _Overdue
        wait = min(self.send_timeout, remaining)
        return wait, (_Overdue if wait == remaining else _Stalled)

    def _wait(self) -> None:
        """Until the socket takes bytes: at most the send timeout, and the deadline."""
        wait, expired = self._allowed()
        if not self.poller.poll(wait * 1000):
            raise expired
        if transfer.stall_reason(self.assoc) is not None:
            raise BrokenPipeError("the association was cut")
        if self.assoc.is_aborted or not (self.handed_over or self.assoc.dul.is_alive()):
            raise BrokenPipeError("the association ended")

    def send_bytes(self, data: bytes | memoryview, more: bool) -> None:
        view, flags = memoryview(data), MSG_MORE if more else 0
        while view:
            try:
                sent = self.own.send(view, flags)
            except BlockingIOError:
                self._wait()
                continue
            view = view[sent:]
            self._progress()

    def send_fragment(self, header: bytes, fileobj: BinaryIO, offset: int, count: int) -> None:
        """A PDU header, then ``count`` bytes of the file from ``offset``: the header with
        ``MSG_MORE`` and the bytes by ``sendfile``."""
        self.send_bytes(header, more=count > 0)
        out, infd = self.own.fileno(), fileobj.fileno()
        while count:
            try:
                sent = os.sendfile(out, infd, offset, count)
            except BlockingIOError:
                self._wait()
                continue
            if not sent:
                raise EOFError("the file got shorter while it was sent")
            offset += sent
            count -= sent
            self._progress()


class _TlsWriter(_Writer):
    """The same bounds on a handed-over TLS association: read + send (no ``sendfile``
    through OpenSSL), each write waiting at most the send timeout and the deadline."""

    def _prepare(self) -> None:
        pass

    def send_bytes(self, data: bytes | memoryview, more: bool) -> None:
        view = memoryview(data)
        while view:
            wait, expired = self._allowed()
            self.own.settimeout(wait)
            try:
                sent = self.own.send(view)
            except TimeoutError:
                raise expired from None
            if transfer.stall_reason(self.assoc) is not None:
                raise BrokenPipeError("the association was cut")
            view = view[sent:]
            self._progress()

    def send_fragment(self, header: bytes, fileobj: BinaryIO, offset: int, count: int) -> None:
        data = os.pread(fileobj.fileno(), count, offset) if count else b""  # ≤ PDU_CAP
        if len(data) != count:
            raise EOFError("the file got shorter while it was sent")
        self.send_bytes(header + data, more=False)


def _stream(writer: _Writer, plan: _Plan, command: bytes, fileobj: BinaryIO) -> None:
    """The command set, then the data set, as P-DATA-TF PDUs of one PDV each."""
    step = plan.fragment
    for start in range(0, len(command), step):
        piece = command[start:start + step]
        last = start + step >= len(command)
        control = _COMMAND | (_LAST if last else 0)
        writer.send_bytes(pdu_header(plan.context_id, control, len(piece)) + piece, more=True)
    offset, left = plan.offset, plan.length
    while True:  # at least one data PDV, even for an empty data set (as pynetdicom)
        count = min(step, left)
        last = count == left
        writer.send_fragment(pdu_header(plan.context_id, _LAST if last else 0, count), fileobj,
                             offset, count)
        offset, left = offset + count, left - count
        if last:
            return


def _pause(assoc: Association) -> bool:
    """Pause the association's reactor as ``send_c_store`` does (bounded)."""
    assoc._reactor_checkpoint.clear()
    give_up = time.monotonic() + PAUSE_WAIT
    while not assoc._is_paused:
        if time.monotonic() > give_up:
            return False
        time.sleep(0.0001)
    return True


def _quiet_dul(assoc: Association) -> bool:
    """Nothing queued for the DUL to send (it would write to the socket with us)."""
    return assoc.dul.to_provider_queue.empty()


def send(assoc: Association, path: Path, msg_id: int, priority: int = 2,
         originator_aet: str | None = None, originator_id: int | None = None) -> Response | None:
    """C-STORE the file at ``path`` on ``assoc`` with this module's data path; None when
    a precondition does not hold (nothing sent: use pynetdicom's ``send_c_store``).
    FileNotFoundError passes; the DIMSE timeout (``assoc.dimse_timeout``) bounds the
    transfer, and then the wait for the response."""
    fragment = _fragment_for(assoc)
    if fragment is None:
        return None
    with open(path, "rb", buffering=0) as fileobj:
        plan = _plan(assoc, fileobj, fragment)
        if plan is None:
            return None
        command = command_set(msg_id, plan.sop_class, plan.sop_instance, priority,
                              originator_aet, originator_id)
        if not _pause(assoc):
            # pynetdicom's send_c_store would wait for the pause without a bound
            assoc._reactor_checkpoint.set()
            transfer.cut(assoc, f"the association's reactor did not pause within {PAUSE_WAIT:g}s")
            return Response(None)
        try:
            if not _quiet_dul(assoc):
                return None
            try:
                return guarded_exchange(assoc, plan, command, fileobj, msg_id)
            except _NothingSent as exc:  # e.g. no descriptor left for the dup: pynetdicom's path
                logger.warning("the data path could not start ({}); this file goes through "
                               "pynetdicom", escape(str(exc.__cause__), limit=200))
                return None
        finally:
            assoc._reactor_checkpoint.set()


def guarded_exchange(assoc: Association, plan: _Plan, command: bytes, fileobj: BinaryIO,
                     msg_id: int, answers: Answers | None = None) -> Response:
    """:func:`_exchange`; a failure once bytes may be out ends the association, not the
    file (:class:`_NothingSent` passes: nothing went out)."""
    try:
        return _exchange(assoc, plan, command, fileobj, msg_id, answers)
    except _NothingSent:
        raise
    except Exception as exc:  # noqa: BLE001 - bytes may be out: the association is spent
        # never the file's fault by itself (it would go to failed/): the sender
        # counts a file during which associations keep ending, as for any abort
        logger.exception("the data path failed while sending {}", escape(plan.sop_instance))
        transfer.cut(assoc, f"the data path failed: {type(exc).__name__}: {exc}")
        return Response(None)


class Answers:
    """Where the C-STORE-RSP comes from: pynetdicom's DUL thread decodes it onto the
    DIMSE queue (this class), or the handed-over association's own reader
    (:class:`pipeline.dicom.send_session.SendSession`)."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def writer(self, deadline: float) -> _Writer:
        return _Writer(self.assoc, deadline)

    def early_failure(self, msg_id: int) -> Response | None:
        return _early_failure(self.assoc, msg_id)

    def response(self, msg_id: int) -> Response:
        return _response(self.assoc, msg_id)


def _exchange(assoc: Association, plan: _Plan, command: bytes, fileobj: BinaryIO,
              msg_id: int, answers: Answers | None = None) -> Response:
    answers = answers or Answers(assoc)
    timeout = float(assoc.dimse_timeout or 60.0)
    try:
        writer = answers.writer(time.monotonic() + timeout)
    except OSError as exc:
        raise _NothingSent from exc
    try:
        _stream(writer, plan, command, fileobj)
    except _Stalled:
        return _answered_or_cut(answers, msg_id, transfer.stalled_reason(assoc))
    except _Overdue:
        return _answered_or_cut(answers, msg_id, transfer.overdue_reason(assoc))
    except (OSError, EOFError) as exc:
        early = answers.early_failure(msg_id)
        if early is not None:  # the peer refused the file, then closed: its answer counts
            return _answered_or_cut(answers, msg_id, "", early)
        if transfer.stall_reason(assoc) is not None:  # cut meanwhile (a shutdown): said there
            return Response(None)
        # the peer reset or aborted (or the file shrank): end it here rather than queue
        # an Evt17 that the DUL, having seen the closed connection itself, would refuse
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        what = "the transfer broke off" if isinstance(exc, EOFError) else \
            "the connection was lost while sending"
        transfer.cut(assoc, f"{what} ({why})")
        logger.info("{} {}: {}", what, escape(plan.sop_instance), why)
        return Response(None)
    except Exception as exc:
        if not writer.sent:
            raise _NothingSent from exc
        raise
    finally:
        writer.close()
    return answers.response(msg_id)


def _answered_or_cut(answers: Answers, msg_id: int, reason: str,
                     early: Response | None = None) -> Response:
    """The request could not be completed: the association ends either way, and the
    peer's early refusal, if it sent one, is the file's outcome."""
    early = early or answers.early_failure(msg_id)
    transfer.cut(answers.assoc, reason if early is None else
                 "the destination answered before the request was complete")
    return early or Response(None)


def _stored(status: int) -> bool:
    """Success or warning (PS3.4: a warning is stored)."""
    return status == 0 or status >> 12 == 0xB or status in (0x0001, 0x0107, 0x0116)


def _early_failure(assoc: Association, msg_id: int) -> Response | None:
    """A failure response to ``msg_id`` that the peer sent before the request was
    complete (then stopped reading, or closed): the peer's answer for the file. An early
    *success* never counts for a request that was not completed."""
    taken: list[Any] = []
    found: Response | None = None
    try:
        while True:
            taken.append(assoc.dimse.msg_queue.get_nowait())
    except queue.Empty:
        pass
    for item in taken:
        rsp = item[1]
        if found is None and isinstance(rsp, C_STORE) and rsp.is_valid_response \
                and rsp.MessageIDBeingRespondedTo == msg_id and rsp.Status is not None \
                and not _stored(int(rsp.Status)):
            comment = getattr(rsp, "ErrorComment", None)
            found = Response(int(rsp.Status), str(comment) if comment else None)
            continue
        assoc.dimse.msg_queue.put(item)
    return found


def _response(assoc: Association, msg_id: int) -> Response:
    """The C-STORE-RSP from the DIMSE queue (decoded by pynetdicom's DUL thread) within
    the DIMSE timeout; a request the peer sends meanwhile is left for the reactor."""
    deadline = time.monotonic() + float(assoc.dimse_timeout or 60.0)
    others: list[Any] = []
    rsp: Any = None
    try:
        while True:
            try:
                _context_id, rsp = assoc.dimse.msg_queue.get(
                    timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                rsp = None
            if rsp is None:
                assoc._handle_no_response()
                return Response(None)
            if getattr(rsp, "is_valid_request", False):
                others.append((_context_id, rsp))
                continue
            break
    finally:
        for item in others:
            assoc.dimse.msg_queue.put(item)
    if not isinstance(rsp, C_STORE) or not rsp.is_valid_response \
            or rsp.MessageIDBeingRespondedTo != msg_id:
        logger.error("invalid C-STORE response from the destination ({} to message {}): "
                     "aborting the association", type(rsp).__name__, msg_id)
        assoc.abort()
        return Response(None)
    comment = getattr(rsp, "ErrorComment", None)
    return Response(int(cast(int, rsp.Status)), str(comment) if comment else None)
