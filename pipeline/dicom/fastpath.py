"""Speed-ups for pynetdicom 3.0.x and pydicom in the daemons (issue 7; README, Performance).

Where a three-process pipeline spent its CPU, and what this module does about it:

* **Polling loops.** pynetdicom's DUL reactor sleeps 1 ms whenever it is idle and the
  association reactor sleeps 1 ms on every turn: ~2,000 wake-ups a second per
  association, and up to 1 ms of latency at each hand-over between the two threads
  (several per C-STORE). Both loops are replaced by copies that *wait for work*: the
  DUL thread blocks in ``select`` on its socket plus a wake-up pipe written whenever a
  primitive is queued for it; the association thread waits on an event set whenever
  a DIMSE message or an ACSE primitive is queued for it (or the DUL thread ends).
  Both still wake every ``IDLE_TICK`` to check their timers and kill flags.
* **4 KiB socket reads.** ``AssociationSocket.recv`` read a PDU 4 KiB at a time and
  appended each piece (128 calls and copies for a 0.5 MB PDU); it now reads straight
  into one buffer of the PDU's size.
* **DIMSE command sets.** Every C-STORE request/response is encoded twice through
  pydicom's general writer (once for the group length, once for real). Command sets
  are tiny and always Implicit VR Little Endian, so a small dedicated encoder does it;
  anything it does not know falls back to pydicom's.
* **Value validation.** pydicom validates every value set on a Dataset (regexes per
  UID/AE); the daemons build command sets and file metas from values they validate
  themselves, so validation is switched off for them.
* **C-STORE messages.** Sending a C-STORE request or response built a pydicom Dataset
  for its command set (a ``setattr`` per keyword, then values, deletions and a group
  length computed by encoding twice) before encoding it. For C-STORE the command set
  is now encoded straight from the primitive; pynetdicom's own ``encode_msg`` still
  fragments it and the data set. Anything unusual (move originator, error comment,
  a bound ``EVT_DIMSE_SENT`` handler) takes pynetdicom's path.
* **Logging handlers nobody reads.** pynetdicom binds four "standard" handlers to every
  association that format each PDU and DIMSE message into INFO/DEBUG lines (the whole
  C-STORE command set, every time) before the logger drops them. They are bound only
  when the ``pynetdicom`` logger would show INFO (``pynetdicom_log_level``).

Only the daemons call :func:`install`; it is idempotent. pynetdicom is pinned to 3.0.4
(pyproject.toml) because this relies on its private structure. ``DICOMFLOW_FASTPATH=0``
in the environment leaves pynetdicom and pydicom as they are (troubleshooting, and the
benchmark's before/after comparison).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
from io import BytesIO
from typing import Any, cast

import pydicom.config
import pynetdicom.dimse_messages as dimse_messages
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as _pydicom_encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationServer, AssociationSocket

IDLE_TICK = 0.02  # seconds between timer/kill-flag checks of an idle reactor
SEND_QUEUE_LIMIT = 16  # P-DATA primitives queued for sending (≤ 16 × max PDU in memory)

_installed = False
_lock = threading.Lock()


# -- waking queues ----------------------------------------------------------------------

class _Pipe:
    """A self-pipe to wake a thread blocked in ``select``; safe against late writers."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.lock = threading.Lock()
        self.closed = False

    def wake(self) -> None:
        with self.lock:
            if not self.closed:
                try:
                    os.write(self.w, b"\0")
                except BlockingIOError:  # already full of wake-ups
                    pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                os.close(self.r)
                os.close(self.w)


class _WakingQueue(queue.Queue):
    """A Queue that calls ``on_put`` after every put (to wake its consumer)."""

    def __init__(self, on_put) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


