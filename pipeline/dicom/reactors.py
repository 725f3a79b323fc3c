"""pynetdicom's DUL and association reactors, waiting for work instead of polling
(README, Performance: switch ``reactors``).

pynetdicom's DUL reactor sleeps 1 ms whenever it is idle and the association reactor
sleeps 1 ms on every turn: ~2,000 wake-ups a second per association, and up to 1 ms of
latency at each hand-over between the two threads (several per C-STORE). Both loops
are replaced by copies that *wait for work*: the DUL thread blocks in ``select`` on its
socket plus a wake-up pipe written whenever a primitive is queued for it; the
association thread waits on an event set whenever a DIMSE message or an ACSE
primitive is queued for it (or the DUL thread ends). Both still wake every
``IDLE_TICK`` to check their timers and kill flags.

The DUL's outgoing queue is also bounded (:class:`_SendQueue`): pynetdicom queued a
whole file's PDUs before sending any (557 MB peak RSS for a 1 GiB object, 75 MB now),
and the wait there is where a message's DIMSE timeout bounds a slow transfer
(:func:`deadline`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

IDLE_TICK = 0.02  # seconds between timer/kill-flag checks of an idle reactor
SEND_QUEUE_LIMIT = 16  # P-DATA primitives queued for sending (≤ 16 × max PDU in memory)


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
            item._df_bounded = True  # type: ignore[attr-defined]
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
    self._df_pipe = None  # type: ignore[attr-defined]
    self._df_handover = None  # type: ignore[attr-defined]
    self._df_assoc_event = threading.Event()  # type: ignore[attr-defined]
    assoc._df_event = self._df_assoc_event  # type: ignore[attr-defined]
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
    pipe = dul._df_pipe  # type: ignore[attr-defined]
    if pipe is None:
        pipe = dul._df_pipe = _Pipe()  # type: ignore[attr-defined]
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
            if self._df_handover is not None and self.state_machine.current_state == "Sta6":  # type: ignore[attr-defined]
                self._df_handover.set()  # type: ignore[attr-defined]
                return  # the A-ASSOCIATE-AC is out and nothing more was read
    finally:
        _assoc_wake(self)
        pipe, self._df_pipe = self._df_pipe, None  # type: ignore[attr-defined]
        if pipe is not None:
            pipe.close()


def request_handover(dul: DULServiceProvider) -> bool:
    """Ask the DUL thread to stop once the association is established (state Sta6,
    right after it sent the A-ASSOCIATE-AC, before it reads anything more), leaving the
    socket to the association's thread (:mod:`store_receive`). False when this
    reactor is not installed (switch ``reactors`` off): no hand-over then."""
    if not hasattr(dul, "_df_handover"):
        return False
    dul._df_handover = threading.Event()  # type: ignore[attr-defined]
    return True


def handed_over(dul: DULServiceProvider, timeout: float) -> bool:
    """Wait (at most ``timeout``) for the DUL thread to hand the socket over; True once
    it has and its thread is gone."""
    event: threading.Event | None = getattr(dul, "_df_handover", None)
    if event is None:
        return False
    deadline = time.monotonic() + timeout
    while not event.wait(0.01):  # a DUL thread that died otherwise must not hold us
        if not dul.is_alive() or time.monotonic() >= deadline:
            return event.is_set()
    dul.join(max(deadline - time.monotonic(), 0.0))
    return not dul.is_alive()


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


@contextlib.contextmanager
def deadline(dimse: DIMSEServiceProvider) -> Iterator[None]:
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


def install() -> None:
    """Replace the reactors and the queues they wait on (process-wide)."""
    DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = _dul_stop  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
    DIMSEServiceProvider.__init__ = _dimse_init  # type: ignore[method-assign]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
