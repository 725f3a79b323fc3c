"""The sender's association after the hand-over (issue 13 item 2,
:mod:`pipeline.dicom.send_session`): pynetdicom negotiates, then only the Link's thread
reads and writes the socket — C-STORE-RSPs are read and decoded by us, TLS included,
and release and abort are ours. Real peers on loopback: DCMTK's storescp (plain and
``+tls``), pynetdicom SCPs in threads whose handlers misbehave on purpose, the send
daemon. pynetdicom's ``send_c_store`` raises in every in-process test (fixture
``datapath``), so a silent fallback fails it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from loguru import logger as loguru_logger
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from pipeline.dicom import scu as net
from tests.helpers import HANG_TIMEOUT, free_port, wait_for
from tests.peers import StoreSCP
from tests.sendkit import endpoint_conf
from tests.test_store_send import (  # noqa: F401 - fixtures
    CT,
    RecordingSCP,
    data_set_part,
    datapath,
    endpoint,
    file_with_data_set,
    link_to,
    no_chunked_receive,
    store_all,
    storescp_got,
    uid_of,
)
from tests.tls import make_certificates

ON_PATH = "on the send data path"
A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


@pytest.fixture
def log_lines():
    lines: list[str] = []
    sink = loguru_logger.add(lambda message: lines.append(str(message)), level="DEBUG",
                             format="{level} {message}")
    yield lines
    loguru_logger.remove(sink)


def pdu_seen(name: str) -> tuple[threading.Event, object]:
    """An event set once a PDU of type ``name`` reaches the peer, and its handler."""
    seen = threading.Event()

    def handler(event: evt.Event) -> None:  # the peer's DUL thread
        if type(event.pdu).__name__ == name:
            seen.set()
    return seen, handler


def raw_socket(event: evt.Event):
    return event.assoc.dul.socket.socket


def rsp_pdus(context_id: int, status: int, msg_id: int = 1) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = msg_id, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CT, "1.2.3"
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    out = b""
    for primitive in message.encode_msg(context_id, 16382):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


class ScriptedSCP:
    """A pynetdicom Storage SCP whose C-STORE handler is the test's."""

    def __init__(self, on_store=None, on_pdu=None) -> None:
        self.port = free_port()
        self.released = threading.Event()
        self.let_go = threading.Event()
        ae = AE("PACS")
        ae.add_supported_context(CT, [ExplicitVRLittleEndian])
        handlers = [(evt.EVT_C_STORE, on_store or (lambda event: 0x0000)),
                    (evt.EVT_RELEASED, lambda event: self.released.set())]
        if on_pdu is not None:
            handlers.append((evt.EVT_PDU_RECV, on_pdu))
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        self.let_go.set()
        self.server.shutdown()


@pytest.mark.usefixtures("datapath")
def test_responses_are_read_on_the_data_path_and_the_release_is_answered(
        tmp_path: Path, log_lines: list[str]) -> None:
    peer = ScriptedSCP()
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        assert link.on_data_path
        assoc = link._assoc
        assert not assoc.dul.is_alive(), "pynetdicom's DUL thread still reads the socket"
        try:
            for size in (10, 100_000):
                assert link.store(file_with_data_set(tmp_path, size), 60) == net.StoreOutcome(0)
            assert assoc.dimse.msg_queue.empty() and net.handbacks(assoc) == 0
            assert link.alive
        finally:
            started = time.monotonic()
            link.close()
        assert peer.released.wait(HANG_TIMEOUT), "the peer saw no release"
        assert time.monotonic() - started < 5 and assoc.is_released and not link.alive
    finally:
        peer.stop()
    assert any(ON_PATH in line and line.startswith("DEBUG") for line in log_lines), log_lines


@pytest.mark.usefixtures("datapath")
def test_tls_storescp_gets_files_byte_identical_on_the_data_path(
        tmp_path: Path, log_lines: list[str]) -> None:
    certs = make_certificates(tmp_path / "certs")
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS", extra=(
        "+tls", str(certs.server_key), str(certs.server_cert), "-ic",
        "-pdu", "16384")).start()
    try:
        ep = endpoint(tmp_path, peer.port, tls={"tls": "true", "tls_ca": str(certs.ca)})
        files = [file_with_data_set(tmp_path / "src", n) for n in (150, 16378, 2_000_002)]
        store_all(ep, files, on_data_path=True)
        storescp_got(peer, files)
    finally:
        peer.stop()
    assert any(ON_PATH in line and "TLS" in line for line in log_lines), log_lines


@pytest.mark.usefixtures("datapath")
def test_an_answer_before_the_data_set_is_complete_is_read(tmp_path: Path) -> None:
    """The response race of pynetdicom 3.0.4 (transfer.install_response_handback) has no
    place here: a peer that answers on the command set, before the data set is even
    sent, still reads it all, and the answer is taken once the request is complete."""
    def answer_early(event: evt.Event) -> None:
        items = event.pdu.presentation_data_value_items if isinstance(event.pdu, P_DATA_TF) else []
        if items and items[0].presentation_data_value[0] == 0x03:
            raw_socket(event).sendall(rsp_pdus(items[0].presentation_context_id, 0xB000))
            event.assoc.dimse.send_msg = lambda *args, **kwargs: None  # no second answer

    peer = ScriptedSCP(on_pdu=answer_early)
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            assert link.on_data_path
            assert link.store(file_with_data_set(tmp_path, 3_000_000), 60) == net.StoreOutcome(0xB000)
            assert link.alive
        finally:
            link.close()
        assert peer.released.wait(HANG_TIMEOUT)
    finally:
        peer.stop()


