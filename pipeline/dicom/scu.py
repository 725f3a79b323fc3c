"""Outgoing associations: AE set-up, presentation contexts, socket options, TLS, and a
fix for pynetdicom 3.0.4's C-STORE response race (README, Design notes).

Facts this module is built on:

* chunked send (``send_c_store(path)``) needs an accepted context with *exactly* the
  file's transfer syntax, so every context carries one transfer syntax;
* pynetdicom never sets TCP_NODELAY (Nagle costs ~3x on small files), nor keepalive;
* the requestor's reactor thread can take a C-STORE-RSP off the DIMSE queue before the
  waiting ``send_c_store`` does, which then hangs until its timeout. ``_serve_request``
  is where the reactor drops such a message ("Received unexpected … service message"):
  :func:`install_response_handback` puts responses back for the waiting send;
* pynetdicom clears the timeout of the outgoing socket once connected: a destination
  that stops reading blocks its DUL thread in ``socket.send`` for ever, and with it
  every abort (``Association.kill`` waits for that thread). :func:`_on_conn_open`
  gives the socket a send timeout and :func:`cut` ends an association without
  waiting on anything the peer does.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import AE, Association, _config, evt
from pynetdicom.presentation import PresentationContext, build_context

from pipeline.config import EndpointConfig, TlsConfig
from pipeline.dicom import fastpath
from pipeline.transcode import UNCOMPRESSED

MAX_CONTEXTS = 128
RELEASE_WAIT = 10.0  # at most this long for a peer's A-RELEASE-RP (or an abort) to complete
ABORT_WAIT = 2.0     # an A-ABORT is sent, not answered: longer means the DUL thread is stuck
VERIFICATION = UID("1.2.840.10008.1.1")



def configure() -> None:
    """Process-wide pynetdicom setting of a sending process: stream each file from disk
    (only its file meta is read into memory). Called by :func:`patches.install`."""
    _config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class FileMeta:
    """What the sender needs to know of a file before sending it (from its meta only)."""

    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID
    source_ae: str | None
    size: int


def contexts_for(pairs: Iterable[tuple[str, str]], fallback: bool) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) pair, plus — when ``fallback`` — an
    Explicit and an Implicit VR Little Endian context per SOP class, to learn whether
    the destination would take the class uncompressed (the transcoding fallback)."""
    wanted: list[tuple[str, str]] = []
    for pair in pairs:
        if pair not in wanted:
            wanted.append(pair)
    if fallback:
        for sop, _ts in list(wanted):
            for ts in UNCOMPRESSED:
                if (sop, ts) not in wanted:
                    wanted.append((sop, ts))
    if len(wanted) > MAX_CONTEXTS:
        raise ValueError(f"{len(wanted)} presentation contexts, at most {MAX_CONTEXTS}")
    return [build_context(sop, [ts]) for sop, ts in wanted]


def context_count(pairs: set[tuple[str, str]], fallback: bool) -> int:
    if not fallback:
        return len(pairs)
    classes = {sop for sop, _ in pairs}
    extra = {(sop, ts) for sop in classes for ts in UNCOMPRESSED}
    return len(pairs | extra)


def accepted_syntaxes(assoc: Association, sop_class: str) -> list[UID]:
    """Transfer syntaxes the destination accepted for ``sop_class`` (SCU role)."""
    return [
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.as_scu is not False
    ]


# -- the race fix --------------------------------------------------------------------

