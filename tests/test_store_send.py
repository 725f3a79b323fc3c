"""DicomFlow's own C-STORE send (issue 13 item 2, :mod:`pipeline.dicom.store_send`)
against real peers on loopback: DCMTK's storescp (another process) and a pynetdicom
SCP (a thread here, recording every P-DATA-TF PDU it receives). The data set part of
each file arrives byte-identical; no PDU exceeds the peer's maximum; a peer that stops
reading is cut; TLS and anything else the data path does not cover goes to pynetdicom.

Every data-path test makes pynetdicom's ``send_c_store`` raise, so a silent fallback
fails it."""

from __future__ import annotations

import os
import signal
import ssl
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, Association, _config, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from pipeline import config as pc
from pipeline.dicom import fastpath, filemeta, send_session, store_send
from pipeline.dicom import scu as net
from pipeline.errors import PermanentError
from tests.helpers import (
    HANG_TIMEOUT,
    Daemon,
    dicom_files,
    free_port,
    make_dataset,
    wait_for,
    write_dataset,
)
from tests.peers import StoreSCP
from tests.sendkit import endpoint_conf, put_in_outbox

CT = "1.2.840.10008.5.1.4.1.1.2"
PAIR = [(CT, ExplicitVRLittleEndian)]


@pytest.fixture
def datapath(monkeypatch):
    """The data path on; pynetdicom's send_c_store refuses to run (no silent fallback)."""
    monkeypatch.setattr(store_send, "_enabled", True)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    def refuse(*args, **kwargs):
        raise AssertionError("pynetdicom's send_c_store was used")
    monkeypatch.setattr(Association, "send_c_store", refuse)


@pytest.fixture
def pynetdicom_sends(monkeypatch) -> list:
    """The data path on without the hand-over (pynetdicom's DUL thread reads the
    socket, :mod:`send_session` is not used); every source pynetdicom's send_c_store
    is given, in order (the files the data path handed back)."""
    monkeypatch.setattr(store_send, "_enabled", True)
    monkeypatch.setattr(send_session, "_handover", False)
    stock, used = Association.send_c_store, []

    def counting(self, dataset, *args, **kwargs):
        used.append(dataset)
        return stock(self, dataset, *args, **kwargs)
    monkeypatch.setattr(Association, "send_c_store", counting)
    return used


def data_set_part(path: Path) -> bytes:
    data = path.read_bytes()
    return data[filemeta.read_meta_file(path).end:]


def uid_of(path: Path) -> str:
    return filemeta.read_meta_file(path).text(0x00020003)


