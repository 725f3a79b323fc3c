"""The listening side of the network boundary (``pipeline/dicom/scp.py``) in this process:
pynetdicom's events arrive as DicomFlow's own types, and answers go back as DIMSE status.

A real pynetdicom SCU talks to a :class:`Listener` over loopback; the application is a
recorder. The receive daemon itself is tested as a subprocess in test_receive.py.
"""

from __future__ import annotations

import tempfile
import threading
import warnings
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from pipeline.config import load_router
from pipeline.dicom import scp
from pipeline.dicom.scp import AssociationInfo, Listener, StoreRequest
from pipeline.errors import Refusal
from tests.helpers import make_dataset, wait_for, write_conf


class Recorder:
    """An :class:`scp.Application` that answers ``answer`` and keeps what it heard."""

    def __init__(self, answer: int | Refusal = 0x0000) -> None:
        self.answer = answer
        self.stores: list[StoreRequest] = []
        self.on_disk: list[bytes] = []  # the first bytes of each data set, read in the handler
        self.established: list[AssociationInfo] = []
        self.rejected: list[AssociationInfo] = []
        self.lock = threading.Lock()

    def on_store(self, request: StoreRequest) -> int | Refusal:
        assert request.dataset_path is not None
        with self.lock:
            self.stores.append(request)
            self.on_disk.append(request.dataset_path.read_bytes()[128:132])
        return self.answer

    def on_established(self, info: AssociationInfo) -> None:
        with self.lock:
            self.established.append(info)

    def on_rejected(self, info: AssociationInfo) -> None:
        with self.lock:
            self.rejected.append(info)


@pytest.fixture
def configured(tmp_path: Path):
    """:func:`scp.configure` for the test, the process-wide settings restored after."""
    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.UNRESTRICTED_STORAGE_SERVICE,
             tempfile.tempdir, warnings.showwarning)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    scp.configure(tmp)
    yield tmp
    (_config.STORE_RECV_CHUNKED_DATASET, _config.UNRESTRICTED_STORAGE_SERVICE,
     tempfile.tempdir, warnings.showwarning) = saved


def listening(app: Recorder) -> Listener:
    """A started listener on the defaults of a minimal router.ini (bound to loopback)."""
    with tempfile.TemporaryDirectory() as base:
        config = load_router(write_conf(Path(base)))
    listener = Listener(config, app)
    listener.start()
    return listener


def associate(listener: Listener, calling: str = "TESTSCU", called: str = "DICOMFLOW"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", listener.router.port, ae_title=called)


def test_a_store_arrives_as_a_store_request_with_its_dataset_on_disk(configured: Path) -> None:
    app = Recorder()
    listener = listening(app)
    try:
        ds = make_dataset()
        assoc = associate(listener)
        assert assoc.is_established
        local_port = assoc.dul.socket.socket.getsockname()[1]
        status = assoc.send_c_store(ds)
        assoc.release()
    finally:
        listener.close(grace=10.0)
    assert status.Status == 0x0000
    (request,) = app.stores
    assert request.sop_class_uid == str(CTImageStorage)
    assert request.sop_instance_uid == str(ds.SOPInstanceUID)
    assert request.transfer_syntax == str(ExplicitVRLittleEndian)
    assert request.calling_ae == "TESTSCU" and request.called_ae == "DICOMFLOW"
    assert request.association.calling.address == "127.0.0.1"
    assert request.association.calling.port == local_port
    assert request.association.association_id is not None
    assert request.dataset_path is not None and request.dataset_path.parent == configured
    assert app.on_disk == [b"DICM"]  # a Part-10 temp file, written before the handler ran
    (established,) = app.established
    assert established == request.association


def store_status(answer: int | Refusal):
    """The C-STORE response an SCU gets from a listener whose application answers ``answer``."""
    listener = listening(Recorder(answer))
    try:
        assoc = associate(listener)
        status = assoc.send_c_store(make_dataset())
        assoc.release()
    finally:
        listener.close(grace=10.0)
    return status


def test_a_refusal_goes_back_as_status_and_a_64_character_ascii_error_comment(
        configured: Path) -> None:
    status = store_status(Refusal(0xA900, "é" + "x" * 100))
    assert status.Status == 0xA900
    assert status.ErrorComment == "?" + "x" * 63


def test_an_int_answer_is_the_status(configured: Path) -> None:
    assert store_status(0xA700).Status == 0xA700


def test_echo_is_answered_without_the_application(configured: Path) -> None:
    app = Recorder()
    listener = listening(app)
    try:
        assoc = associate(listener)
        status = assoc.send_c_echo()
        assoc.release()
    finally:
        listener.close(grace=10.0)
    assert status.Status == 0x0000
    assert not app.stores


def test_a_rejected_association_is_reported_with_the_ae_titles(configured: Path) -> None:
    app = Recorder()
    listener = listening(app)
    try:
        assoc = associate(listener, calling="CT1", called="SOMEONE")
        assert assoc.is_rejected
        wait_for(lambda: app.rejected, message="the rejection reported")
    finally:
        listener.close(grace=10.0)
    (info,) = app.rejected
    # called_ae is the acceptor's (our) AE title, as the receive log has always shown it
    assert info.calling.ae_title == "CT1" and info.called_ae == "DICOMFLOW"
    assert info.calling.address == "127.0.0.1"
    assert not app.established


def test_close_aborts_what_is_still_established_after_the_grace(configured: Path) -> None:
    listener = listening(Recorder())
    assoc = associate(listener)
    assert assoc.is_established
    wait_for(lambda: listener.in_flight() == 1, message="one association in flight")
    listener.close(grace=0.2)
    wait_for(lambda: assoc.is_aborted, message="the association aborted by the listener")


def test_failure_status_is_a_dimse_status_dataset() -> None:
    status = scp.failure_status(Refusal(0xC000, "short"))
    assert status.Status == 0xC000 and status.ErrorComment == "short"


def _receiver(tmp_path: Path):
    from pipeline.config import load
    from pipeline.spool import Spool
    from services.receive import Receiver
    from tests.helpers import write_conf

    config = load(write_conf(tmp_path, router={"bind": "127.0.0.1"}))
    return Receiver(config, Spool(config.router.spool).create(config.endpoints))


def test_the_receiver_runs_on_the_daemon_skeleton(tmp_path: Path, configured: Path) -> None:
    """``run(once=True)`` listens, finds itself idle and closes; ``request_stop`` (what
    the signal thread calls) ends a running receiver without waiting for its next sweep."""
    from pipeline.daemon import run

    receiver = _receiver(tmp_path)
    assert run(receiver, once=True) == 0
    assert receiver.listener.server is None  # closed
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run(receiver)))
    thread.start()
    try:
        wait_for(lambda: receiver.listener.server is not None, message="listening")
        assoc = associate(receiver.listener)
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        receiver.request_stop()
        thread.join(timeout=60)
    assert result == [0] and receiver.listener.server is None
