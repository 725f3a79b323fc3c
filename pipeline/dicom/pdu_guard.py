"""Limits on what a peer can make a DICOM upper layer read (pynetdicom 3.0.4).

pynetdicom reads a PDU in one blocking call sized by the peer's header: a client that
declares a 400 MiB A-ASSOCIATE-RQ and sends it gets 400 MiB of our memory, and one that
trickles a byte every few seconds holds its thread (and an association slot) for ever —
the socket timeout applies to each ``recv``, and the ARTIM timer is not looked at while
the read goes on. This module replaces ``DULServiceProvider._read_pdu_data`` with a
reader that:

* refuses a PDU by its header, before reading its body, when the declared length is
  above the limit: a P-DATA-TF may be as long as the maximum we advertised (what the
  peer was told), every other PDU at most ``CONTROL_PDU_LIMIT`` whatever that maximum;
* gives each PDU a deadline (``network_timeout`` from its first byte) and, while the
  association is being negotiated (state Sta2), the negotiation deadline of the
  connection (``negotiation_deadline``, set by the server) or the running ARTIM timer;
* grows its buffer as bytes arrive, so a declaration costs nothing.

A refused or late PDU ends the connection with an A-ABORT and one log line. It is
installed by the receive and send daemons and ``dicomflow echo`` whatever
``DICOMFLOW_FASTPATH`` says: it is a limit, not an optimisation. :func:`install` is idempotent.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom.acse import ACSE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

from pipeline.dicom.peer_reset import connection_lost_line
from pipeline.log import escape, logger

KiB = 1024
CONTROL_PDU_LIMIT = 256 * KiB  # A-ASSOCIATE-RQ/AC/RJ, A-RELEASE, A-ABORT: tiny in practice
UNLIMITED_PDATA_LIMIT = 64 * 1024 * KiB  # when we advertised 0 (no maximum)
RECV_FIRST = 64 * KiB  # first buffer; it doubles as bytes arrive, by at most RECV_STEP
RECV_STEP = 4 * 1024 * KiB
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
             0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
ABORT_REASON_INVALID_PARAMETER = 0x06

_lock = threading.Lock()
_installed = False
#: The pynetdicom 3.0.4 functions this module replaces or wraps (a test pins their source).
UPSTREAM: dict[str, Callable[..., Any]] = {
    "DULServiceProvider._read_pdu_data": DULServiceProvider._read_pdu_data,
    "ACSE.negotiate_association": ACSE.negotiate_association,
}


class _Late(Exception):
    """The PDU did not arrive within its deadline."""


class _Lost(Exception):
    """The peer closed or reset the connection: between PDUs, or in the middle of one."""

    def __init__(self, cause: BaseException | None, mid_pdu: bool) -> None:
        super().__init__(cause)
        self.cause, self.mid_pdu = cause, mid_pdu


def pdu_limit(dul: DULServiceProvider, pdu_type: int) -> int:
    """The longest PDU body (bytes after the 6-byte header) we take of this type.

    Before association (Sta2) only an A-ASSOCIATE-RQ is valid: nothing longer than a
    control PDU is read then, whatever its type."""
    if pdu_type != 0x04 or dul.state_machine.current_state == "Sta2":
        return CONTROL_PDU_LIMIT
    assoc = dul.assoc
    ours = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    advertised = ours.maximum_length
    return int(advertised) if advertised else UNLIMITED_PDATA_LIMIT


def negotiation_deadline(assoc: Any, deadline: float | None) -> None:
    """Set the monotonic time by which this association must have been negotiated."""
    assoc._df_negotiation_deadline = deadline


def _deadline(dul: DULServiceProvider) -> float:
    """When the PDU being read must be complete (``time.monotonic`` based)."""
    now = time.monotonic()
    timeout = dul.network_timeout
    deadline = now + (timeout if timeout is not None else 60.0)
    if dul.state_machine.current_state == "Sta2":  # waiting for the A-ASSOCIATE-RQ
        negotiation = getattr(dul.assoc, "_df_negotiation_deadline", None)
        if negotiation is not None:
            deadline = min(deadline, negotiation)
    artim = dul.artim_timer
    if artim._start_time is not None and artim._end_time is None and artim.timeout is not None:
        deadline = min(deadline, now + artim.remaining)
    return deadline


def recv_exact(sock: socket.socket, count: int, deadline: float) -> bytearray:
    """Read ``count`` bytes (fewer if the peer closes) by ``deadline``, else raise _Late.

    The socket's own timeout is restored afterwards (the DUL thread sends on it too).
    """
    buffer = bytearray(min(count, RECV_FIRST))
    got = 0
    saved = sock.gettimeout()
    try:
        while got < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Late
            sock.settimeout(remaining)
            if got == len(buffer):
                buffer.extend(bytes(min(count - got, len(buffer), RECV_STEP)))
            try:
                with memoryview(buffer) as view:
                    n = sock.recv_into(view[got:], len(buffer) - got)
            except TimeoutError:
                raise _Late from None
            if not n:
                break
            got += n
    finally:
        try:
            sock.settimeout(saved)
        except OSError:
            pass
    if got < len(buffer):
        del buffer[got:]
    return buffer


def _peer(dul: DULServiceProvider) -> str:
    assoc = dul.assoc
    peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        return f"{escape(peer.address)}:{peer.port}"
    except Exception:  # an address not known yet
        return "?"


def _drop(dul: DULServiceProvider, reason: str, abort_reason: int = 0x00) -> None:
    """End the connection now: an A-ABORT (best effort, never blocking), then close."""
    direction = "from" if dul.assoc.is_acceptor else "to"
    logger.warning("dropped connection {} {}: {}", direction, _peer(dul), reason)
    transport = cast(AssociationSocket, dul.socket)
    sock = transport.socket
    if sock is not None:
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = abort_reason
        try:
            sock.settimeout(0)
            sock.send(abort.encode())
        except OSError:
            pass
    transport.close()  # Evt17: the state machine goes to Sta1 (A-P-ABORT if established)


class _TooLong(Exception):
    """A PDU header declares more than its limit."""


def _read_pdu(dul: DULServiceProvider, sock: socket.socket, deadline: float) -> bytearray | None:
    """One whole PDU, or None with Evt17/Evt19 queued (closed, short, unknown type)."""
    from pynetdicom.dul import LOGGER

    try:
        head = recv_exact(sock, 6, deadline)
    except OSError as exc:
        raise _Lost(exc, mid_pdu=False) from None
    if len(head) < 6:
        if head:
            raise _Lost(None, mid_pdu=True)
        dul.event_queue.put("Evt17")  # closed between PDUs
        return None
    pdu_type, _, length = struct.unpack(">BBL", head)
    if pdu_type not in PDU_NAMES:
        LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        dul.event_queue.put("Evt19")
        return None
    limit = pdu_limit(dul, pdu_type)
    if length > limit:
        raise _TooLong(f"{PDU_NAMES[pdu_type]} PDU declaring {length} bytes (limit {limit})")
    try:
        body = recv_exact(sock, length, deadline)
    except OSError as exc:
        raise _Lost(exc, mid_pdu=True) from None
    if len(body) != length:
        raise _Lost(None, mid_pdu=True)
    return head + body


def _read_pdu_data(self: DULServiceProvider) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider._read_pdu_data`` with limits in size and
    time (see the module docstring); the events it queues are the same."""
    from pynetdicom.dul import LOGGER

    transport = cast(AssociationSocket, self.socket)
    sock = transport.socket if transport is not None else None
    if sock is None:
        self.event_queue.put("Evt17")
        return
    negotiating = self.state_machine.current_state == "Sta2"
    try:
        data = _read_pdu(self, sock, _deadline(self))
    except _TooLong as exc:
        _drop(self, str(exc), ABORT_REASON_INVALID_PARAMETER)
        return
    except _Late:
        phase = "association negotiation" if negotiating else "PDU"
        _drop(self, f"{phase} not complete within the time allowed")
        return
    except _Lost as lost:  # a normal network event: one line, no traceback
        line = connection_lost_line(self.assoc, lost.cause, lost.mid_pdu)
        (logger.warning if lost.mid_pdu else logger.info)("{}", line)
        self.event_queue.put("Evt17")
        return
    if data is None:
        return
    try:
        pdu, event = self._decode_pdu(data)
        self.event_queue.put(event)
    except Exception as exc:
        LOGGER.error(f"Unable to decode the received PDU data: {exc}")
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