class _SendQueue(_WakingQueue):
    """The DUL's outgoing queue, bounded for P-DATA: pynetdicom's chunked send queues a
    whole file's PDUs before the DUL thread has sent any, so a 1 GiB object sat in
    memory (557 MB peak RSS measured). A producer now waits while ``SEND_QUEUE_LIMIT``
    P-DATA primitives are pending — unless the DUL thread is gone, when waiting would
    hang it forever (the PDU could never be sent; the DIMSE timeout reports it).

    Waiting here is also where a slow destination keeps the producer, so the message's
    ``deadline`` (its DIMSE timeout, which the sender sizes by ``min_transfer_rate``)
    is enforced here: past it, ``on_overdue`` ends the association."""

    def __init__(self, dul: DULServiceProvider) -> None:
        super().__init__(lambda: _dul_wake(dul))
        self._dul = dul
        self._pending = threading.Semaphore(SEND_QUEUE_LIMIT)
        self.deadline: float | None = None
        self.on_overdue = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, P_DATA) and threading.current_thread() is not self._dul:
            while not self._pending.acquire(timeout=0.5 if not self._dul_gone() else 0):
                if self._dul_gone():
                    return  # checked before every wait: the rest of a file drops at once
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.deadline = None
                    if self.on_overdue is not None:
                        self.on_overdue()
                    return
            item._df_bounded = True
        super().put(item, block, timeout)

    def _dul_gone(self) -> bool:
        dul = self._dul
        return bool(dul._kill_thread) or (dul.ident is not None and not dul.is_alive())

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        item = super().get(block, timeout)
        if getattr(item, "_df_bounded", False):
            self._pending.release()
        return item


def _dul_wake(dul: DULServiceProvider) -> None:
    pipe = getattr(dul, "_df_pipe", None)
    if pipe is not None and threading.current_thread() is not dul:
        pipe.wake()


def wake_dul(dul: DULServiceProvider) -> None:
    """Wake the DUL thread (to notice its kill flag); a no-op without the fast path."""
    _dul_wake(dul)


def _assoc_wake(dul: DULServiceProvider) -> None:
    event = getattr(dul, "_df_assoc_event", None)
    if event is not None:
        event.set()


_orig_dul_init = DULServiceProvider.__init__
_orig_dimse_init = DIMSEServiceProvider.__init__


def _dul_init(self: DULServiceProvider, assoc: Association) -> None:
    _orig_dul_init(self, assoc)
    self._df_pipe = None
    self._df_assoc_event = threading.Event()
    assoc._df_event = self._df_assoc_event
    # Primitives to send and state-machine events wake the DUL thread; primitives
    # for the user (A-RELEASE, A-ABORT…) wake the association thread.
    self.to_provider_queue = _SendQueue(self)
    self.event_queue = _WakingQueue(lambda: _dul_wake(self))
    self.to_user_queue = _WakingQueue(lambda: _assoc_wake(self))


def _dimse_init(self: DIMSEServiceProvider, assoc: Association) -> None:
    _orig_dimse_init(self, assoc)
    event = getattr(assoc, "_df_event", None)
    if event is not None:
        self.msg_queue = _WakingQueue(event.set)


# -- the DUL reactor ----------------------------------------------------------------------

