"""The receive data path (``pipeline/dicom/store_receive.py``, switch ``recvpath``).

The encoders and decoders against pynetdicom's own, without a network; then the real
``dicomflow receive`` daemon with the path on and off: files byte-identical, TLS, a
peer with a tiny maximum PDU, C-ECHO, shutdown with an association open (TCP and TLS). The hostile
cases are in ``tests/test_receive_datapath_hostile.py``.
"""

from __future__ import annotations

import io
import ssl
import struct
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from pipeline.dicom import filemeta, reactors
from pipeline.dicom.store_receive import _Protocol, decode_command, encode_response
from tests.helpers import (
    HANG_TIMEOUT,
    Daemon,
    dcmtk,
    dicom_files,
    make_files,
    router_port,
    wait_for,
    write_conf,
)
from tests.peers import storescu
from tests.rawpdu import negotiate, outcome
from tests.tls import make_certificates

ON_PATH = "on the receive data path"
PATH_ON = {"DICOMFLOW_FASTPATH": "1", "DICOMFLOW_PATCHES_OFF": ""}  # whatever the caller's
PATH_OFF = {**PATH_ON, "DICOMFLOW_PATCHES_OFF": "recvpath"}


# -- command sets, without a network ---------------------------------------------------

def _store_rq_command(**values: object) -> bytes:
    primitive = C_STORE()
    primitive.MessageID = values.get("MessageID", 7)
    primitive.AffectedSOPClassUID = values.get("sop_class", CTImageStorage)
    primitive.AffectedSOPInstanceUID = values.get("instance", "1.2.3.4.5")
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def test_decode_command_reads_what_pynetdicom_encodes() -> None:
    command = decode_command(_store_rq_command(MessageID=513, instance="1.2.840.99.1"))
    assert (command.field, command.message_id, command.data_set) == (0x0001, 513, True)
    assert command.sop_class_uid == CTImageStorage
    assert command.sop_instance_uid == "1.2.840.99.1"


def _with_group_length(body: bytes, declared: int | None = None) -> bytes:
    length = len(body) if declared is None else declared
    return struct.pack("<HHLL", 0, 0, 4, length) + body


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHLH", 0, element, 2, value)


@pytest.mark.parametrize(("data", "reason"), [
    (_with_group_length(_us(0x0100, 1) + _us(0x0110, 1) + _us(0x0800, 1), declared=99),
     "group length 99 but 30 bytes follow"),
    (_us(0x0100, 1) + _us(0x0110, 1) + _us(0x0800, 1), "without a 4-byte Command Group Length"),
    (_with_group_length(_us(0x0100, 1) + _us(0x0800, 1)), "valid Message ID"),
    (_with_group_length(_us(0x0100, 0x0020) + _us(0x0110, 1) + _us(0x0800, 1)), "command 0x0020"),
    (_with_group_length(struct.pack("<HHL", 8, 0x16, 2) + b"12"), "outside group 0000"),
    (_with_group_length(struct.pack("<HHL", 0, 0x1000, 400) + b"12"), "runs past"),
    (_with_group_length(_us(0x0100, 1)[:6]), "cut short"),
    (_with_group_length(_us(0x0100, 1) * 70), "more than 64 elements"),
])
def test_decode_command_refuses_malformed_command_sets(data: bytes, reason: str) -> None:
    with pytest.raises(_Protocol, match=reason):
        decode_command(data)


def _pynetdicom_response(primitive: C_STORE | C_ECHO, message: type) -> bytes:
    encoded = message()
    encoded.primitive_to_message(primitive)
    return encode(encoded.command_set, True, True)


@pytest.mark.parametrize("comment", [None, "too busy: a reason", "odd"])
def test_store_response_is_what_pynetdicom_encodes(comment: str | None) -> None:
    request = decode_command(_store_rq_command(MessageID=9, instance="1.2.3.4.55"))
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.3.4.55"
    primitive.Status = 0xA700 if comment else 0x0000
    if comment:
        primitive.ErrorComment = comment
    expected = _pynetdicom_response(primitive, C_STORE_RSP)
    assert encode_response(request, primitive.Status, comment) == expected


def test_echo_response_is_what_pynetdicom_encodes() -> None:
    body = (struct.pack("<HHL", 0, 2, 18) + Verification.encode() + b"\0"
            + _us(0x0100, 0x0030) + _us(0x0110, 3) + _us(0x0800, 0x0101))
    request = decode_command(_with_group_length(body))
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = Verification
    primitive.Status = 0
    assert encode_response(request, 0) == _pynetdicom_response(primitive, C_ECHO_RSP)