def _serve_request_with_handback(self: Association, msg, context_id: int) -> None:
    """The reactor's ``_serve_request``, except that a *response* reaching it on the
    requesting side is put back on the DIMSE queue for the ``send_*`` waiting for it.

    Why this is enough: the reactor only gets there when it raced past its pause
    checkpoint; its next loop iteration blocks on that (cleared) checkpoint, so the
    waiting send takes the message from the queue.
    """
    if self.is_requestor and not msg.is_valid_request and msg.is_valid_response:
        self._dicomflow_handbacks = getattr(self, "_dicomflow_handbacks", 0) + 1
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
    assoc._dicomflow_connected = True
    sock = assoc.dul.socket.socket
    if sock is not None:
        tune_socket(sock)
        sock.settimeout(send_timeout(assoc))
    assoc.dul.socket.send = types.MethodType(_bounded_send, assoc.dul.socket)
    # pynetdicom re-points ``abort`` at ``_abort_blocking`` around every event handler
    assoc._abort_blocking = types.MethodType(  # type: ignore[method-assign]
        _bounded_abort(assoc._abort_blocking), assoc)
    if "abort" in vars(assoc):
        assoc.abort = assoc._abort_blocking  # type: ignore[method-assign]
    if hasattr(assoc.dul.to_provider_queue, "on_overdue"):  # the fast path's bounded queue
        assoc.dul.to_provider_queue.on_overdue = lambda: cut(
            assoc, f"the transfer took longer than its DIMSE timeout ({assoc.dimse_timeout:g}s: "
                   f"dimse_timeout plus the file at min_transfer_rate)")
    install_response_handback(assoc)


# -- bounded sending and cutting an association -----------------------------------------

def send_timeout(assoc: Association) -> float:
    """How long one ``socket.send`` may make no progress: the endpoint's DIMSE timeout
    (a destination that takes no byte for that long is not going to answer either)."""
    return float(getattr(assoc, "_dicomflow_send_timeout", None) or assoc.dimse_timeout or 60.0)


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
        cut(assoc, f"the destination stopped reading: nothing could be sent to it for "
                   f"{send_timeout(assoc):g}s (dimse_timeout)")
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
    ``send_*`` waiting for a response. Safe from any thread, more than once."""
    if getattr(assoc, "_dicomflow_cut", None) is None:
        assoc._dicomflow_cut = reason
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
    fastpath.wake_dul(dul)
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


HANDLERS = [(evt.EVT_CONN_OPEN, _on_conn_open)]


def client_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """Verify the destination with ``tls_ca`` (else the system CAs); present our
    certificate when ``tls_cert``/``tls_key`` are set."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(tls.ca) if tls.ca else None)
    if tls.cert and tls.key:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


def tls_args(ep: EndpointConfig) -> tuple[ssl.SSLContext, str] | None:
    return (client_tls_context(ep.tls), ep.host) if ep.tls.enabled else None


def make_ae(ep: EndpointConfig, calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ep.connect_timeout
    ae.acse_timeout = ep.acse_timeout
    ae.dimse_timeout = ep.dimse_timeout
    # an idle association is released by us after idle_release; the network timeout
    # only catches a peer that stops talking in the middle of an exchange
    ae.network_timeout = max(ep.dimse_timeout, ep.idle_release * 2)
    ae.maximum_pdu_size = ep.max_pdu
    return ae


def associate(ep: EndpointConfig, calling_ae: str, contexts: list[PresentationContext]) -> Association:
    """Request an association (it may come back rejected/aborted: the caller checks)."""
    ae = make_ae(ep, calling_ae)
    return ae.associate(ep.host, ep.port, contexts, ae_title=ep.ae_title, max_pdu=ep.max_pdu,
                        tls_args=tls_args(ep), evt_handlers=HANDLERS)


# -- diagnosing a failed association -------------------------------------------------

def tcp_probe(ep: EndpointConfig) -> str | None:
    """Cheap health check: None if the port answers (and TLS shakes hands), else why not."""
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=ep.connect_timeout)
    except ConnectionRefusedError:
        return f"connection refused by {ep.host}:{ep.port}"
    except TimeoutError:
        return f"timeout connecting to {ep.host}:{ep.port} after {ep.connect_timeout:g}s"
    except OSError as exc:
        return f"cannot connect to {ep.host}:{ep.port}: {exc.strerror or exc}"
    try:
        if ep.tls.enabled:
            sock.settimeout(ep.connect_timeout)
            try:
                sock = client_tls_context(ep.tls).wrap_socket(sock, server_hostname=ep.host)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                return f"TLS handshake with {ep.host}:{ep.port} failed: {exc}"
            except (TimeoutError, OSError) as exc:
                return f"TLS handshake with {ep.host}:{ep.port} failed: {exc}"
    finally:
        sock.close()
    return None


