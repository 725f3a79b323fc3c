"""The sending side of the network boundary: DicomFlow asks for an association, a
C-STORE or a C-ECHO and gets DicomFlow's own types back (:class:`Link`,
:class:`AssociationFailure`, :class:`StoreOutcome`, :class:`EchoOutcome`,
:class:`ProbeResult`); pynetdicom's exceptions are mapped here to those of
:mod:`pipeline.errors`, in the manner of httpx over httpcore (README, Design notes).

Facts this module is built on:

* chunked send (``send_c_store(path)``) needs an accepted context with *exactly* the
  file's transfer syntax, so every context carries one transfer syntax;
* pynetdicom logs its own errors for a failed association request, again at every
  probe; :func:`failure_reason` says it better, once — so requests are made with
  pynetdicom's logger quiet (:func:`quiet`);
* what keeps one association bounded (the response race fix, send timeouts, cutting)
  is in :mod:`pipeline.dicom.transfer`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import AE, Association, _config, evt
from pynetdicom.presentation import PresentationContext, build_context

from pipeline.config import EndpointConfig, TlsConfig
from pipeline.dicom import send_session, store_send, transfer
from pipeline.dicom.transfer import HANDLERS, handbacks, stall_reason
from pipeline.errors import EndpointTrouble, PermanentError
from pipeline.transcode import UNCOMPRESSED

__all__ = ["HANDLERS", "handbacks", "stall_reason"]  # re-exported for tests and tools

MAX_CONTEXTS = 128
RELEASE_WAIT = 10.0  # at most this long for a peer's A-RELEASE-RP (or an abort) to complete
VERIFICATION = UID("1.2.840.10008.1.1")


def configure() -> None:
    """Process-wide pynetdicom setting of a sending process: stream each file from disk
    (only its file meta is read into memory). Called by :func:`patches.install`."""
    _config.STORE_SEND_CHUNKED_DATASET = True


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


#: a Link's association: the bounded one, handed over to the send data path when it
#: can be (:mod:`send_session`; an echo's never is)
STORE_HANDLERS = [*HANDLERS, (evt.EVT_CONN_OPEN, send_session.prepare)]


def request(ep: EndpointConfig, calling_ae: str, contexts: list[PresentationContext],
            handlers: list | None = None) -> Association:
    """Request a pynetdicom association with our handlers (it may come back rejected or
    aborted: the caller checks). Only this package sees what it returns."""
    ae = make_ae(ep, calling_ae)
    return ae.associate(ep.host, ep.port, contexts, ae_title=ep.ae_title, max_pdu=ep.max_pdu,
                        tls_args=tls_args(ep), evt_handlers=handlers or HANDLERS)


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
    assoc, elapsed = request_timed(ep, calling_ae, [build_context(VERIFICATION)])
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
        transfer.close(assoc, timeout=min(ep.acse_timeout, RELEASE_WAIT))
    if rsp is None or rsp.get("Status") is None:
        return ProbeResult(reason)
    return ProbeResult(None)


def probe(ep: EndpointConfig, calling_ae: str, verification: bool = True) -> ProbeResult:
    """:func:`echo_probe`, or :func:`tcp_probe` for a destination known not to accept
    Verification."""
    if verification:
        with quiet():
            return echo_probe(ep, calling_ae)
    return ProbeResult(tcp_probe(ep), verification=False)


def request_timed(ep: EndpointConfig, calling_ae: str, contexts: list[PresentationContext],
                  handlers: list | None = None) -> tuple[Association, float]:
    """:func:`request` and how long it took (pynetdicom reports an ACSE timeout as an
    abort; the elapsed time tells them apart)."""
    start = time.monotonic()
    assoc = request(ep, calling_ae, contexts, handlers)
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


# -- DicomFlow's view of an association ------------------------------------------------

class _Quiet:
    """pynetdicom's logger silenced while at least one request is under way. Counted:
    a sender's lanes open associations from several threads at once, and a plain
    save-and-restore per request would restore "silenced" when two overlap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._level = logging.NOTSET

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        plogger = logging.getLogger("pynetdicom")
        with self._lock:
            if self._depth == 0:
                self._level = plogger.level
                plogger.setLevel(logging.CRITICAL)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    plogger.setLevel(self._level)