# -- association slots ---------------------------------------------------------------------

def established_limit(ae: Any, limit: int | None) -> None:
    """Allow at most ``limit`` negotiated acceptor associations on ``ae``.

    pynetdicom counts every connection's thread against ``maximum_associations``,
    negotiated or not, so clients that never finish negotiating took every slot; with
    this limit only admitted associations count (the others are bounded by the server
    and by the negotiation deadline), and ``maximum_associations`` is a backstop."""
    ae._df_established_limit = limit


_admission = threading.Lock()
_orig_negotiate = UPSTREAM["ACSE.negotiate_association"]


def _counts(assoc: Any) -> bool:
    return bool(assoc.is_acceptor and (assoc.is_established or getattr(assoc, "_df_admitted", False))
                and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)
                and assoc.is_alive())


def _negotiate_association(self: ACSE) -> None:
    """``ACSE.negotiate_association``, first refusing (A-ASSOCIATE-RJ, local limit
    exceeded, as pynetdicom does) when the admitted associations fill the limit."""
    assoc = self.assoc
    limit = getattr(assoc.ae, "_df_established_limit", None)
    if not assoc.is_acceptor or limit is None:
        return _orig_negotiate(self)
    with _admission:
        busy = sum(1 for other in assoc.ae.active_associations if other is not assoc and _counts(other))
        admitted = busy < limit
        if admitted:
            assoc._df_admitted = True  # type: ignore[attr-defined]
    if not admitted:
        from pynetdicom import evt

        self.send_reject(0x02, 0x03, 0x02)  # transient, provider (presentation), local limit
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()
        return None
    return _orig_negotiate(self)


def install() -> None:
    """Install the limits (process-wide, idempotent, independent of the fast path)."""
    global _installed
    with _lock:
        if _installed:
            return
        DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
        ACSE.negotiate_association = _negotiate_association  # type: ignore[method-assign]
        _installed = True