def file_with_data_set(directory: Path, length: int) -> Path:
    """A Part-10 file whose data set part is exactly ``length`` bytes: SOP class and
    instance, Pixel Data (OB) filling it, and a trailing byte for an odd remainder; one
    shorter than the first two elements is cut short (the transport does not care)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    write_dataset(ds, path)
    base = len(data_set_part(path))
    if length >= base + 12:
        ds.add_new(0x7FE00010, "OB", os.urandom((length - base - 12) & ~1))
        write_dataset(ds, path)
    whole = path.read_bytes()
    missing = length - len(data_set_part(path))
    path.write_bytes(whole + os.urandom(missing) if missing >= 0 else whole[:missing])
    assert len(data_set_part(path)) == length
    return path


class RecordingSCP:
    """A pynetdicom Storage SCP (thread) that keeps each data set's raw bytes, every
    P-DATA-TF PDU length and PDV control byte, and answers ``status``/``comment``."""

    def __init__(self, max_pdu: int = 16384, ssl_context: ssl.SSLContext | None = None,
                 status: int = 0x0000, comment: str | None = None) -> None:
        self.port = free_port()
        self.max_pdu, self.status, self.comment = max_pdu, status, comment
        self.received: dict[str, bytes] = {}
        self.pdu_lengths: list[int] = []
        self.controls: list[int] = []
        self.lock = threading.Lock()
        ae = AE("PACS")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CT, [ExplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store),
                                                    (evt.EVT_PDU_RECV, self._pdu)])

    def _store(self, event: evt.Event):
        with self.lock:
            self.received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        if self.comment is None:
            return self.status
        rsp = Dataset()
        rsp.Status, rsp.ErrorComment = self.status, self.comment
        return rsp

    def _pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            with self.lock:
                self.pdu_lengths.append(len(event.pdu.encode()) - 6)
                self.controls.extend(item.presentation_data_value[0]
                                     for item in event.pdu.presentation_data_value_items)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def no_chunked_receive(monkeypatch):
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)


def endpoint(tmp_path: Path, port: int, **values) -> pc.EndpointConfig:
    conf = endpoint_conf(tmp_path, {"pacs": {"port": port, "ae_title": "PACS", **values}})
    return pc.load(conf).endpoints["pacs"]


def link_to(ep: pc.EndpointConfig) -> net.Link:
    link = net.associate(ep, "DICOMFLOW", PAIR, False)
    assert isinstance(link, net.Link) and link.established
    return link


def store_all(ep: pc.EndpointConfig, files: list[Path], on_data_path: bool | None = None) -> None:
    """Each file C-STOREd on one association, every one answered with success (on the
    handed-over association, or not, when ``on_data_path`` says)."""
    link = link_to(ep)
    try:
        assert on_data_path in (None, link.on_data_path)
        for path in files:
            assert link.store(path, 60) == net.StoreOutcome(0x0000), path.name
    finally:
        link.close()


def storescp_got(peer: StoreSCP, files: list[Path]) -> None:
    """storescp wrote every file, its data set byte-identical."""
    wait_for(lambda: len(peer.files()) == len(files), message="storescp wrote every file")
    got = {uid_of(p): data_set_part(p) for p in peer.files()}
    for path in files:
        assert got[uid_of(path)] == data_set_part(path), path.name


def tls_peer(tmp_path: Path) -> tuple[RecordingSCP, pc.EndpointConfig]:
    """A TLS RecordingSCP and the endpoint that trusts it."""
    from tests.tls import make_certificates

    certs = make_certificates(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    peer = RecordingSCP(max_pdu=16384, ssl_context=context)
    return peer, endpoint(tmp_path, peer.port, tls={"tls": "true", "tls_ca": str(certs.ca)})


# -- byte-identical, PDUs within the peer's maximum -------------------------------------

@pytest.mark.parametrize("max_pdu", [16384, 4096])
def test_pynetdicom_scp_gets_every_size_byte_identical_within_its_max_pdu(
        tmp_path: Path, datapath, no_chunked_receive, max_pdu: int) -> None:
    fragment = max_pdu - 6
    sizes = [0, 7, fragment - 1, fragment, fragment + 1, 2 * fragment, 3_000_001, 5 * 1024 * 1024]
    files = [file_with_data_set(tmp_path / "src", n) for n in sizes]
    peer = RecordingSCP(max_pdu=max_pdu)
    try:
        store_all(endpoint(tmp_path, peer.port), files)
        for path in files:
            assert peer.received[uid_of(path)] == data_set_part(path), path.name
        assert max(peer.pdu_lengths) == max_pdu  # full PDUs, none beyond the maximum
        commands = [c for c in peer.controls if c & 0x01]
        lasts = [c for c in peer.controls if c == 0x02]
        assert commands == [0x03] * len(files) and len(lasts) == len(files)
    finally:
        peer.stop()


def test_storescp_gets_files_byte_identical_with_its_small_max_pdu(tmp_path: Path, datapath) -> None:
    # storescp -pdu 4096: DCMTK refuses a PDU above what it declared, and an odd
    # fragment, so only the even lengths of real data sets (the odd ones: test above)
    sizes = [150, 4088, 4090, 4092, 8180, 1_000_002, 4 * 1024 * 1024 + 2]
    files = [file_with_data_set(tmp_path / "src", n) for n in sizes]
    files.append(write_dataset(make_dataset(rows=512, cols=512), tmp_path / "src" / "ct.dcm"))
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS", extra=("-pdu", "4096")).start()
    try:
        store_all(endpoint(tmp_path, peer.port), files)
        storescp_got(peer, files)
    finally:
        peer.stop()


def test_status_and_error_comment_come_back(tmp_path: Path, datapath, no_chunked_receive) -> None:
    peer = RecordingSCP(status=0xA700, comment="disk full")
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            path = file_with_data_set(tmp_path / "src", 1000)
            assert link.store(path, 60) == net.StoreOutcome(0xA700, "disk full")
            assert link.alive  # the association goes on
            peer.status, peer.comment = 0xB000, None
            assert link.store(path, 60) == net.StoreOutcome(0xB000)
        finally:
            link.close()
    finally:
        peer.stop()


def test_tls_takes_pynetdicoms_path_without_the_hand_over(tmp_path: Path, pynetdicom_sends: list,
                                                          no_chunked_receive) -> None:
    """pynetdicom's DUL thread reads the SSL socket: a second thread may not write it."""
    used = pynetdicom_sends
    peer, ep = tls_peer(tmp_path)
    try:
        files = [file_with_data_set(tmp_path / "src", n) for n in (0, 16379, 2_000_001)]
        store_all(ep, files)
        assert used == files
        for path in files:
            assert peer.received[uid_of(path)] == data_set_part(path)
    finally:
        peer.stop()