def test_received_file_head_is_what_the_pynetdicom_path_writes(tmp_path: Path) -> None:
    path = tmp_path / "received.dcm"
    meta = filemeta._SlottedMeta(sop_class_uid=MRImageStorage, sop_instance_uid="1.2.3.99",
                                 transfer_syntax="1.2.840.10008.1.2.1")
    with open(path, "wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        filemeta._write_file_meta_info(fp, meta)
    filemeta.stamp_ae_titles(path, "MODALITY\\ÄÖ", "DICOMFLOW")
    head = filemeta.received_file_head(MRImageStorage, "1.2.3.99", "1.2.840.10008.1.2.1",
                                       "MODALITY\\ÄÖ", "DICOMFLOW")
    assert head == path.read_bytes()


# -- the daemon, both ways ----------------------------------------------------------------

def _receiver(tmp_path: Path, env: dict | None = None, tls: dict | None = None,
              **router: object) -> tuple[Daemon, int, Path]:
    conf = write_conf(tmp_path, router={"log_level": "DEBUG", **router}, **({"tls": tls} if tls else {}))
    daemon = Daemon(conf, "receive", env=env or PATH_ON).start()
    daemon.wait_log("listening as")
    return daemon, router_port(conf), tmp_path / "spool" / "incoming"


def _by_instance(directory: Path) -> dict[str, bytes]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes()
            for p in dicom_files(directory)}


def test_files_are_byte_identical_on_both_paths(tmp_path: Path) -> None:
    """The same files through small PDUs (many fragments) and one large one: what lands
    in incoming/ is the same, byte for byte, with the path on and off."""
    files = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
    files += make_files(tmp_path / "big", 2, rows=1024, cols=1024)  # 2 MiB data sets
    stored = {}
    for label, env in (("on", PATH_ON), ("off", PATH_OFF)):
        daemon, port, incoming = _receiver(tmp_path / label, env)
        try:
            for pdu in ("4096", "131072"):
                sent = storescu(port, files, extra=("--max-pdu", pdu))
                assert sent.returncode == 0, sent.stderr
            wait_for(lambda incoming=incoming: len(dicom_files(incoming)) == 2 * len(files),
                     message="every file stored")
        finally:
            assert daemon.stop() == 0
        log = daemon.log()
        assert (ON_PATH in log) == (label == "on"), log[-2000:]
        assert "Traceback" not in log
        stored[label] = _by_instance(incoming)
    assert len(stored["on"]) == len(files)
    assert stored["on"] == stored["off"]
    for data in stored["on"].values():
        assert b"STORESCU        " in data[:1024]  # the AE-title slots are filled


def test_tls_associations_take_the_path(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    daemon, port, incoming = _receiver(tmp_path, tls={"tls": "true", "tls_cert": certs.server_cert,
                                                      "tls_key": certs.server_key, "tls_ca": certs.ca})
    try:
        files = make_files(tmp_path / "data", 3)
        sent = storescu(port, files, extra=("+tls", str(certs.client_key), str(certs.client_cert),
                                             "+cf", str(certs.ca)))
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(dicom_files(incoming)) == 3, message="3 files over TLS")
    finally:
        assert daemon.stop() == 0
    assert ON_PATH in daemon.log()


def test_a_peer_with_a_tiny_maximum_pdu_gets_fragmented_responses(tmp_path: Path) -> None:
    daemon, port, incoming = _receiver(tmp_path)
    try:
        ae = AE(ae_title="TINYPDU")
        ae.maximum_pdu_size = 32  # every response in fragments of 26 bytes
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0
            dataset = pydicom.dcmread(make_files(tmp_path / "data", 1)[0])
            assert assoc.send_c_store(dataset).Status == 0
        finally:
            assoc.release()
        assert assoc.is_released
        wait_for(lambda: len(dicom_files(incoming)) == 1, message="the file stored")
    finally:
        assert daemon.stop() == 0
    assert ON_PATH in daemon.log()


def test_echoscu_is_answered(tmp_path: Path) -> None:
    daemon, port, _ = _receiver(tmp_path)
    try:
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "DICOMFLOW", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stderr
    finally:
        assert daemon.stop() == 0
    assert ON_PATH in daemon.log()


@pytest.mark.parametrize("secure", [False, True], ids=["tcp", "tls"])
def test_shutdown_sends_an_a_abort_to_an_open_association(tmp_path: Path, secure: bool) -> None:
    """SIGTERM with an idle association: the peer gets a DICOM A-ABORT (over TLS too,
    where closing the socket under the session would leave only a TLS alert)."""
    tls = client = None
    if secure:
        certs = make_certificates(tmp_path / "certs")
        tls = {"tls": "true", "tls_cert": certs.server_cert, "tls_key": certs.server_key,
               "tls_ca": certs.ca}
        client = ssl.create_default_context(cafile=str(certs.ca))
        client.check_hostname = False
        client.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    daemon, port, _ = _receiver(tmp_path, tls=tls)
    conn, _accepted = negotiate(port, tls=client)
    daemon.wait_log(ON_PATH)
    answers: list[str] = []
    reader = threading.Thread(target=lambda: answers.append(outcome(conn, 120)))
    reader.start()
    assert daemon.stop(timeout=90) == 0
    reader.join(HANG_TIMEOUT)
    conn.close()
    assert answers == ["abort"], answers
    assert "aborting association from" in daemon.log()


def test_a_dul_thread_that_died_is_not_waited_for() -> None:
    """The hand-over wait ends as soon as the DUL thread is gone without handing over
    (a peer that broke negotiation): its association slot is not held for the wait."""
    dul = threading.Thread(target=lambda: None)
    dul.start()
    dul.join()
    dul._df_handover = threading.Event()  # type: ignore[attr-defined]
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(reactors.handed_over(dul, 600)))  # type: ignore[arg-type]
    waiter.start()
    waiter.join(HANG_TIMEOUT)
    assert results == [False]
