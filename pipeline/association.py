"""Outgoing associations: AE set-up, presentation contexts, socket options, TLS, and a
fix for pynetdicom 3.0.4's C-STORE response race (DESIGN.md §8).

Facts this module is built on:

* chunked send (``send_c_store(path)``) needs an accepted context with *exactly* the
  file's transfer syntax, so every context carries one transfer syntax;
* pynetdicom never sets TCP_NODELAY (Nagle costs ~3x on small files), nor keepalive;
* the requestor's reactor thread can take a C-STORE-RSP off the DIMSE queue before the
  waiting ``send_c_store`` does, which then hangs until its timeout. ``_serve_request``
  is where the reactor drops such a message ("Received unexpected … service message"):
  :func:`install_response_handback` puts responses back for the waiting send.
"""

from __future__ import annotations

import socket
import ssl
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import AE, Association, _config, evt
from pynetdicom.presentation import PresentationContext, build_context

from pipeline import fastpath
from pipeline.config import EndpointConfig, TlsConfig
from pipeline.transcode import UNCOMPRESSED

MAX_CONTEXTS = 128
VERIFICATION = UID("1.2.840.10008.1.1")

_config.STORE_SEND_CHUNKED_DATASET = True
fastpath.install()  # event-driven reactors, whole-PDU reads, fast command sets (issue 7)


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
    """TCP_NODELAY (small files ~3x faster, DESIGN.md §8) and keepalive (dead peers)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _on_conn_open(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        tune_socket(sock)
    install_response_handback(event.assoc)


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