def test_tls_takes_the_data_path_once_handed_over(tmp_path: Path, datapath,
                                                  no_chunked_receive) -> None:
    """Only the Link's thread touches the SSL socket: read + send, our own response."""
    peer, ep = tls_peer(tmp_path)
    try:
        files = [file_with_data_set(tmp_path / "src", n) for n in (0, 16377, 2_000_001)]
        store_all(ep, files, on_data_path=True)
        for path in files:
            assert peer.received[uid_of(path)] == data_set_part(path)
        assert max(peer.pdu_lengths) == 16384
    finally:
        peer.stop()


# -- a destination that stops reading --------------------------------------------------

def test_a_peer_that_stops_reading_is_cut_by_the_send_timeout(tmp_path: Path, datapath) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    stopped = False
    try:
        # dimse_timeout 2s sets the socket's send timeout; the transfer's own is 10 min
        link = link_to(endpoint(tmp_path, peer.port, dimse_timeout="2s"))
        big = write_dataset(make_dataset(rows=4096, cols=4096), tmp_path / "src" / "big.dcm")
        os.kill(peer.proc.pid, signal.SIGSTOP)
        stopped = True
        result: list = []
        worker = threading.Thread(target=lambda: result.append(link.store(big, 600)), daemon=True)
        worker.start()
        worker.join(HANG_TIMEOUT)
        assert not worker.is_alive(), "the send was not cut"
        assert result == [net.StoreOutcome(None)]
        assert "stopped reading" in (link.stall_reason or "")
        assert not link.alive
        assert big.exists()  # the sender keeps it for the retry
    finally:
        if stopped:
            os.kill(peer.proc.pid, signal.SIGCONT)
        peer.stop()


def test_a_peer_that_dies_mid_send_ends_the_association_at_once(tmp_path: Path, datapath) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    try:
        link = link_to(endpoint(tmp_path, peer.port, dimse_timeout="10m"))
        big = write_dataset(make_dataset(rows=4096, cols=4096), tmp_path / "src" / "big.dcm")
        os.kill(peer.proc.pid, signal.SIGSTOP)
        result: list = []
        worker = threading.Thread(target=lambda: result.append(link.store(big, 600)), daemon=True)
        worker.start()
        wait_for(lambda: link.send_blocked_for() > 0.2, message="the send blocked on the stopped peer")
        os.kill(peer.proc.pid, signal.SIGKILL)  # its kernel resets the connection
        worker.join(HANG_TIMEOUT)
        assert not worker.is_alive(), "the send did not notice the reset"
        assert result == [net.StoreOutcome(None)]
        assert "connection was lost" in (link.stall_reason or "")
        assert not link.alive
    finally:
        peer.stop()


def test_a_failure_inside_the_data_path_ends_the_association_not_the_file(
        tmp_path: Path, datapath, no_chunked_receive, monkeypatch) -> None:
    def broken(writer, plan, command, fileobj):
        writer.send_bytes(store_send.pdu_header(plan.context_id, 0x01, 4) + b"\0\0\0\0", more=False)
        raise RuntimeError("a bug")
    monkeypatch.setattr(store_send, "_stream", broken)
    peer = RecordingSCP()
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            assert link.store(file_with_data_set(tmp_path, 500), 60) == net.StoreOutcome(None)
            assert "data path failed: RuntimeError: a bug" in (link.stall_reason or "")
            assert not link.alive
        finally:
            link.close()
    finally:
        peer.stop()