def _dul_wait(dul: DULServiceProvider) -> None:
    """Sleep until the socket is readable, a primitive/event is queued, or a tick."""
    transport = cast(AssociationSocket, dul.socket)
    sock = transport.socket if transport is not None else None
    if sock is None or not getattr(transport, "_is_connected", False):
        time.sleep(dul._run_loop_delay)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return
    pipe = dul._df_pipe
    if pipe is None:
        pipe = dul._df_pipe = _Pipe()
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    try:
        select.select([sock, pipe.r], [], [], IDLE_TICK)
    except (OSError, ValueError):
        time.sleep(dul._run_loop_delay)  # socket closed under us: the loop finds out
        return
    pipe.drain()


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` with the 1 ms sleep
    replaced by :func:`_dul_wait` (event-driven)."""
    self._idle_timer.start()
    sleep = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _dul_wait(self)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                from pynetdicom.dul import LOGGER

                if isinstance(exc, OSError):
                    # The peer closed or reset the connection (gdcmscu aborts on exit):
                    # a network event, one line without a traceback.
                    from pipeline.dicom.peer_reset import connection_lost_line

                    LOGGER.info(connection_lost_line(self.assoc, exc, mid_pdu=False))
                else:
                    LOGGER.error("Exception in DUL.run(), aborting association")
                    LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                cast(AssociationSocket, self.socket).send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False
    finally:
        _assoc_wake(self)
        pipe, self._df_pipe = self._df_pipe, None
        if pipe is not None:
            pipe.close()


def _dul_kill(self: DULServiceProvider) -> None:
    self._kill_thread = True
    _dul_wake(self)


def _dul_stop(self: DULServiceProvider) -> bool:
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _dul_wake(self)
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True
    return False


# -- the association reactor ---------------------------------------------------------------

def _assoc_run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor`` with the 1 ms sleep per turn
    replaced by a wait for a DIMSE message, an ACSE primitive or the DUL's end.

    ``_is_paused`` is True while waiting (the reactor touches nothing then), so a
    ``send_*`` that pauses the reactor does not have to wait for it to come round.
    """
    from pynetdicom.association import LOGGER

    event: threading.Event | None = getattr(self, "_df_event", None)
    self._is_paused = False
    busy = False
    while not self._kill:
        self._is_paused = True
        if not busy:
            if event is not None:
                event.wait(IDLE_TICK)
                event.clear()
            else:
                time.sleep(0.001)
        self._reactor_checkpoint.wait()
        self._is_paused = False
        busy = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            busy = True
            self._serve_request(msg, cast(int, context_id))

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


# -- default handlers -------------------------------------------------------------------

_orig_bind_defaults = Association._bind_defaults


def _bind_defaults(self: Association) -> None:
    """pynetdicom's ``_bind_defaults``, minus the logging handlers when their output
    (INFO and DEBUG lines of the ``pynetdicom`` logger) would be dropped anyway."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _orig_bind_defaults(self)
        return
    for event in evt._INTERVENTION_EVENTS:
        self.bind(event, evt.get_default_handler(event))


_orig_server_bind_defaults = AssociationServer._bind_defaults


def _server_bind_defaults(self: AssociationServer) -> None:
    """The same for a server: its handlers are copied to every association it accepts,
    so binding the logging handlers here put them back on every acceptor (and kept the
    receiver's C-STORE responses off the direct encoder)."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _orig_server_bind_defaults(self)
        return
    for event in evt._INTERVENTION_EVENTS:
        self.bind(event, evt.get_default_handler(event))


# -- socket reads -------------------------------------------------------------------------

RECV_STEP = 4 * 1024 * 1024  # buffer growth step: memory follows the bytes that arrive


def _socket_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` with few large reads (pynetdicom reads 4 KiB pieces and appends).

    The length comes from the peer's PDU header: the buffer grows in steps as data
    actually arrives, so a client that merely *declares* a 2 GiB PDU costs nothing.
    """
    sock = self.socket
    assert sock is not None
    buffer = bytearray(min(nr_bytes, RECV_STEP))
    got = 0
    while got < nr_bytes:
        if got == len(buffer):
            buffer.extend(bytes(min(nr_bytes - got, RECV_STEP)))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[got:], len(buffer) - got)
        if not count:
            break
        got += count
    if got < len(buffer):
        del buffer[got:]
    return buffer


# -- DIMSE command sets -------------------------------------------------------------------

_NUMBERS = {"US": "<H", "UL": "<L", "SS": "<h", "SL": "<l", "FL": "<f", "FD": "<d"}
_TEXT = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}


def _values(value: Any) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str | int | float | bytes):
        return [value]
    return list(value)


def _encode_element(tag: int, vr: str, value: Any) -> bytes | None:
    """One Implicit VR element, or None for anything unusual (then pydicom encodes it).

    Values can come from a peer (a response echoes the request's UIDs): a non-ASCII
    UID, an out-of-range number or an odd type is not an error here, only a reason to
    take the general path."""
    try:
        return _encode_element_strict(tag, vr, value)
    except (UnicodeEncodeError, struct.error, TypeError, ValueError, OverflowError):
        return None


def _encode_element_strict(tag: int, vr: str, value: Any) -> bytes | None:
    values = _values(value)
    if vr in _NUMBERS:
        if not all(isinstance(v, int | float) for v in values):
            return None
        body = struct.pack("<" + _NUMBERS[vr][1] * len(values), *values)
    elif vr == "UI":
        if not all(isinstance(v, str) for v in values):
            return None
        body = "\\".join(values).encode("ascii")
        if len(body) % 2:
            body += b"\0"
    elif vr in _TEXT:
        if not all(isinstance(v, str) for v in values):
            return None
        body = "\\".join(values).encode("ascii")
        if len(body) % 2:
            body += b" "
    elif vr == "AT":
        if not all(isinstance(v, int) for v in values):
            return None
        body = b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in values)
    else:
        return None
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(body)) + body


def encode_command_set(ds: Any, is_implicit_vr: bool, is_little_endian: bool,
                       deflated: bool = False) -> bytes | None:
    """Encode a DIMSE command set (group 0000, Implicit VR Little Endian) quickly;
    anything else, or any value of an unexpected type, goes to pydicom's encoder."""
    if isinstance(ds, _EncodedCommand):
        return ds.data
    if not (is_implicit_vr and is_little_endian) or deflated:
        return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
    parts = []
    try:
        for tag in sorted(ds.keys()):
            if tag >> 16 != 0x0000:
                return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
            elem = ds[tag]
            encoded = _encode_element(int(tag), elem.VR, elem.value)
            if encoded is None:
                return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
            parts.append(encoded)
    except (UnicodeEncodeError, struct.error, TypeError, ValueError, KeyError):
        return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
    return b"".join(parts)


class _EncodedCommand:
    """A command set already encoded (what :func:`encode_command_set` returns as is)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


#: C-STORE command elements after the group length, in tag order: (tag, VR, keyword or
#: a fixed value). Optional elements absent from the primitive are left out.
_C_STORE_RQ = ((0x00000002, "UI", "AffectedSOPClassUID"), (0x00000100, "US", 0x0001),
               (0x00000110, "US", "MessageID"), (0x00000700, "US", "Priority"),
               (0x00000800, "US", None), (0x00001000, "UI", "AffectedSOPInstanceUID"))
_C_STORE_RSP = ((0x00000002, "UI", "AffectedSOPClassUID"), (0x00000100, "US", 0x8001),
                (0x00000120, "US", "MessageIDBeingRespondedTo"), (0x00000800, "US", 0x0101),
                (0x00000900, "US", "Status"), (0x00001000, "UI", "AffectedSOPInstanceUID"))
_C_STORE_UNUSUAL = ("MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
                    "OffendingElement", "ErrorComment")


def encode_c_store_command(primitive: C_STORE) -> bytes | None:
    """The command set pynetdicom would encode for a C-STORE request or response
    primitive, or None when this encoder does not cover it."""
    try:
        return _encode_c_store_command(primitive)
    except (UnicodeEncodeError, struct.error, TypeError, ValueError, OverflowError, AttributeError):
        return None  # values from a peer this encoder does not cover: pynetdicom's path


def _encode_c_store_command(primitive: C_STORE) -> bytes | None:
    if any(getattr(primitive, name, None) is not None for name in _C_STORE_UNUSUAL):
        return None
    is_request = primitive.MessageIDBeingRespondedTo is None
    if is_request:
        has_data = bool(primitive.DataSet) or bool(getattr(primitive, "_dataset_path", None))
        data_type = 0x0001 if has_data else 0x0101
    parts = []
    for tag, vr, source in _C_STORE_RQ if is_request else _C_STORE_RSP:
        if source is None:
            value: Any = data_type
        elif isinstance(source, int):
            value = source
        else:
            value = getattr(primitive, source)
            if value is None:
                continue
        encoded = _encode_element(tag, vr, value)
        if encoded is None:
            return None
        parts.append(encoded)
    body = b"".join(parts)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


_orig_send_msg = DIMSEServiceProvider.send_msg


def _dimse_send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """pynetdicom's ``send_msg`` with C-STORE command sets encoded directly."""
    if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        command = encode_c_store_command(primitive)
        if command is not None:
            if primitive.MessageIDBeingRespondedTo is None:
                msg = dimse_messages.C_STORE_RQ.__new__(dimse_messages.C_STORE_RQ)
                msg.data_set = primitive.DataSet
            else:
                msg = dimse_messages.C_STORE_RSP.__new__(dimse_messages.C_STORE_RSP)
                msg.data_set = BytesIO()
            msg.command_set = _EncodedCommand(command)  # type: ignore[assignment]
            msg.context_id = context_id
            msg._data_set_path = getattr(primitive, "_dataset_path", None)
            msg._data_set_file = None
            with _deadline(self):
                for pdata in msg.encode_msg(context_id, self.maximum_pdu_size):
                    self.dul.send_pdu(pdata)
            return
    with _deadline(self):
        _orig_send_msg(self, primitive, context_id)


@contextlib.contextmanager
def _deadline(dimse: DIMSEServiceProvider):
    """While a message is queued for sending, its DIMSE timeout bounds the whole
    transfer (pynetdicom applies it only to the wait for the response)."""
    queue_ = getattr(dimse.dul, "to_provider_queue", None)
    timeout = getattr(dimse, "dimse_timeout", None)
    if not isinstance(queue_, _SendQueue) or timeout is None:
        yield
        return
    queue_.deadline = time.monotonic() + timeout
    try:
        yield
    finally:
        queue_.deadline = None


# -- installing ---------------------------------------------------------------------------

def tune_pydicom() -> None:
    """No per-value validation in the daemons (they validate what reaches a path)."""
    if os.environ.get("DICOMFLOW_FASTPATH", "1") == "0":
        return
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def install() -> None:
    """Install every speed-up of this module (process-wide, idempotent)."""
    global _installed
    with _lock:
        if _installed or os.environ.get("DICOMFLOW_FASTPATH", "1") == "0":
            return
        tune_pydicom()
        DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.stop_dul = _dul_stop  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
        DIMSEServiceProvider.__init__ = _dimse_init  # type: ignore[method-assign]
        Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
        Association._bind_defaults = _bind_defaults  # type: ignore[method-assign]
        AssociationServer._bind_defaults = _server_bind_defaults  # type: ignore[method-assign]
        AssociationSocket.recv = _socket_recv  # type: ignore[method-assign]
        dimse_messages.encode = encode_command_set  # type: ignore[assignment]
        DIMSEServiceProvider.send_msg = _dimse_send_msg  # type: ignore[method-assign]
        _installed = True


# -- file meta ------------------------------------------------------------------------------

_META_HEAD = 16 * 1024
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"UV"}


def read_meta_elements(path: Any) -> dict[int, bytes] | None:
    """The raw values of a Part-10 file's meta group (explicit VR little endian), read
    with one ``pread`` — or None when the file is anything but plain (no preamble, an
    odd layout, a meta larger than 16 KiB): the caller then asks pydicom."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        return None
    try:
        head = os.pread(fd, _META_HEAD, 0)
    finally:
        os.close(fd)
    if len(head) < 144 or head[128:132] != b"DICM":
        return None
    values: dict[int, bytes] = {}
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return values
        vr = head[offset + 4: offset + 6]
        if vr in _LONG_VR:
            if offset + 12 > len(head):
                return None
            length = struct.unpack_from("<L", head, offset + 8)[0]
            start = offset + 12
        elif vr.isalpha() and vr.isupper():
            length = struct.unpack_from("<H", head, offset + 6)[0]
            start = offset + 8
        else:
            return None
        if start + length > len(head):
            return None
        values[group << 16 | element] = head[start: start + length]
        offset = start + length
    return None
