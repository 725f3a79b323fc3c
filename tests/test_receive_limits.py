"""Limits of the receive daemon against hostile peers (issue 10: defects 6, 7, 10, 16).

Every test talks to a real ``dicomflow receive`` subprocess over real sockets, with the
fast path on and off (the limits are not an optimisation): PDUs are built by hand,
memory is read from ``/proc/<pid>/status``, and DCMTK's ``echoscu`` is the legitimate
client that must still get through.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from pipeline.dicom import fastpath
from tests.helpers import HANG_TIMEOUT, Daemon, dcmtk, make_dataset, router_port, wait_for, write_conf
from tests.reliability import (
    CT,
    RawAssociation,
    associate_rq,
    c_store_rq,
    encode_dataset,
    established,
    rss_kib,
)
from tests.tls import make_certificates

MiB = 1024 * 1024
FASTPATH = pytest.mark.parametrize("fast", ["1", "0"], ids=["fastpath", "no-fastpath"])


class Receiver:
    """A ``dicomflow receive`` subprocess with the given [router] keys."""

    def __init__(self, base: Path, fast: str, **router: object) -> None:
        self.conf = write_conf(base, router={"log_level": "INFO", **router})
        self.port = router_port(self.conf)
        self.daemon = Daemon(self.conf, "receive", env={"DICOMFLOW_FASTPATH": fast})

    def __enter__(self) -> Receiver:
        self.daemon.start()
        self.daemon.wait_log("listening as")
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # the test failed: stop, without hiding why
            try:
                self.daemon.stop()
            except AssertionError:
                pass
            return
        code = self.daemon.stop()
        assert code == 0, self.daemon.log()[-3000:]

    def status(self, field: str) -> int:
        value = rss_kib(self.daemon.pid, field)
        assert value is not None, "the receiver is gone"
        return value

    def assert_alive(self) -> None:
        assert self.daemon.alive(), self.daemon.log()[-3000:]


def echo(port: int, host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-to", "10", "-ta", "10", "-td", "10",
                           "-aec", "DICOMFLOW", host, str(port)],
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)


def answer(conn: RawAssociation, timeout: float) -> str:
    """What the receiver does next: "abort", "closed", or "nothing" within ``timeout``."""
    conn.sock.settimeout(timeout)
    try:
        pdu = conn.read_pdu()
    except TimeoutError:
        return "nothing"
    except OSError:
        return "closed"
    if pdu is None:
        return "closed"
    return "abort" if pdu[0] == 0x07 else f"PDU type {pdu[0]}"


def declare(port: int, pdu_type: int, length: int) -> RawAssociation:
    conn = RawAssociation(port)
    conn.send(struct.pack(">BBI", pdu_type, 0, length) + b"\0" * 64)
    return conn


# -- defect 6: declarations cost nothing, PDUs are capped -----------------------------------

def _flood(conn: RawAssociation, size: int, sent: list[int]) -> None:
    """Stream ``size`` bytes of an over-long PDU body until the receiver hangs up."""
    chunk = b"\0" * MiB
    total = 0
    try:
        while total < size:
            conn.sock.sendall(chunk)
            total += len(chunk)
    except OSError:
        pass
    sent.append(total)


@FASTPATH
def test_defect06_declared_pdus_cost_nothing(tmp_path: Path, fast: str) -> None:
    """Three A-ASSOCIATE-RQs declaring 400 MiB, each followed by 64 MiB of real bytes:
    the receiver refuses them by their header, before reading (RSS barely moves)."""
    with Receiver(tmp_path, fast, acse_timeout="60s", network_timeout="120s") as receiver:
        before = receiver.status("VmHWM")
        conns = [declare(receiver.port, 0x01, 400 * MiB) for _ in range(3)]
        sent: list[int] = []
        floods = [threading.Thread(target=_flood, args=(c, 64 * MiB, sent)) for c in conns]
        for thread in floods:
            thread.start()
        for thread in floods:
            thread.join(HANG_TIMEOUT)
        growth = receiver.status("VmHWM") - before
        assert growth < 32 * 1024, f"peak RSS grew by {growth} KiB on declared 400 MiB PDUs"
        for conn in conns:
            assert answer(conn, 30) in ("abort", "closed")
            conn.close()
        assert min(sent) < 64 * MiB, "the receiver read a whole over-long A-ASSOCIATE-RQ"
        assert "A-ASSOCIATE-RQ PDU declaring 419430400 bytes" in receiver.daemon.log()
        assert echo(receiver.port).returncode == 0
        receiver.assert_alive()


@FASTPATH
def test_defect06_every_pdu_has_a_cap(tmp_path: Path, fast: str) -> None:
    """A control PDU over 256 KiB (before and after association), and a P-DATA-TF over the
    advertised maximum, are aborted at their header — not waited for until a timeout."""
    with Receiver(tmp_path, fast, max_pdu="64 KiB", acse_timeout="60s",
                  network_timeout="120s") as receiver:
        outcomes = {}
        conn = declare(receiver.port, 0x01, 300 * 1024)  # below max_pdu, above the cap
        outcomes["A-ASSOCIATE-RQ of 300 KiB"] = answer(conn, 30)
        for case, pdu_type, length in (("A-RELEASE-RQ of 300 KiB", 0x05, 300 * 1024),
                                       ("P-DATA-TF above max_pdu", 0x04, 64 * 1024 + 1)):
            conn = established(receiver.port)
            conn.send(struct.pack(">BBI", pdu_type, 0, length) + b"\0" * 64)
            outcomes[case] = answer(conn, 30)
            conn.close()
        assert outcomes == dict.fromkeys(outcomes, "abort"), outcomes
        # At the limit is fine: a store in PDUs of exactly max_pdu is answered.
        conn = established(receiver.port, max_pdu=64 * 1024)
        ds = make_dataset()
        assert conn.store(c_store_rq(CT, str(ds.SOPInstanceUID)), encode_dataset(ds)) == 0
        conn.release()
        receiver.assert_alive()


def _threads(receiver: Receiver) -> int:
    return receiver.status("Threads")


@FASTPATH
def test_defect06_pending_connections_are_bounded(tmp_path: Path, fast: str) -> None:
    """Forty connections that speak but never finish an A-ASSOCIATE-RQ: at most
    ``max_pending_connections`` get a thread, the rest are closed at once."""
    with Receiver(tmp_path, fast, max_pending_connections="4", acse_timeout="60s",
                  network_timeout="120s") as receiver:
        baseline = _threads(receiver)
        conns = []
        for _ in range(40):
            conn = RawAssociation(receiver.port)
            conn.send(b"\x01")  # the first byte of an A-ASSOCIATE-RQ, then silence
            conns.append(conn)
        closed = [c for c in conns if answer(c, 2) == "closed"]
        assert len(closed) >= 36, f"only {len(closed)} of 40 pending connections were refused"
        # Each pending connection costs at most a few threads (association + DUL).
        assert _threads(receiver) <= baseline + 4 * 3, (baseline, _threads(receiver))
        assert "max_pending_connections" in receiver.daemon.log()
        for conn in conns:
            conn.close()
        wait_for(lambda: echo(receiver.port).returncode == 0, message="echoscu after the burst")
        receiver.assert_alive()


# -- defect 7: slowloris -------------------------------------------------------------------

class Trickler:
    """Sends ``data`` a byte at a time, reconnecting whenever the receiver drops it."""

    def __init__(self, port: int, data: bytes, associated: bool = False,
                 interval: float = 0.3) -> None:
        self.port, self.data, self.associated, self.interval = port, data, associated, interval
        self.dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn = established(self.port) if self.associated else RawAssociation(self.port)
                for byte in self.data:
                    conn.send(bytes([byte]))
                    if self.stop.wait(self.interval):
                        break
            except (OSError, AssertionError):
                pass
            else:
                conn.close()
                continue
            self.dropped += 1
            conn.close()

    def __enter__(self) -> Trickler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(HANG_TIMEOUT)


@FASTPATH
def test_defect07_slowloris_cannot_hold_slots(tmp_path: Path, fast: str) -> None:
    """Three clients trickling A-ASSOCIATE-RQs (reconnecting as soon as dropped) and one
    trickling a P-DATA-TF inside its association, with two association slots: echoscu
    still gets through, and every trickler is dropped by the time bounds."""
    with Receiver(tmp_path, fast, max_associations="2", acse_timeout="3s",
                  network_timeout="4s") as receiver:
        rq = associate_rq()
        pdata = struct.pack(">BBI", 0x04, 0, 4000) + b"\0" * 4000
        tricklers = [Trickler(receiver.port, rq) for _ in range(3)]
        tricklers.append(Trickler(receiver.port, pdata, associated=True))
        for trickler in tricklers:
            trickler.__enter__()
        try:
            wait_for(lambda: all(t.dropped for t in tricklers), timeout=HANG_TIMEOUT,
                     message="every trickling client dropped by the receiver")
            result = wait_for(lambda: (r := echo(receiver.port)).returncode == 0 and r,
                              timeout=HANG_TIMEOUT, message="echoscu through the slowloris")
            assert result
        finally:
            for trickler in tricklers:
                trickler.__exit__()
        assert "not complete within the time allowed" in receiver.daemon.log()
        receiver.assert_alive()


def _client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@FASTPATH
def test_defect07_sibling_tls_handshake_is_bounded_as_a_whole(tmp_path: Path, fast: str) -> None:
    """A client trickling its ClientHello (each byte well within any per-read timeout) is
    dropped in time (by the negotiation deadline, at most the handshake timeout), and a
    real TLS client still associates."""
    certs = make_certificates(tmp_path / "certs")
    receiver = Receiver(tmp_path, fast, acse_timeout="3s", network_timeout="4s")
    tls = f"[tls]\ntls_cert = {certs.server_cert}\ntls_key = {certs.server_key}\n"
    (receiver.conf / "router.ini").write_text((receiver.conf / "router.ini").read_text() + tls)
    with receiver, Trickler(receiver.port, _client_hello()) as trickler:
        wait_for(lambda: trickler.dropped, message="the trickling TLS client dropped")
        context = ssl.create_default_context(cafile=str(certs.ca))
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(associate_rq())
            assert sock.recv(1) == b"\x02"
        receiver.assert_alive()


# -- defect 10: dual-stack listener and allowed_networks ------------------------------------

@FASTPATH
@pytest.mark.parametrize("networks, allowed", [("127.0.0.0/8", True), ("10.0.0.0/8", False),
                                               ("::ffff:127.0.0.0/104", True)])
def test_defect10_allowed_networks_on_dual_stack_bind(tmp_path: Path, fast: str, networks: str,
                                                       allowed: bool) -> None:
    """``bind = ::`` reports IPv4 clients as ``::ffff:a.b.c.d``: they are matched by their
    IPv4 address (and by the mapped form, for lists written that way)."""
    with Receiver(tmp_path, fast, bind="::", allowed_networks=networks) as receiver:
        result = echo(receiver.port, "127.0.0.1")
        assert (result.returncode == 0) is allowed, result.stdout + result.stderr
        if not allowed:
            assert "not in allowed_networks" in receiver.daemon.log()
        receiver.assert_alive()


def _echo_ipv6(port: int) -> bool:
    """C-ECHO over IPv6 with pynetdicom (DCMTK's echoscu takes IPv4 addresses only)."""
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("::1", port, ae_title="DICOMFLOW")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_defect10_ipv6_clients_still_matched(tmp_path: Path) -> None:
    with Receiver(tmp_path, "1", bind="::", allowed_networks="::1/128") as receiver:
        assert _echo_ipv6(receiver.port)
        assert echo(receiver.port, "127.0.0.1").returncode != 0
        receiver.assert_alive()


# -- defect 16: a non-ASCII UID gets a failure status, never an abort ------------------------

def _store_rsp(uid: str) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = uid
    rsp.Status = 0xC000
    return rsp


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_defect16_fast_encoder_falls_back_on_peer_values() -> None:
    """The response echoes the request's UIDs: one the direct encoder cannot write is
    left to pynetdicom's (None), never an exception."""
    assert fastpath.encode_c_store_command(_store_rsp("1.2.3\xe9")) is None
    assert fastpath._encode_element(0x00000110, "US", 70000) is None
    assert fastpath._encode_element(0x00001000, "UI", "1.2\u20ac") is None
    assert fastpath.encode_c_store_command(_store_rsp("1.2.3")) is not None


@FASTPATH
@pytest.mark.parametrize("uid", [b"1.2.3\xe9", b"1.2.3\xc3\xa9", b"1.2.\xff\xfe"],
                         ids=["latin-1", "utf-8", "bytes"])
def test_defect16_non_ascii_uid_gets_a_failure_status(tmp_path: Path, fast: str, uid: bytes) -> None:
    with Receiver(tmp_path, fast) as receiver:
        conn = established(receiver.port)
        status = conn.store(c_store_rq(CT, uid), encode_dataset(make_dataset()))
        conn.release()
        assert isinstance(status, int) and (0xC000 <= status <= 0xCFFF or status == 0xA900), status
        assert echo(receiver.port).returncode == 0
        receiver.assert_alive()
