"""One quiet line when a peer closes or resets its connection, instead of a traceback.

Many DICOM stacks end an association by aborting it or by closing the socket (GDCM's
``gdcmscu`` aborts on exit, others reset after the last response). pynetdicom's DUL
logs such an ``OSError`` as an ERROR line followed by ``LOGGER.exception`` (a
traceback): "Connection closed before the entire PDU was received" when it happens
while reading a PDU, "Exception in DUL.run(), aborting association" in the reactor.
Both are normal network events for a daemon, not bugs.

:class:`PeerResetFilter` sits on pynetdicom's DUL logger and rewrites each such pair of
records into one line without a traceback: INFO when the peer left between PDUs (after
its last response), WARNING when it left in the middle of a PDU (a transfer was cut) or
stayed silent beyond the network timeout.
Anything that is not an ``OSError`` keeps its ERROR line and traceback (a real bug).
It works with pynetdicom's own reactor (``DICOMFLOW_FASTPATH=0``) as with the fast path.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

from pipeline.names import escape

DUL_LOGGER = "pynetdicom.dul"
_HEADERS = (
    "Connection closed before the entire PDU was received",
    "Exception in DUL.run(), aborting association",
)


def describe_peer(assoc: Any) -> str:
    """``AE (address:port)`` of the other side of an association, or ``peer``."""
    try:
        peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        return f"{escape(str(peer.ae_title).strip()) or '?'} ({escape(peer.address)}:{peer.port})"
    except Exception:
        return "peer"


def connection_lost_line(assoc: Any, exc: BaseException | None, mid_pdu: bool) -> str:
    """The one line that says a peer closed its connection (``exc`` None: an orderly
    close), reset it, or went silent."""
    where = "in the middle of a PDU" if mid_pdu else "after its last PDU"
    if isinstance(exc, TimeoutError):
        return (f"connection from {describe_peer(assoc)} timed out {where} "
                "(no data within the network timeout)")
    reason = "closed" if exc is None else getattr(exc, "strerror", None) or type(exc).__name__
    return f"connection from {describe_peer(assoc)} closed by the peer {where} ({reason})"


class PeerResetFilter(logging.Filter):
    """Turns pynetdicom's "header line + traceback" for an OSError into one line."""

    def __init__(self) -> None:
        super().__init__()
        self._held = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: logging.LogRecord | None = getattr(self._held, "record", None)
        if record.exc_info is None and record.msg in _HEADERS:
            if held is not None:
                _emit(held)
            self._held.record = record  # wait for the exception that follows it
            return False
        self._held.record = None
        exc = record.exc_info[1] if record.exc_info else None
        if held is None:
            return True
        if not isinstance(exc, OSError):
            if exc is None:
                _emit(held)
            else:
                record.msg, record.args = f"{held.msg}: %s", (exc,)
            return True
        dul, mid_pdu = _dul_frame(record.exc_info[2] if record.exc_info else None)
        record.msg = connection_lost_line(getattr(dul, "assoc", None), exc, mid_pdu)
        record.args = None
        record.exc_info, record.exc_text = None, None
        record.levelno = logging.WARNING if mid_pdu or isinstance(exc, TimeoutError) else logging.INFO
        record.levelname = logging.getLevelName(record.levelno)
        return True


def _emit(record: logging.LogRecord) -> None:
    logging.getLogger(record.name).callHandlers(record)


def _dul_frame(tb: TracebackType | None) -> tuple[Any, bool]:
    """The DUL that was reading, and whether part of a PDU had arrived already."""
    dul, mid_pdu = None, False
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("_read_pdu_data", "run_reactor", "_dul_run_reactor"):
            dul = frame.f_locals.get("self", dul)
            received = frame.f_locals.get("bytestream")
            mid_pdu = mid_pdu or bool(received)
        tb = tb.tb_next
    return dul, mid_pdu


ASSOCIATION_LOGGER = "pynetdicom.association"
#: pynetdicom's words for a connection that ended while a ``send_*`` waited for its
#: answer; the daemon says it better itself (the sender's "endpoint down: …" line)
_SAID_BY_US = ("Connection closed while waiting for DIMSE message",)


class LostWhileWaitingFilter(logging.Filter):
    """Demotes pynetdicom's ERROR for a connection lost during a ``send_*`` to DEBUG:
    the sender reports it once, as the endpoint's trouble."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in _SAID_BY_US:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def install() -> None:
    """Put the filters on pynetdicom's loggers (idempotent, process-wide)."""
    for name, kind in ((DUL_LOGGER, PeerResetFilter), (ASSOCIATION_LOGGER, LostWhileWaitingFilter)):
        target = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in target.filters):
            target.addFilter(kind())