#: pynetdicom's logger silenced for one request: it logs its own errors for a failed
#: association request, again at every probe; :func:`failure_reason` says it better,
#: once (one line when down, one when back up). One per process, as the logger is.
quiet = _Quiet()


@dataclass(frozen=True)
class AssociationFailure:
    """No association: ``reason`` says why (rejected, aborted, timeout, transport)."""

    reason: str


@dataclass(frozen=True)
class StoreOutcome:
    """A C-STORE's answer: ``status`` is None when none came (a timeout or an abort)."""

    status: int | None
    comment: str | None = None


@dataclass(frozen=True)
class EchoOutcome:
    """A C-ECHO's result: ``failure`` is why there was no association (None if there was
    one); ``verification_refused`` when the destination answered but not for
    Verification; ``status`` the C-ECHO status, None without an answer."""

    failure: str | None = None
    verification_refused: bool = False
    status: int | None = None


class Link:
    """An association we requested, as the sender sees it. It may be *answered but
    useless* (every context rejected: :attr:`refused_all`); every wait it makes is
    bounded (:mod:`pipeline.dicom.transfer`)."""

    def __init__(self, ep: EndpointConfig, assoc: Association, proposed: int) -> None:
        self.ep = ep
        self._assoc = assoc
        self.proposed = proposed
        self._message_id = 0
        # the socket is ours alone once pynetdicom's DUL thread handed it over
        self._own = send_session.take(assoc) if getattr(assoc, "is_established", False) else None

    @property
    def on_data_path(self) -> bool:
        """The association was handed over: our own reads and writes only."""
        return self._own is not None

    @property
    def established(self) -> bool:
        return bool(self._assoc.is_established)

    @property
    def accepted(self) -> int:
        return len(self._assoc.accepted_contexts)

    @property
    def alive(self) -> bool:
        if self._own is not None:
            return self._own.usable()
        return transfer.is_usable(self._assoc)

    @property
    def refused_all(self) -> bool:
        return all_contexts_rejected(self._assoc)

    @property
    def stall_reason(self) -> str | None:
        return transfer.stall_reason(self._assoc)

    def accepted_syntaxes(self, sop_class: str) -> list[UID]:
        return accepted_syntaxes(self._assoc, sop_class)

    def store(self, source: Path | Dataset, dimse_timeout: float) -> StoreOutcome:
        """C-STORE a file (streamed from disk) or a data set. Raises FileNotFoundError
        (the file left), :class:`EndpointTrouble` (the peer left: pynetdicom's
        RuntimeError "association … must be established") or :class:`PermanentError`
        (anything else pynetdicom objects to is the file's).

        A file goes through DicomFlow's own data path (:mod:`store_send`, switch
        ``datapath``) when it is on and its preconditions hold; otherwise, and for a
        data set (transcoded), through pynetdicom's ``send_c_store``."""
        assoc = self._assoc
        assoc.dimse_timeout = dimse_timeout
        if self._own is not None:
            self._message_id = self._message_id % 0xFFFF + 1
            try:
                answer = self._own.store(source, self._message_id)
            except (FileNotFoundError, EndpointTrouble):
                raise
            except Exception as exc:  # noqa: BLE001 - a bad file must never block the queue
                raise PermanentError(f"cannot send the file: {type(exc).__name__}: {exc}") from exc
            return StoreOutcome(answer.status, answer.comment)
        if store_send.enabled() and isinstance(source, Path):
            self._message_id = self._message_id % 0xFFFF + 1
            try:
                own = store_send.send(assoc, source, self._message_id)
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad file must never block the queue
                raise PermanentError(f"cannot send the file: {type(exc).__name__}: {exc}") from exc
            if own is not None:
                return StoreOutcome(own.status, own.comment)
        try:
            rsp = assoc.send_c_store(source)
        except FileNotFoundError:
            raise
        except RuntimeError as exc:
            raise EndpointTrouble(f"association with {self.ep.host}:{self.ep.port} was lost: "
                                  f"{exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a bad file must never block the queue
            raise PermanentError(f"cannot send the file: {type(exc).__name__}: {exc}") from exc
        status = rsp.get("Status")
        if status is None:
            return StoreOutcome(None)
        comment = rsp.get("ErrorComment")
        return StoreOutcome(int(status), str(comment) if comment else None)

    def send_blocked_for(self) -> float:
        return transfer.send_blocked_for(self._assoc)

    def exchange_quiet_for(self) -> float:
        return transfer.exchange_quiet_for(self._assoc)

    def cut(self, reason: str) -> None:
        transfer.cut(self._assoc, reason)

    def close(self, abort: bool = False) -> None:
        """Release (or abort), never waiting on the peer beyond ``acse_timeout`` (at most
        :data:`RELEASE_WAIT`)."""
        timeout = min(self.ep.acse_timeout, RELEASE_WAIT)
        if self._own is not None:
            self._own.close(abort, timeout)
            return
        transfer.close(self._assoc, abort=abort, timeout=timeout)


def associate(ep: EndpointConfig, calling_ae: str, pairs: Iterable[tuple[str, str]],
              fallback: bool) -> Link | AssociationFailure:
    """An association for these (SOP class, transfer syntax) pairs (plus uncompressed
    ones with ``fallback``, :func:`contexts_for`): a :class:`Link` when the destination
    answered it (even refusing every context), else why not."""
    contexts = contexts_for(sorted(pairs), fallback=fallback)
    with quiet():
        assoc, elapsed = request_timed(ep, calling_ae, contexts, STORE_HANDLERS)
    if not assoc.is_established:
        send_session.abandon(assoc)
    if assoc.is_established or all_contexts_rejected(assoc):
        return Link(ep, assoc, len(contexts))
    return AssociationFailure(failure_reason(ep, assoc, elapsed))


def proposal_problem(pair: tuple[str, str]) -> str | None:
    """Why this (SOP class, transfer syntax) cannot go into a presentation context, or
    None: pynetdicom would otherwise refuse the whole association for one file."""
    try:
        contexts_for([pair], fallback=False)
    except Exception as exc:  # noqa: BLE001 - whatever pynetdicom objects to, it is the file
        return str(exc)
    return None


def echo(ep: EndpointConfig, calling_ae: str) -> EchoOutcome:
    """One C-ECHO with the endpoint's settings, every wait bounded by its timeouts (the
    release included). No bare TCP connection is opened first (some destinations exit
    on one). pynetdicom stays quiet: the caller explains failures itself."""
    with quiet():
        assoc, elapsed = request_timed(ep, calling_ae, [build_context(VERIFICATION)])
        if not assoc.is_established:
            if all_contexts_rejected(assoc):
                return EchoOutcome(verification_refused=True)
            return EchoOutcome(failure=failure_reason(ep, assoc, elapsed))
        try:
            status = assoc.send_c_echo()
        finally:
            transfer.close(assoc, timeout=min(ep.acse_timeout, RELEASE_WAIT))
    code = status.get("Status")
    return EchoOutcome(status=None if code is None else int(code))


def echo_receiver(host: str, port: int, called_ae: str, calling_ae: str, timeout: float,
                  tls: bool = False) -> str | None:
    """Does our own receiver answer? None when it does, else why not (``/healthz``).

    An association rejected (a calling AE title it does not allow, every slot busy) is
    an answer too: the receiver is there and speaks DICOM. A receiver on TLS is asked by
    a TCP connection alone: with ``tls_require_client_cert`` a C-ECHO without a client
    certificate could never succeed, and the handshake would only test our own keys."""
    if tls:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            return f"the receiver does not accept connections on {host}:{port}: " \
                   f"{exc.strerror or exc}"
        return None
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    start = time.monotonic()
    with quiet():
        assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=HANDLERS)
        if assoc.is_rejected:
            return None
        if not assoc.is_established:
            elapsed = time.monotonic() - start
            if not getattr(assoc, "_dicomflow_connected", False):
                return f"the receiver does not accept connections on {host}:{port}"
            if elapsed >= timeout:
                return f"the receiver did not answer an association request within {timeout:g}s"
            return f"the receiver aborted the association (from {host}:{port})"
        try:
            status = assoc.send_c_echo()
        finally:
            transfer.close(assoc, timeout=min(timeout, RELEASE_WAIT))
    code = status.get("Status")
    if code is None:
        return f"no C-ECHO response from the receiver within {timeout:g}s"
    return None if int(code) == 0 else f"the receiver answered C-ECHO with status 0x{int(code):04X}"
