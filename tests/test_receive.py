"""End-to-end tests of ``dicomflow receive`` against real peers (DCMTK, pynetdicom)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

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

    def __init__(self, tmp_path: Path, **router: object) -> None:
        self.conf = write_conf(tmp_path, router=router)
        self.port = router_port(self.conf)
        self.spool = tmp_path / "spool"
        self.incoming = self.spool / "incoming"
        self.daemon = Daemon(self.conf, "receive")

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

