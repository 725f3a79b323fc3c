"""pynetdicom's DIMSE path under hostile input (issue 17 follow-up, ``dimse_cap.py``).

An association proposing MPPS (or any association with ``DICOMFLOW_FASTPATH=0``) is
served by pynetdicom's own DIMSE code. Over loopback against the real receive daemon,
with raw PDUs: an N-CREATE whose data set goes past the cap is aborted with bounded
memory, a command pynetdicom cannot turn into a primitive (a UID of 65+ characters) is
aborted at once, each with one WARNING line, and the daemon keeps serving.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep

from pipeline.dicom import dimse_cap
from tests.helpers import HANG_TIMEOUT, Daemon, make_dataset, router_port, tmp_leftovers, wait_for, write_conf
from tests.rawpdu import outcome, p_data_tf, parse_ac, pdv
from tests.reliability import (
    CT,
    EXPLICIT_LE,
    IMPLICIT_LE,
    RawAssociation,
    associate_rq,
    c_store_rq,
    encode_dataset,
    rss_kib,
)

MPPS = "1.2.840.10008.3.1.2.3.3"
MPPS_CONTEXT, CT_CONTEXT = 1, 3
CONTEXTS = ((MPPS_CONTEXT, MPPS, (IMPLICIT_LE,)), (CT_CONTEXT, CT, (EXPLICIT_LE,)))
MiB = 1024 * 1024
FASTPATH = pytest.mark.parametrize("fastpath", ["1", "0"], ids=["fastpath", "pynetdicom"])


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def n_create_rq(instance: str, message_id: int = 1, command_field: int = 0x0140) -> bytes:
    """An N-CREATE-RQ command set (implicit VR little endian) with a data set following;
    ``instance`` as given, even longer than a UID may be; ``command_field`` another
    value for a command nobody knows."""
    body = _element(0x0002, MPPS.encode()) + _element(0x0100, struct.pack("<H", command_field))
    body += _element(0x0110, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", 0x0000)) + _element(0x1000, instance.encode())
    return _element(0x0000, struct.pack("<I", len(body))) + body


def raw_association(port: int, max_pdu: int = 16384) -> tuple[RawAssociation, int]:
    """A raw association proposing MPPS and CT storage; the receiver's maximum PDU."""
    conn = RawAssociation(port, timeout=HANG_TIMEOUT)
    conn.send(associate_rq(contexts=CONTEXTS, max_pdu=max_pdu))
    answer = conn.read_pdu()
    assert answer is not None and answer[0] == 0x02, f"association not accepted: {answer!r}"
    accepted = parse_ac(answer[1])
    assert MPPS_CONTEXT in accepted.contexts, accepted
    return conn, accepted.max_pdu


def send_long_data_set(conn: RawAssociation, total: int, max_pdu: int) -> bool:
    """Send ``total`` bytes of data-set fragments (never the last), each PDU within the
    receiver's maximum; False as soon as the receiver stops taking them."""
    size = (max_pdu or MiB) - 6
    chunk = b"\0" * size
    sent = 0
    while sent < total:
        try:
            conn.send(p_data_tf(pdv(MPPS_CONTEXT, chunk, command=False, last=False)))
        except OSError:
            return False
        sent += size
    return True


class Receiver:
    """The real receive daemon with the fast path on or off."""

    def __init__(self, tmp_path: Path, fastpath: str) -> None:
        self.conf = write_conf(tmp_path, router={"log_level": "INFO"})
        self.port = router_port(self.conf)
        self.spool = tmp_path / "spool"
        self.daemon = Daemon(self.conf, "receive", env={"DICOMFLOW_FASTPATH": fastpath})

    def warnings(self, text: str) -> list[str]:
        return [line for line in self.daemon.log().splitlines() if "WARNING" in line and text in line]

    def still_serves(self) -> None:
        """A normal C-STORE and a normal N-CREATE are answered with success."""
        from tests.test_mpps import n_create_ds

        ae = AE(ae_title="CT1")
        ae.dimse_timeout = HANG_TIMEOUT
        ae.add_requested_context(ModalityPerformedProcedureStep)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMFLOW")
        assert assoc.is_established, self.daemon.log()[-2000:]
        try:
            assert assoc.send_c_store(make_dataset()).Status == 0
            status, _ = assoc.send_n_create(n_create_ds(generate_uid()),
                                            ModalityPerformedProcedureStep, generate_uid())
            assert status.Status == 0
        finally:
            assoc.release()


@pytest.fixture
def receiver(tmp_path: Path, fastpath: str):
    running = Receiver(tmp_path, fastpath)
    running.daemon.start()
    running.daemon.wait_log("listening as")
    yield running
    assert running.daemon.stop() == 0, running.daemon.log()[-2000:]
    assert "Traceback" not in running.daemon.log(), running.daemon.log()[-3000:]


@FASTPATH
def test_an_n_create_data_set_past_the_cap_is_aborted_with_bounded_memory(receiver: Receiver) -> None:
    before = rss_kib(receiver.daemon.pid)
    assert before is not None
    conn, max_pdu = raw_association(receiver.port)
    try:
        conn.send(p_data_tf(pdv(MPPS_CONTEXT, n_create_rq(generate_uid()), command=True)))
        send_long_data_set(conn, dimse_cap.DATASET_CAP + 4 * MiB, max_pdu)
        assert outcome(conn, HANG_TIMEOUT) == "abort"
    finally:
        conn.sock.close()
    peak = rss_kib(receiver.daemon.pid, "VmHWM")
    assert peak is not None and peak - before < 200 * 1024, (before, peak)
    wait_for(lambda: receiver.warnings("data set"), message="the warning line")
    assert len(receiver.warnings("")) == 1, receiver.daemon.log()[-2000:]
    receiver.still_serves()