@pytest.mark.usefixtures("datapath")
def test_a_peer_abort_while_the_response_is_awaited_ends_it_at_once(tmp_path: Path) -> None:
    peer: ScriptedSCP

    def abort(event: evt.Event) -> int:
        raw_socket(event).sendall(A_ABORT)
        peer.let_go.wait(60)
        return 0x0000

    peer = ScriptedSCP(on_store=abort)
    try:
        link = link_to(endpoint(tmp_path, peer.port, dimse_timeout="60s"))
        try:
            started = time.monotonic()
            assert link.store(file_with_data_set(tmp_path, 1000), 60) == net.StoreOutcome(None)
            assert time.monotonic() - started < 30, "the abort was not noticed"
            assert not link.alive and link._assoc.is_aborted
        finally:
            link.close()
    finally:
        peer.stop()


@pytest.mark.usefixtures("datapath")
def test_a_peer_that_never_answers_is_aborted_after_the_dimse_timeout(tmp_path: Path) -> None:
    peer: ScriptedSCP
    aborted, on_pdu = pdu_seen("A_ABORT_RQ")  # the peer's DUL thread still reads

    def hang(event: evt.Event) -> int:
        peer.let_go.wait(60)
        return 0x0000

    peer = ScriptedSCP(on_store=hang, on_pdu=on_pdu)
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            started = time.monotonic()
            assert link.store(file_with_data_set(tmp_path, 1000), 2) == net.StoreOutcome(None)
            assert 1.5 < time.monotonic() - started < 30
            assert not link.alive
            assert aborted.wait(HANG_TIMEOUT), "no A-ABORT reached the peer"
        finally:
            link.close()
    finally:
        peer.stop()


@pytest.mark.usefixtures("datapath")
def test_a_peer_release_request_while_idle_is_answered_and_ends_it(tmp_path: Path) -> None:
    answered, on_pdu = pdu_seen("A_RELEASE_RP")

    def release_after(event: evt.Event) -> int:
        sock = raw_socket(event)

        def later() -> None:
            time.sleep(0.5)
            sock.sendall(A_RELEASE_RQ)
        threading.Thread(target=later, daemon=True).start()
        return 0x0000

    peer = ScriptedSCP(on_store=release_after, on_pdu=on_pdu)
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            assert link.store(file_with_data_set(tmp_path, 1000), 60) == net.StoreOutcome(0)
            wait_for(lambda: not link.alive, message="the released association is not alive")
            assert answered.wait(HANG_TIMEOUT), "our A-RELEASE-RP did not reach the peer"
            with pytest.raises(net.EndpointTrouble):
                link.store(file_with_data_set(tmp_path, 1000), 60)
        finally:
            link.close()
    finally:
        peer.stop()


def test_a_release_request_read_with_the_last_response_is_seen_while_idle(tmp_path: Path) -> None:
    """The peer's response and its A-RELEASE-RQ arrive in one segment: the request sits in
    our read buffer, not in the socket, and ``alive`` must still see it (the next file
    would otherwise go out on an association the peer is releasing)."""
    answered, on_pdu = pdu_seen("A_RELEASE_RP")

    def answer_then_release(event: evt.Event) -> int:
        raw_socket(event).sendall(rsp_pdus(event.context.context_id, 0x0000) + A_RELEASE_RQ)
        event.assoc.dimse.send_msg = lambda *args, **kwargs: None  # no second answer
        return 0x0000

    peer = ScriptedSCP(on_store=answer_then_release, on_pdu=on_pdu)
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            assert link.on_data_path
            assert link.store(file_with_data_set(tmp_path, 1000), 60) == net.StoreOutcome(0)
            wait_for(lambda: not link.alive, message="the release request in the buffer seen")
            assert answered.wait(HANG_TIMEOUT), "our A-RELEASE-RP did not reach the peer"
        finally:
            link.close()
    finally:
        peer.stop()


_PROBE = """
import sys
from pipeline.dicom import patches, scu
from pipeline import config as pc
patches.install("send")
ep = pc.load(sys.argv[1]).endpoints["pacs"]
link = scu.associate(ep, "DICOMFLOW", [(sys.argv[2], "1.2.840.10008.1.2.1")], False)
print("own" if link.on_data_path else "dul", link.store(__import__("pathlib").Path(sys.argv[3]), 60).status)
link.close()
"""


@pytest.mark.parametrize(("off", "expected"), [("", "own"), ("datapath", "dul"), ("reactors", "dul")])
def test_the_switch_decides_the_hand_over(tmp_path: Path, off: str, expected: str) -> None:
    peer = RecordingSCP()
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
        path = file_with_data_set(tmp_path, 5000)
        env = {**os.environ, "DICOMFLOW_FASTPATH": "1", "DICOMFLOW_PATCHES_OFF": off}
        done = subprocess.run([sys.executable, "-c", _PROBE, str(conf), CT, str(path)], env=env,
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [expected, "0"], done.stdout
        assert peer.received[uid_of(path)] == data_set_part(path)
    finally:
        peer.stop()


@pytest.mark.usefixtures("datapath")
def test_every_context_refused_after_the_hand_over_still_aborts_and_closes(tmp_path: Path) -> None:
    """pynetdicom queues its A-ABORT for a DUL thread that has handed over: ours goes out."""
    from pynetdicom.sop_class import Verification

    aborted = threading.Event()
    ae = AE("PACS")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_ABORTED, lambda event: aborted.set())])
    try:
        link = net.associate(endpoint(tmp_path, port), "DICOMFLOW", [(CT, ExplicitVRLittleEndian)], False)
        assert isinstance(link, net.Link) and link.refused_all and not link.established
        assert aborted.wait(HANG_TIMEOUT), "the peer saw no A-ABORT"
        link.close()
    finally:
        server.shutdown()