def test_a_failure_before_any_byte_hands_the_file_to_pynetdicom(
        tmp_path: Path, monkeypatch, pynetdicom_sends: list, no_chunked_receive) -> None:
    """No descriptor left for the dup (EMFILE) must not cost the association, nor stall
    the queue: nothing went out, so pynetdicom's send_c_store takes the file."""
    used = pynetdicom_sends

    def no_descriptor(self, assoc, deadline):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(store_send._Writer, "__init__", no_descriptor)
    peer = RecordingSCP()
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            path = file_with_data_set(tmp_path, 5000)
            assert link.store(path, 60) == net.StoreOutcome(0x0000)
            assert used == [path] and link.alive
        finally:
            link.close()
        assert peer.received[uid_of(path)] == data_set_part(path)
    finally:
        peer.stop()


def test_a_reactor_that_does_not_pause_cuts_the_association(
        tmp_path: Path, datapath, monkeypatch) -> None:
    """pynetdicom's send_c_store would wait for the pause without a bound (without the
    hand-over: a handed-over association has no reactor)."""
    monkeypatch.setattr(send_session, "_handover", False)
    monkeypatch.setattr(store_send, "_pause", lambda assoc: False)
    peer = RecordingSCP()
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            assert link.store(file_with_data_set(tmp_path, 500), 60) == net.StoreOutcome(None)
            assert "did not pause" in (link.stall_reason or "") and not link.alive
        finally:
            link.close()
    finally:
        peer.stop()


def test_an_early_refusal_counts_when_the_peer_then_stops_reading(
        tmp_path: Path, datapath) -> None:
    """A peer that answers 0xA700 to the command set and reads no more: its answer is
    the file's outcome (not "no response"), and the association is ended."""
    release = threading.Event()

    def refuse_then_stall(event: evt.Event) -> None:
        items = event.pdu.presentation_data_value_items if isinstance(event.pdu, P_DATA_TF) else []
        if items and items[0].presentation_data_value[0] == 0x03 and not release.is_set():
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0xA700
            rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CT, "1.2.3"
            message = C_STORE_RSP()
            message.primitive_to_message(rsp)
            # written here: this DUL thread (which would send a queued answer) now stalls
            for primitive in message.encode_msg(items[0].presentation_context_id, 16382):
                answer = P_DATA_TF()
                answer.from_primitive(primitive)
                event.assoc.dul.socket.socket.sendall(answer.encode())
            release.wait(30)  # this peer's DUL thread reads nothing more meanwhile
    ae = AE("PACS")
    ae.add_supported_context(CT, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_PDU_RECV, refuse_then_stall)])
    try:
        link = link_to(endpoint(tmp_path, port, dimse_timeout="3s"))
        try:
            outcome = link.store(file_with_data_set(tmp_path, 64 * 1024 * 1024), 5)
            assert outcome == net.StoreOutcome(0xA700)
            assert not link.alive
        finally:
            release.set()
            link.close()
    finally:
        release.set()
        server.shutdown()


# -- the send daemon: the switch ------------------------------------------------------

@pytest.mark.parametrize(("fastpath_env", "off", "longest"), [
    pytest.param("1", "", 16382, id="datapath"),
    pytest.param("0", "", 16383, id="fastpath-off"),
    pytest.param("1", "datapath", 16383, id="datapath-off"),
])
def test_the_send_daemon_uses_the_data_path_unless_switched_off(
        tmp_path: Path, no_chunked_receive, fastpath_env: str, off: str, longest: int) -> None:
    # a peer declaring an odd maximum tells the paths apart: pynetdicom fills each PDU
    # to it, the data path sends even fragments (one byte short)
    peer = RecordingSCP(max_pdu=16383)
    sender = None
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
        files = [write_dataset(make_dataset(rows=128, cols=128), tmp_path / "src" / f"{i}.dcm")
                 for i in range(3)]
        put_in_outbox(tmp_path / "spool", "pacs", files)
        sender = Daemon(conf, "send", "pacs", env={"DICOMFLOW_FASTPATH": fastpath_env,
                                                   "DICOMFLOW_PATCHES_OFF": off}).start()
        wait_for(lambda: len(dicom_files(tmp_path / "spool/sent/pacs")) == 3, message="all sent")
        for path in files:
            assert peer.received[uid_of(path)] == data_set_part(path)
        assert max(peer.pdu_lengths) == longest
    finally:
        if sender is not None:
            assert sender.stop() == 0
        peer.stop()
    log = sender.log()  # handed over (send_session) only with the data path on
    assert ("on the send data path" in log) == (longest == 16382) and "Traceback" not in log, log[-3000:]


