"""End-to-end tests of ``dicomflow receive`` against real peers (DCMTK, pynetdicom)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.foreign import Gdcm, Odil, PixelMed
from tests.helpers import (
    Daemon,
    dcmtk,
    dicom_files,
    make_dataset,
    make_files,
    router_port,
    wait_for,
    write_conf,
    write_dataset,
)
from tests.peers import TCP_ENV, storescu
from tests.tls import make_certificates


class Receiver:
    """A running receive daemon and what a test needs to talk to it."""

    def __init__(self, tmp_path: Path, env: dict | None = None, **router: object) -> None:
        self.conf = write_conf(tmp_path, router=router)
        self.port = router_port(self.conf)
        self.spool = tmp_path / "spool"
        self.incoming = self.spool / "incoming"
        self.daemon = Daemon(self.conf, "receive", env=env)

    def start(self) -> Receiver:
        self.daemon.start()
        self.daemon.wait_log("listening as")
        return self

    def stored(self) -> list[Path]:
        return dicom_files(self.incoming)


@pytest.fixture
def receiver(tmp_path: Path):
    running = Receiver(tmp_path).start()
    yield running
    assert running.daemon.stop() == 0, running.daemon.log()[-2000:]


def pynetdicom_store(port: int, datasets: list, called: str = "DICOMFLOW",
                     calling: str = "PYSCU") -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association failed"
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def test_200_ct_images_from_storescu_arrive_identical_with_ae_titles(receiver: Receiver,
                                                                      tmp_path: Path) -> None:
    sources = make_files(tmp_path / "study", 200, rows=128, cols=128)
    result = storescu(receiver.port, sources, calling="CT_SCANNER")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(receiver.stored()) == 200, message="200 stored files")
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in sources}
    for path in receiver.stored():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        received = pydicom.dcmread(path)
        source = pydicom.dcmread(by_uid.pop(received.SOPInstanceUID))
        assert received == source  # every data element, pixel data included
        assert received.PixelData == source.PixelData
        meta = received.file_meta
        assert meta.SourceApplicationEntityTitle == "CT_SCANNER"
        assert meta.SendingApplicationEntityTitle == "CT_SCANNER"
        assert meta.ReceivingApplicationEntityTitle == "DICOMFLOW"
        assert meta.MediaStorageSOPInstanceUID == received.SOPInstanceUID
        assert path.name.endswith(f"-{received.SOPInstanceUID}.dcm")
    assert by_uid == {}
    visible = [p.name for p in receiver.incoming.iterdir() if not p.name.startswith(".")]
    assert len(visible) == 200
    assert list((receiver.incoming / ".tmp").iterdir()) == []
    assert stat.S_IMODE(receiver.incoming.stat().st_mode) == 0o700


def test_jpeg_compressed_file_is_stored_as_sent(receiver: Receiver, tmp_path: Path) -> None:
    jpeg = tmp_path / "ct_jpeg.dcm"
    subprocess.run([dcmtk("dcmcjpeg"), get_testdata_file("CT_small.dcm"), str(jpeg)], check=True,
                   capture_output=True)
    source = pydicom.dcmread(jpeg)
    assert source.file_meta.TransferSyntaxUID.is_compressed
    result = storescu(receiver.port, [jpeg], extra=("-xs",))
    assert result.returncode == 0, result.stderr
    (path,) = wait_for(receiver.stored, message="stored JPEG file")
    received = pydicom.dcmread(path)
    assert received.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert received.PixelData == source.PixelData
    if 0xFFFCFFFC in source:  # dataset trailing padding stays in the file, not on the wire
        del source[0xFFFCFFFC]
    assert received == source


def test_echoscu_and_pynetdicom(receiver: Receiver) -> None:
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "DICOMFLOW", "127.0.0.1", str(receiver.port)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **TCP_ENV})
    assert echo.returncode == 0, echo.stderr
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMFLOW")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    statuses = pynetdicom_store(receiver.port, [make_dataset() for _ in range(3)])
    assert statuses == [0, 0, 0]
    assert len(wait_for(lambda: len(receiver.stored()) == 3 and receiver.stored())) == 3


def test_invalid_sop_instance_uid_is_refused(receiver: Receiver) -> None:
    bad = make_dataset()
    bad.SOPInstanceUID = "1.2.abc.3"
    good = make_dataset()
    assert pynetdicom_store(receiver.port, [bad, good]) == [0xC000, 0]
    wait_for(lambda: len(receiver.stored()) == 1)
    assert "invalid SOP Instance/Class UID" in receiver.daemon.log()


def test_disk_floor_answers_out_of_resources(tmp_path: Path) -> None:
    running = Receiver(tmp_path, disk_floor="1000 TiB").start()
    try:
        assert pynetdicom_store(running.port, [make_dataset()]) == [0xA700]
        assert running.stored() == []
        assert list((running.incoming / ".tmp").iterdir()) == []
        assert "below the floor" in running.daemon.log()
    finally:
        assert running.daemon.stop() == 0


def test_unknown_calling_ae_is_rejected(tmp_path: Path) -> None:
    running = Receiver(tmp_path, allowed_calling_aets="CT1, MR1").start()
    try:
        files = make_files(tmp_path / "data", 1)
        refused = storescu(running.port, files, calling="INTRUDER")
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr, refused.stderr
        assert "calling AE" in refused.stderr or "Calling AE" in refused.stderr, refused.stderr
        allowed = storescu(running.port, files, calling="MR1")
        assert allowed.returncode == 0, allowed.stderr
        wait_for(lambda: len(running.stored()) == 1)
        assert "INTRUDER" in running.daemon.log() and "rejected" in running.daemon.log()
    finally:
        assert running.daemon.stop() == 0


def test_wrong_called_ae_is_rejected(receiver: Receiver, tmp_path: Path) -> None:
    files = make_files(tmp_path / "data", 1)
    refused = storescu(receiver.port, files, called="SOMEONE_ELSE")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr, refused.stderr
    assert "Called AE" in refused.stderr or "called AE" in refused.stderr, refused.stderr
    assert receiver.stored() == []


def test_source_network_allow_list(tmp_path: Path) -> None:
    running = Receiver(tmp_path, allowed_networks="10.99.0.0/16").start()
    try:
        refused = storescu(running.port, make_files(tmp_path / "data", 1))
        assert refused.returncode != 0
        assert running.stored() == []
        assert "not in allowed_networks" in running.daemon.log()
    finally:
        assert running.daemon.stop() == 0


def test_tls_required_client_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    conf = write_conf(tmp_path, tls={"tls": "true", "tls_cert": certs.server_cert,
                                     "tls_key": certs.server_key, "tls_ca": certs.ca,
                                     "tls_require_client_cert": "true"})
    daemon = Daemon(conf, "receive").start()
    try:
        daemon.wait_log("listening as")
        port = router_port(conf)
        files = make_files(tmp_path / "data", 2)
        secure = storescu(port, files, extra=("+tls", str(certs.client_key), str(certs.client_cert),
                                               "+cf", str(certs.ca)))
        assert secure.returncode == 0, secure.stderr
        incoming = tmp_path / "spool" / "incoming"
        wait_for(lambda: len(dicom_files(incoming)) == 2, message="2 files over TLS")
        plain = storescu(port, files)
        assert plain.returncode != 0
        anonymous = storescu(port, files, extra=("+tla", "+cf", str(certs.ca)))
        assert anonymous.returncode != 0
        assert len(dicom_files(incoming)) == 2
        # the server keeps working after failed handshakes
        again = storescu(port, files[:1], extra=("+tls", str(certs.client_key), str(certs.client_cert),
                                                  "+cf", str(certs.ca)))
        assert again.returncode == 0, again.stderr
    finally:
        assert daemon.stop() == 0


def test_second_receiver_on_same_spool_exits_with_clear_message(receiver: Receiver) -> None:
    second = Daemon(receiver.conf, "receive", log_name="second-receive").start()
    assert second.proc.wait(60) == 1
    assert "already running" in second.log()


def test_kill_9_mid_transfer_leaves_no_visible_partial_file(tmp_path: Path) -> None:
    running = Receiver(tmp_path).start()
    big = make_dataset(rows=4096, cols=4096)  # 32 MiB of pixels
    big.PixelData = os.urandom(4096 * 4096 * 2) * 4
    big.NumberOfFrames = 4
    source = write_dataset(big, tmp_path / "big.dcm")
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-aec", "DICOMFLOW", "--max-send-pdu", "16384", "127.0.0.1",
         str(running.port), str(source)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **TCP_ENV})
    tmp_dir = running.incoming / ".tmp"

    def partial_written() -> bool:
        return any(p.stat().st_size > 8 * 1024 * 1024 for p in tmp_dir.iterdir())

    wait_for(partial_written, message="a partial transfer in incoming/.tmp")
    os.kill(running.daemon.pid, signal.SIGKILL)
    running.daemon.proc.wait(60)
    sender.wait(120)
    assert sender.returncode != 0  # never acknowledged
    assert running.stored() == []
    assert [p for p in running.incoming.iterdir() if not p.name.startswith(".")] == []
    restarted = Daemon(running.conf, "receive", log_name="restarted").start()
    try:
        restarted.wait_log("listening as")
        assert list(tmp_dir.iterdir()) == []
        assert "stale temp file" in restarted.log()
    finally:
        assert restarted.stop() == 0


def test_sigterm_lets_an_in_flight_transfer_finish(tmp_path: Path) -> None:
    running = Receiver(tmp_path).start()
    files = make_files(tmp_path / "data", 60, rows=256, cols=256)
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-aec", "DICOMFLOW", "127.0.0.1", str(running.port), *map(str, files)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **TCP_ENV})
    wait_for(lambda: len(running.stored()) >= 5, message="transfer under way")
    assert running.daemon.stop() == 0
    sender.wait(120)
    assert sender.returncode == 0, sender.stderr.read()
    assert len(running.stored()) == 60


def test_chunked_receive_memory_is_not_the_dataset(tmp_path: Path) -> None:
    """The receiver streams: a 64 MiB object does not cost 64 MiB of its memory."""
    running = Receiver(tmp_path).start()
    try:
        big = make_dataset(rows=4096, cols=4096)
        big.PixelData = os.urandom(4096 * 4096 * 2) * 2
        big.NumberOfFrames = 2
        path = write_dataset(big, tmp_path / "big.dcm")
        result = storescu(running.port, [path])
        assert result.returncode == 0, result.stderr
        status = Path(f"/proc/{running.daemon.pid}/status").read_text()
        peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        assert peak_kib < 150 * 1024, f"receiver peak RSS {peak_kib} KiB for a 64 MiB object"
        (stored,) = running.stored()
        assert stored.stat().st_size > 64 * 1024 * 1024
    finally:
        assert running.daemon.stop() == 0



# -- defect 19: never acknowledge what the filter can only quarantine ----------------------

FASTPATH = pytest.mark.parametrize("fastpath", ["1", "0"], ids=["fastpath", "pynetdicom"])


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """pydicom's complete test files, and a JPEG baseline variant made by DCMTK."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    files = {name: Path(get_testdata_file(f"{name}.dcm")) for name in ("CT_small", "MR_small")}
    files = {name: Path(shutil.copy(path, directory / path.name)) for name, path in files.items()}
    files["ct_jpeg"] = directory / "ct_jpeg.dcm"
    subprocess.run([dcmtk("dcmcjpeg"), str(files["CT_small"]), str(files["ct_jpeg"])], check=True,
                   capture_output=True, timeout=60)
    return files


