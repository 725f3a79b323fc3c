"""What keeps one outgoing association bounded: the C-STORE response race fix, socket
options, a send that cannot block for ever, and cutting an association whatever the
peer does (README, Design notes). :mod:`pipeline.dicom.scu` installs these on every
association it requests through :data:`HANDLERS`.

Facts this module is built on:

* the requestor's reactor thread can take a C-STORE-RSP off the DIMSE queue before the
  waiting ``send_c_store`` does, which then hangs until its timeout. ``_serve_request``
  is where the reactor drops such a message ("Received unexpected … service message"):
  :func:`install_response_handback` puts responses back for the waiting send;
* pynetdicom never sets TCP_NODELAY (Nagle costs ~3x on small files), nor keepalive;
* pynetdicom clears the timeout of the outgoing socket once connected: a destination
  that stops reading blocks its DUL thread in ``socket.send`` for ever, and with it
  every abort (``Association.kill`` waits for that thread). :func:`_on_conn_open`
  gives the socket a send timeout and :func:`cut` ends an association without
  waiting on anything the peer does.
"""

from __future__ import annotations

import socket
import threading
import time
import types
from typing import cast

from pynetdicom import Association, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import AssociationSocket

from pipeline.dicom import reactors

ABORT_WAIT = 2.0  # an A-ABORT is sent, not answered: longer means the DUL thread is stuck

# -- the race fix --------------------------------------------------------------------

def _serve_request_with_handback(self: Association, msg, context_id: int) -> None:
    """The reactor's ``_serve_request``, except that a *response* reaching it on the
    requesting side is put back on the DIMSE queue for the ``send_*`` waiting for it.

    Why this is enough: the reactor only gets there when it raced past its pause
    checkpoint; its next loop iteration blocks on that (cleared) checkpoint, so the
    waiting send takes the message from the queue.
    """
    if self.is_requestor and not msg.is_valid_request and msg.is_valid_response:
        self._dicomflow_handbacks = getattr(self, "_dicomflow_handbacks", 0) + 1  # type: ignore[attr-defined]
        self.dimse.msg_queue.put((context_id, msg))
        return
    Association._serve_request(self, msg, context_id)


def install_response_handback(assoc: Association) -> None:
    assoc._serve_request = types.MethodType(_serve_request_with_handback, assoc)  # type: ignore


def handbacks(assoc: Association) -> int:
    """How many responses the fix rescued on this association (tests, debugging)."""
    return getattr(assoc, "_dicomflow_handbacks", 0)


# -- socket options and TLS ----------------------------------------------------------

def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (small files ~3x faster, README: Design notes) and keepalive (dead peers)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _on_conn_open(event: evt.Event) -> None:
    assoc = event.assoc
    assoc._dicomflow_connected = True  # type: ignore[attr-defined]
    transport = cast(AssociationSocket, assoc.dul.socket)  # set before EVT_CONN_OPEN fires
    sock = transport.socket
    if sock is not None:
        tune_socket(sock)
        # fixed now: a C-STORE later sets dimse_timeout sized to its file, not this
        assoc._dicomflow_send_timeout = send_timeout(assoc)  # type: ignore[attr-defined]
        sock.settimeout(assoc._dicomflow_send_timeout)  # type: ignore[attr-defined]
    transport.send = types.MethodType(_bounded_send, transport)  # type: ignore[method-assign]
    # pynetdicom re-points ``abort`` at ``_abort_blocking`` around every event handler
    assoc._abort_blocking = types.MethodType(  # type: ignore[method-assign]
        _bounded_abort(assoc._abort_blocking), assoc)
    if "abort" in vars(assoc):
        assoc.abort = assoc._abort_blocking  # type: ignore[method-assign]
    if hasattr(assoc.dul.to_provider_queue, "on_overdue"):  # the fast path's bounded queue
        assoc.dul.to_provider_queue.on_overdue = lambda: cut(assoc, overdue_reason(assoc))
    install_response_handback(assoc)


# -- bounded sending and cutting an association -----------------------------------------

def send_timeout(assoc: Association) -> float:
    """How long one ``socket.send`` may make no progress: the endpoint's DIMSE timeout
    (a destination that takes no byte for that long is not going to answer either)."""
    return float(getattr(assoc, "_dicomflow_send_timeout", None) or assoc.dimse_timeout or 60.0)


def stalled_reason(assoc: Association) -> str:
    """Why a destination that took no byte for the send timeout was cut (both send
    paths: pynetdicom's DUL and :mod:`store_send`)."""
    return (f"the destination stopped reading: nothing could be sent to it for "
            f"{send_timeout(assoc):g}s (dimse_timeout)")


def overdue_reason(assoc: Association) -> str:
    """Why a transfer longer than its message's DIMSE timeout was cut."""
    return (f"the transfer took longer than its DIMSE timeout ({assoc.dimse_timeout:g}s: "
            f"dimse_timeout plus the file at min_transfer_rate)")