# -- what still goes to pynetdicom ----------------------------------------------------

def test_switch_is_on_by_default_and_off_by_name() -> None:
    assert "datapath" in fastpath.enabled({})
    assert "datapath" not in fastpath.enabled({"DICOMFLOW_PATCHES_OFF": "datapath"})
    assert "datapath" not in fastpath.enabled({"DICOMFLOW_FASTPATH": "0"})


def test_data_sets_and_unusual_files_take_pynetdicoms_path(
        tmp_path: Path, monkeypatch, pynetdicom_sends: list, no_chunked_receive) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    peer = RecordingSCP()
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            ds = make_dataset()
            assert link.store(ds, 60) == net.StoreOutcome(0x0000)  # transcoded: a Dataset
            no_meta = tmp_path / "no_meta.dcm"
            no_meta.write_bytes(b"\0" * 200)
            with pytest.raises(PermanentError):  # pynetdicom's error, as before
                link.store(no_meta, 60)
            mr = write_dataset(make_dataset(sop_class="1.2.840.10008.5.1.4.1.1.4"), tmp_path / "mr.dcm")
            with pytest.raises(PermanentError):  # no context: pynetdicom's ValueError
                link.store(mr, 60)
            assert link.store(file_with_data_set(tmp_path, 500), 60) == net.StoreOutcome(0)
        finally:
            link.close()
        assert [type(source).__name__ for source in pynetdicom_sends] == [
            "Dataset", "PosixPath", "PosixPath"]
        assert str(ds.SOPInstanceUID) in peer.received
    finally:
        peer.stop()


def test_data_sets_and_unusual_files_on_a_handed_over_association(
        tmp_path: Path, datapath, no_chunked_receive) -> None:
    """No DUL to hand a file back to: a data set is encoded into a temp file and sent
    the same way, a file pydicom can read but our meta reader cannot is re-encoded, and
    the same files as on pynetdicom's path are refused."""
    peer = RecordingSCP()
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            assert link.on_data_path
            ds = make_dataset()
            assert link.store(ds, 60) == net.StoreOutcome(0x0000)  # transcoded: a Dataset
            no_meta = tmp_path / "no_meta.dcm"
            no_meta.write_bytes(b"\0" * 200)
            with pytest.raises(PermanentError):
                link.store(no_meta, 60)
            mr = write_dataset(make_dataset(sop_class="1.2.840.10008.5.1.4.1.1.4"), tmp_path / "mr.dcm")
            with pytest.raises(PermanentError, match="no accepted presentation context"):
                link.store(mr, 60)
            assert link.alive
            assert link.store(file_with_data_set(tmp_path, 500), 60) == net.StoreOutcome(0)
        finally:
            link.close()
        assert str(ds.SOPInstanceUID) in peer.received
    finally:
        peer.stop()


def test_a_vanished_file_raises_file_not_found(tmp_path: Path, datapath) -> None:
    peer = RecordingSCP()
    try:
        link = link_to(endpoint(tmp_path, peer.port))
        try:
            with pytest.raises(FileNotFoundError):
                link.store(tmp_path / "gone.dcm", 60)
            assert link.alive
        finally:
            link.close()
    finally:
        peer.stop()


def test_fragment_size_follows_the_peer_and_our_cap() -> None:
    assert store_send.fragment_size(16384) == 16378
    assert store_send.fragment_size(0) == store_send.PDU_CAP - 6
    assert store_send.fragment_size(None) == store_send.PDU_CAP - 6
    assert store_send.fragment_size(1 << 31) == store_send.PDU_CAP - 6
    assert store_send.fragment_size(16383) == 16376  # even: DCMTK refuses odd fragments
    assert store_send.fragment_size(8) == 2
    assert store_send.fragment_size(7) is None