def _started(tmp_path: Path, fastpath: str) -> Receiver:
    return Receiver(tmp_path, env={"DICOMFLOW_FASTPATH": fastpath}).start()


def send_file_as_is(port: int, path: Path, calling: str = "PYSCU") -> Dataset:
    """pynetdicom's chunked send: the command's UIDs come from the file meta and the
    data set's bytes go out exactly as they are in the file (nothing re-encoded)."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW")
    assert assoc.is_established, "association failed"
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = saved


def _assert_refused(receiver: Receiver, text: str) -> None:
    wait_for(lambda: text in receiver.daemon.log(), message=f"{text!r} in receive.log")
    assert receiver.stored() == []
    assert "Traceback" not in receiver.daemon.log()


@FASTPATH
def test_defect19_compressed_pixel_data_in_uncompressed_context_is_refused(
        tmp_path: Path, corpus: dict[str, Path], fastpath: str) -> None:
    """odil proposes only uncompressed syntaxes and sends a JPEG file's pixel data as it
    is (encapsulated) in an Explicit VR Little Endian context; storescp aborts on it."""
    running = _started(tmp_path, fastpath)
    try:
        jpeg, plain = Odil().send(running.port, [corpus["ct_jpeg"], corpus["MR_small"]], "DICOMFLOW")
        assert (jpeg.ok, jpeg.status) == (False, 0xC000), jpeg
        assert (plain.ok, plain.status) == (True, 0), plain
        wait_for(lambda: len(running.stored()) == 1, message="the MR stored")
        assert pydicom.dcmread(running.stored()[0]).Modality == "MR"
        assert "encapsulated (compressed) pixel data in a Explicit VR Little Endian context" \
            in running.daemon.log()
        assert list((running.incoming / ".tmp").iterdir()) == []
    finally:
        assert running.daemon.stop() == 0


@FASTPATH
def test_defect19_pixelmed_file_on_another_files_context_is_refused(
        tmp_path: Path, corpus: dict[str, Path], fastpath: str) -> None:
    """PixelMed's multi-file association sends the JPEG file on a context negotiated for
    another file (an uncompressed one): refused, the others stored."""
    running = _started(tmp_path, fastpath)
    try:
        sent = [corpus["MR_small"], corpus["ct_jpeg"], corpus["CT_small"]]
        outcomes = PixelMed(tmp_path / "pixelmed").send(running.port, sent, "DICOMFLOW")
        assert [o.ok for o in outcomes] == [True, False, True], outcomes
        wait_for(lambda: len(running.stored()) == 2, message="MR and CT stored")
        stored = {pydicom.dcmread(p).Modality for p in running.stored()}
        assert stored == {"MR", "CT"}
        for path in running.stored():
            assert not pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
        assert "refused store of" in running.daemon.log()
    finally:
        assert running.daemon.stop() == 0


@FASTPATH
def test_defect19_data_set_not_the_commands_instance_or_class_is_refused(
        tmp_path: Path, fastpath: str) -> None:
    """The command announces what the file meta says, the data set is another one:
    0xA900 (as storescp answers), with an Error Comment."""
    running = _started(tmp_path, fastpath)
    try:
        # pydicom's rtplan.dcm: its file meta and data set disagree on the instance UID
        rtplan = Path(get_testdata_file("rtplan.dcm"))
        status = send_file_as_is(running.port, rtplan)
        assert status.Status == 0xA900
        assert "SOP Instance" in status.ErrorComment
        mr_as_ct = write_dataset(make_dataset(sop_class="1.2.840.10008.5.1.4.1.1.4"),
                                 tmp_path / "mr_as_ct.dcm")
        raw = mr_as_ct.read_bytes()  # an MR data set whose file meta (first UID) says CT
        mr_as_ct.write_bytes(raw.replace(b"1.2.840.10008.5.1.4.1.1.4\0",
                                         b"1.2.840.10008.5.1.4.1.1.2\0", 1))
        assert read_file_meta_info(mr_as_ct).MediaStorageSOPClassUID.endswith(".1.2")
        status = send_file_as_is(running.port, mr_as_ct)
        assert status.Status == 0xA900
        assert "SOP Class" in status.ErrorComment
        _assert_refused(running, "is not the command's")
        good = send_file_as_is(running.port, write_dataset(make_dataset(), tmp_path / "ok.dcm"))
        assert good.Status == 0
        wait_for(lambda: len(running.stored()) == 1)
    finally:
        assert running.daemon.stop() == 0


def _deflated(source: Path, target: Path, keep: float = 1.0, corrupt: bool = False) -> Path:
    """``source`` re-written as Deflated Explicit VR Little Endian; ``keep`` < 1 deflates
    only that share of the data set (complete zlib stream, cut content); ``corrupt``
    flips bytes in the middle of the zlib stream."""
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(target, enforce_file_format=True)
    if keep == 1.0 and not corrupt:
        return target
    raw = target.read_bytes()
    head_len = len(raw) - len(_dataset_bytes(raw))
    body = zlib.decompress(raw[head_len:], -zlib.MAX_WBITS)
    if keep < 1.0:
        body = body[: int(len(body) * keep) | 1]
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(body) + compressor.flush()
    if corrupt:
        middle = len(deflated) // 2
        deflated = deflated[:middle] + bytes(b ^ 0x55 for b in deflated[middle:middle + 64]) \
            + deflated[middle + 64:]
    target.write_bytes(raw[:head_len] + deflated)
    return target


def _dataset_bytes(raw: bytes) -> bytes:
    """What follows the file meta group of a Part-10 file."""
    offset = 132
    while raw[offset:offset + 2] == b"\x02\x00":
        if raw[offset + 4:offset + 6] in (b"OB", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OW"):
            length = int.from_bytes(raw[offset + 8:offset + 12], "little")
            offset += 12 + length
        else:
            offset += 8 + int.from_bytes(raw[offset + 6:offset + 8], "little")
    return raw[offset:]


@FASTPATH
def test_defect19_deflated_data_set_that_does_not_parse_is_refused(
        tmp_path: Path, corpus: dict[str, Path], fastpath: str) -> None:
    running = _started(tmp_path, fastpath)
    try:
        cut = _deflated(corpus["CT_small"], tmp_path / "cut.dcm", keep=0.6)
        status = send_file_as_is(running.port, cut)
        assert status.Status == 0xC000 and "truncated" in status.ErrorComment, status
        garbled = _deflated(corpus["MR_small"], tmp_path / "garbled.dcm", corrupt=True)
        status = send_file_as_is(running.port, garbled)
        assert status.Status == 0xC000, status
        _assert_refused(running, "refused store of")
        good = _deflated(corpus["CT_small"], tmp_path / "good.dcm")
        assert send_file_as_is(running.port, good).Status == 0
        (stored,) = wait_for(running.stored, message="the complete deflated file")
        assert pydicom.dcmread(stored) == pydicom.dcmread(good)
    finally:
        assert running.daemon.stop() == 0


# -- defect 21: a peer that aborts or resets after its last response is no error -----------

@FASTPATH
def test_defect21_gdcmscu_abort_on_exit_is_one_quiet_line(
        tmp_path: Path, corpus: dict[str, Path], fastpath: str) -> None:
    """gdcmscu aborts (and its socket resets) when it exits, after each store."""
    running = _started(tmp_path, fastpath)
    try:
        files = [corpus["CT_small"], corpus["MR_small"]] * 4
        outcomes = Gdcm().send(running.port, files, "DICOMFLOW")
        assert all(o.ok for o in outcomes), outcomes
        wait_for(lambda: len(running.stored()) == len(files), message="every gdcmscu store")
    finally:
        assert running.daemon.stop() == 0
    log = running.daemon.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


def _reset(assoc, partial_pdu: bytes = b"") -> None:
    """End an association the rude way: optionally half a PDU, then a TCP reset."""
    sock = assoc.dul.socket.socket
    if partial_pdu:
        sock.sendall(partial_pdu)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assoc.kill()


@FASTPATH
def test_defect21_peer_reset_after_last_response_is_one_line(tmp_path: Path, fastpath: str) -> None:
    running = _started(tmp_path, fastpath)
    try:
        ae = AE(ae_title="RESETTER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="DICOMFLOW")
        assert assoc.send_c_store(make_dataset()).Status == 0
        _reset(assoc)
        running.daemon.wait_log("closed by the peer after its last PDU")
        assoc = ae.associate("127.0.0.1", running.port, ae_title="DICOMFLOW")
        # 256 bytes declared: the start of a well-formed command fragment on context 1
        # (a malformed PDV would be a protocol error where PDVs are parsed as they come)
        head = b"\x04\x00\x00\x00\x01\x00" + struct.pack(">LBB", 250, 1, 0x01)
        _reset(assoc, partial_pdu=head + b"\x00" * 10)
        running.daemon.wait_log("closed by the peer in the middle of a PDU")
        assert pynetdicom_store(running.port, [make_dataset()]) == [0]  # still serving
    finally:
        assert running.daemon.stop() == 0
    log = running.daemon.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "RESETTER" in line and "closed by the peer" in line]
    assert len(lines) == 2, lines
    assert " INFO " in lines[0] and " WARNING " in lines[1], lines