def _bounded_send(transport, bytestream: bytes) -> None:
    """pynetdicom's ``AssociationSocket.send`` on a socket with a timeout: a destination
    that stops reading ends the association (:func:`cut`) instead of blocking the DUL
    thread — and every abort waiting for it — for ever. Records when a send started, so
    a shutdown can tell a blocked transfer from a slow one."""
    assoc = transport.assoc
    sock = transport.socket
    total, length = 0, len(bytestream)
    transport._dicomflow_sending_since = time.monotonic()
    try:
        while total < length:
            total += sock.send(bytestream[total:])
            transport._dicomflow_sending_since = transport._dicomflow_last_sent = time.monotonic()
        evt.trigger(assoc, evt.EVT_DATA_SENT, {"data": bytestream})
    except TimeoutError:
        cut(assoc, stalled_reason(assoc))
    except Exception:  # noqa: BLE001 - as pynetdicom: any socket error closes the transport
        transport.event_queue.put("Evt17")
    finally:
        transport._dicomflow_sending_since = None


def _bounded_abort(abort):
    """``Association.abort`` that never waits on a stuck DUL thread: pynetdicom's own
    abort (also called inside ``send_*`` after a DIMSE timeout) waits for the DUL to
    send the A-ABORT, which it cannot while blocked on a peer that reads nothing."""
    def bounded(assoc: Association, block: bool = True) -> None:
        if not block:
            abort(block=False)
            return
        _run_bounded(assoc, abort, ABORT_WAIT, f"the destination stopped reading (an A-ABORT "
                                               f"could not be sent to it within {ABORT_WAIT:g}s)")
    return bounded


def _run_bounded(assoc: Association, call, timeout: float, why: str) -> None:
    """Run ``call()`` in a helper thread for at most ``timeout``, then :func:`cut`."""
    def run() -> None:
        try:
            call()
        except Exception:  # noqa: BLE001 - a dying peer must not matter here
            pass
    worker = threading.Thread(target=run, name="dicomflow-close", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        cut(assoc, why)
        worker.join(1.0)


def send_blocked_for(assoc: Association) -> float:
    """Seconds the current ``socket.send`` has been waiting without progress (0 when
    not sending)."""
    transport = getattr(assoc.dul, "socket", None)
    since = getattr(transport, "_dicomflow_sending_since", None)
    return 0.0 if since is None else time.monotonic() - since


def exchange_quiet_for(assoc: Association) -> float:
    """Seconds since a byte last went out while a ``send_*`` exchange is in flight (its
    reactor is paused then), i.e. how long the peer has kept us waiting; 0 otherwise."""
    if assoc._reactor_checkpoint.is_set():
        return 0.0
    transport = getattr(assoc.dul, "socket", None)
    last = getattr(transport, "_dicomflow_last_sent", None)
    return 0.0 if last is None else time.monotonic() - last


def is_usable(assoc: Association) -> bool:
    """Established, and its connection still open. pynetdicom clears ``is_established``
    only once its reactor has handled a closed connection or an abort — possibly after a
    ``send_*`` has already returned empty-handed — so the transport and the state
    machine are asked too: a connection that is gone is the endpoint's trouble, never a
    file's."""
    if not assoc.is_established or stall_reason(assoc) is not None:
        return False
    transport = getattr(assoc.dul, "socket", None)
    if getattr(transport, "socket", None) is None:
        return False
    return assoc.dul.state_machine.current_state == "Sta6"  # data transfer


def stall_reason(assoc: Association | None) -> str | None:
    """Why :func:`cut` ended ``assoc``, if it did."""
    return getattr(assoc, "_dicomflow_cut", None) if assoc is not None else None


def cut(assoc: Association, reason: str) -> None:
    """End ``assoc`` at once, whatever the peer does: mark it aborted, stop its DUL
    thread, shut the socket down (a ``send`` blocked on it returns) and wake a
    ``send_*`` waiting for a response. Safe from any thread, more than once. A
    handed-over association (:mod:`send_session`) is cut by its session, which shuts
    the connection down without closing a descriptor its thread may still use."""
    session = getattr(assoc, "_df_send_session", None)
    if session is not None:
        session.cut(reason)
        return
    if getattr(assoc, "_dicomflow_cut", None) is None:
        assoc._dicomflow_cut = reason  # type: ignore[attr-defined]
    assoc.is_established = False
    assoc.is_aborted = True
    assoc._kill = True  # the reactor's checkpoint is left alone: a paused reactor
    # would take the wake-up below meant for the waiting send_*; that send sets it
    dul = assoc.dul
    dul._kill_thread = True
    transport = getattr(dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass
    reactors.wake_dul(dul)
    try:
        assoc.dimse.msg_queue.put((None, None))  # a waiting send_c_store returns "no response"
    except Exception:  # noqa: BLE001 - best effort: the DIMSE timeout still bounds the wait
        pass


def close(assoc: Association, abort: bool = False, timeout: float = 10.0) -> None:
    """Release (or abort) ``assoc`` without ever waiting on the peer for more than
    ``timeout``: pynetdicom's own release/abort runs in a helper thread; if it is not
    done in time the association is :func:`cut`."""
    if not assoc.is_established:
        if assoc.dul.is_alive():
            cut(assoc, "closed")
        return
    if abort:
        assoc.abort()  # bounded by _bounded_abort
    else:
        _run_bounded(assoc, assoc.release, timeout, "no answer to the release request")


HANDLERS: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, _on_conn_open)]