LONG_UID = "1." + "2" * 63  # 65 characters


def long_uid_n_create() -> list[bytes]:
    return [p_data_tf(pdv(MPPS_CONTEXT, n_create_rq(LONG_UID), command=True)),
            p_data_tf(pdv(MPPS_CONTEXT, b"", command=False, last=True))]


def long_uid_c_store() -> list[bytes]:
    data = encode_dataset(make_dataset())
    return [p_data_tf(pdv(CT_CONTEXT, c_store_rq(CT, LONG_UID), command=True)),
            p_data_tf(pdv(CT_CONTEXT, data, command=False, last=True))]


def unknown_command() -> list[bytes]:
    return [p_data_tf(pdv(MPPS_CONTEXT, n_create_rq(generate_uid(), command_field=0x7777),
                          command=True)),
            p_data_tf(pdv(MPPS_CONTEXT, b"", command=False, last=True))]


@FASTPATH
@pytest.mark.parametrize("pdus", [long_uid_n_create, long_uid_c_store, unknown_command],
                         ids=["n-create-long-uid", "c-store-long-uid", "unknown-command"])
def test_a_command_pynetdicom_cannot_read_is_aborted(receiver: Receiver, pdus) -> None:
    """A UID of 65 characters (pynetdicom cannot make a primitive of it) or an unknown
    command field (it raised out of ``decode_msg`` into the DUL thread): an A-ABORT at
    once (nobody waits out a DIMSE timeout), one WARNING line, no traceback, no temp
    file left, and the daemon serves the next association."""
    conn, max_pdu = raw_association(receiver.port)
    try:
        for pdu in pdus():
            assert len(pdu) - 6 <= max_pdu
            conn.send(pdu)
        assert outcome(conn, HANG_TIMEOUT) == "abort"
    finally:
        conn.sock.close()
    wait_for(lambda: receiver.warnings("DIMSE message"), message="the warning line")
    assert len(receiver.warnings("")) == 1, receiver.daemon.log()[-2000:]
    assert tmp_leftovers(receiver.spool) == []
    receiver.still_serves()


# -- the caps themselves, without a network ----------------------------------------------


def _p_data(*pdvs: tuple[int, bytes]) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cid, value] for cid, value in pdvs]
    return primitive


def test_a_data_set_may_reach_the_cap_but_not_pass_it() -> None:
    message = DIMSEMessage()
    message.data_set.write(b"\0" * (dimse_cap.DATASET_CAP - 10))
    assert dimse_cap.oversize(message, _p_data((1, b"\x00" + b"\0" * 10))) is None
    assert "data set" in (dimse_cap.oversize(message, _p_data((1, b"\x00" + b"\0" * 11))) or "")


def test_a_command_set_is_capped_too() -> None:
    message = DIMSEMessage()
    fragment = b"\x01" + b"\0" * (dimse_cap.COMMAND_CAP // 2)
    assert dimse_cap.oversize(message, _p_data((1, fragment))) is None
    message.encoded_command_set.write(fragment[1:] * 2)
    assert "command set" in (dimse_cap.oversize(message, _p_data((1, b"\x01x"))) or "")


def test_long_uids_are_found_in_the_raw_command_set() -> None:
    message = DIMSEMessage()
    assert dimse_cap.completed_command(message, _p_data((1, b"\x01" + n_create_rq(LONG_UID)))) is None
    command = dimse_cap.completed_command(message, _p_data((1, b"\x03" + n_create_rq(LONG_UID))))
    assert command is not None
    assert dimse_cap.invalid_uid(command) == "AffectedSOPInstanceUID longer than 64 characters (65)"
    good = dimse_cap.completed_command(message, _p_data((1, b"\x03" + n_create_rq(generate_uid()))))
    assert good is not None and dimse_cap.invalid_uid(good) is None


def test_the_cap_holds_an_n_set_referencing_as_many_instances_as_a_record_keeps() -> None:
    """The largest N-SET the MPPS record accepts (``mpps.MAX_INSTANCES`` references with
    64-character UIDs, explicit VR) is under the cap: it is answered, not aborted."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from pipeline.studies import mpps

    def encoded(count: int) -> int:
        item = Dataset()
        item.SeriesInstanceUID = "1." + "2" * 62
        refs = []
        for _ in range(count):
            ref = Dataset()
            ref.ReferencedSOPClassUID = CT
            ref.ReferencedSOPInstanceUID = "1." + "3" * 62
            refs.append(ref)
        item.ReferencedImageSequence = Sequence(refs)
        ds = Dataset()
        ds.PerformedProcedureStepStatus = "COMPLETED"
        ds.PerformedSeriesSequence = Sequence([item])
        return len(encode_dataset(ds))

    per_instance = encoded(2) - encoded(1)
    assert encoded(1) + per_instance * mpps.MAX_INSTANCES < dimse_cap.DATASET_CAP
    assert dimse_cap.DATASET_CAP == 16 * MiB