@dataclass(frozen=True)
class ProbeResult:
    """What a probe found: ``reason`` is None when the endpoint is worth an association;
    ``verification`` is False when it answered but does not accept Verification (then
    later probes fall back to a TCP connection)."""

    reason: str | None
    verification: bool = True


def echo_probe(ep: EndpointConfig, calling_ae: str) -> ProbeResult:
    """Health check by association and C-ECHO, every wait bounded by the endpoint's
    timeouts. A bare TCP connect-and-close kills fragile destinations (CTN's
    ``simple_storage`` exits on one), so a destination is asked the DICOM way. It is up
    when it answers the association at all: a rejection or a Verification it does not
    accept is left for the real association to report."""
    where = f"{ep.host}:{ep.port}"
    assoc, elapsed = associate_timed(ep, calling_ae, [build_context(VERIFICATION)])
    if not assoc.is_established:
        if assoc.is_rejected:
            return ProbeResult(None)
        if all_contexts_rejected(assoc) or getattr(assoc, "_dicomflow_connected", False) \
                and elapsed < ep.acse_timeout:
            return ProbeResult(None, verification=False)  # answered, or aborted: not by echo
        return ProbeResult(failure_reason(ep, assoc, elapsed))
    try:
        assoc.dimse_timeout = ep.dimse_timeout
        rsp = assoc.send_c_echo()
    except Exception as exc:  # noqa: BLE001 - a peer leaving mid-probe is an answer too
        rsp = None
        reason = f"C-ECHO to {where} failed: {type(exc).__name__}: {exc}"
    else:
        reason = f"no C-ECHO response from {where} within dimse_timeout {ep.dimse_timeout:g}s"
    finally:
        close(assoc, timeout=min(ep.acse_timeout, RELEASE_WAIT))
    if rsp is None or rsp.get("Status") is None:
        return ProbeResult(reason)
    return ProbeResult(None)


def probe(ep: EndpointConfig, calling_ae: str, verification: bool = True) -> ProbeResult:
    """:func:`echo_probe`, or :func:`tcp_probe` for a destination known not to accept
    Verification."""
    if verification:
        return echo_probe(ep, calling_ae)
    return ProbeResult(tcp_probe(ep), verification=False)


def associate_timed(ep: EndpointConfig, calling_ae: str,
                    contexts: list[PresentationContext]) -> tuple[Association, float]:
    """:func:`associate` and how long it took (pynetdicom reports an ACSE timeout as an
    abort; the elapsed time tells them apart)."""
    start = time.monotonic()
    assoc = associate(ep, calling_ae, contexts)
    return assoc, time.monotonic() - start


def failure_reason(ep: EndpointConfig, assoc: Association, elapsed: float = 0.0) -> str:
    """Say why ``assoc`` is not established: rejected (with the reason), aborted, no
    answer in time, or the transport problem found by probing again."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None and rsp.result is not None:
            return (f"association rejected by {ep.ae_title}@{ep.host}:{ep.port}: "
                    f"{rsp.result_str}, {rsp.source_str}, {rsp.reason_str}")
        return f"association rejected by {ep.ae_title}@{ep.host}:{ep.port}"
    if not getattr(assoc, "_dicomflow_connected", False):
        if elapsed >= ep.connect_timeout:
            return f"timeout connecting to {ep.host}:{ep.port} after {ep.connect_timeout:g}s"
        # the connection failed at once (refused, no route, TLS): ask again for the
        # reason — a port that refused a moment ago is no fragile DICOM peer
        transport = tcp_probe(ep)
        if transport:
            return transport
    if elapsed >= ep.acse_timeout:
        return (f"timeout: no answer to the association request from {ep.host}:{ep.port} "
                f"within acse_timeout {ep.acse_timeout:g}s")
    if assoc.is_aborted:
        return f"association aborted by {ep.host}:{ep.port}"
    return f"no answer to the association request from {ep.host}:{ep.port} (ACSE timeout)"


def all_contexts_rejected(assoc: Association) -> bool:
    """True when the peer answered but accepted none of the proposed contexts."""
    acceptor = assoc.acceptor.primitive
    return bool(assoc.rejected_contexts) and not assoc.accepted_contexts and acceptor is not None \
        and acceptor.result == 0x00
