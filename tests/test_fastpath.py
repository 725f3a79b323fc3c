"""The issue-7 encoders produce exactly the bytes pynetdicom/pydicom would."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pynetdicom.dimse_messages as dimse_messages
import pytest
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as pydicom_encode

from pipeline import errors
from pipeline.dicom import commands, fastpath, filemeta

CT = "1.2.840.10008.5.1.4.1.1.2"
UIDS = ["1.2.3", CT, "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901"]


def _stock(primitive: C_STORE, max_pdu: int, monkeypatch) -> list:
    monkeypatch.setattr(dimse_messages, "encode", pydicom_encode)
    message_class = (dimse_messages.C_STORE_RQ if primitive.MessageIDBeingRespondedTo is None
                     else dimse_messages.C_STORE_RSP)
    msg = message_class()
    msg.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in msg.encode_msg(1, max_pdu)]


def _fast(primitive: C_STORE, max_pdu: int, monkeypatch) -> list:
    monkeypatch.setattr(dimse_messages, "encode", fastpath.encode_command_set)
    monkeypatch.setattr(commands, "_direct", True)
    sent: list = []

    class Dimse:
        maximum_pdu_size = max_pdu
        dul = type("Dul", (), {"send_pdu": staticmethod(
            lambda p: sent.append(p.presentation_data_value_list))})
        assoc = type("Assoc", (), {"get_handlers": staticmethod(lambda event: [])})

    commands._dimse_send_msg(Dimse(), primitive, 1)  # type: ignore[arg-type]
    return sent


def _primitives(path: Path) -> list[C_STORE]:
    out = []
    for uid in UIDS:
        rq = C_STORE()
        rq.MessageID, rq.Priority = 7, 2
        rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = UID(CT), UID(uid)
        rq._dataset_path = (path, 200)
        out.append(rq)
        rq2 = C_STORE()
        rq2.MessageID, rq2.Priority = 65535, 0
        rq2.AffectedSOPClassUID, rq2.AffectedSOPInstanceUID = CT, uid
        rq2.DataSet = io.BytesIO(b"abcd" * 1000)
        out.append(rq2)
        for status in (0x0000, 0xA700, 0xB000, 0xC000):
            rsp = C_STORE()
            rsp.MessageID = rsp.MessageIDBeingRespondedTo = 7
            rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = UID(CT), UID(uid)
            rsp.Status = status
            out.append(rsp)
    bare = C_STORE()
    bare.MessageIDBeingRespondedTo, bare.Status = 3, 0
    out.append(bare)
    return out


@pytest.mark.parametrize("max_pdu", [0, 16384, 131072, 1 << 20])
def test_c_store_messages_encode_as_pynetdicom_does(tmp_path: Path, max_pdu: int, monkeypatch) -> None:
    path = tmp_path / "data.dcm"
    path.write_bytes(os.urandom(300_000))
    for primitive in _primitives(path):
        assert _fast(primitive, max_pdu, monkeypatch) == _stock(primitive, max_pdu, monkeypatch)


def test_unusual_c_store_falls_back() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.ErrorComment = 1, 0xC000, "bad"
    assert fastpath.encode_c_store_command(rsp) is None


@pytest.mark.parametrize("instance", UIDS)
def test_received_file_meta_is_what_pydicom_writes(instance: str) -> None:
    values = {"sop_class_uid": UID(CT), "sop_instance_uid": UID(instance),
              "transfer_syntax": UID("1.2.840.10008.1.2.1")}
    stock, fast = io.BytesIO(), io.BytesIO()
    filemeta._pydicom_write_file_meta_info(stock, filemeta._create_file_meta_with_slots(**values))
    filemeta._write_file_meta_info(fast, filemeta._create_slotted_meta(**values))
    assert fast.getvalue() == stock.getvalue()


def test_each_speed_up_can_be_switched_off_alone() -> None:
    assert fastpath.enabled({}) == set(fastpath.SWITCHES)
    assert fastpath.enabled({"DICOMFLOW_FASTPATH": "0"}) == set()
    off = fastpath.enabled({"DICOMFLOW_PATCHES_OFF": "reactors, commands,nonsense"})
    assert off == set(fastpath.SWITCHES) - {"reactors", "commands"}


def test_log_handlers_are_left_out_when_their_lines_would_be_dropped_or_a_requestor_asks(monkeypatch) -> None:
    import logging

    from pynetdicom import _config

    plogger = logging.getLogger("pynetdicom")
    level = plogger.level
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    try:
        plogger.setLevel(logging.INFO)
        fastpath._quiet_handlers(requestor=False)
        assert _config.LOG_HANDLER_LEVEL == "standard"
        plogger.setLevel(logging.WARNING)
        fastpath._quiet_handlers(requestor=False)
        assert _config.LOG_HANDLER_LEVEL == "none"
        # a requestor (send, echo) asks with pynetdicom's logger silenced: never bound
        _config.LOG_HANDLER_LEVEL = "standard"
        plogger.setLevel(logging.DEBUG)
        fastpath._quiet_handlers(requestor=True)
        assert _config.LOG_HANDLER_LEVEL == "none"
    finally:
        plogger.setLevel(level)


def _group_of(data: bytes) -> filemeta.MetaGroup:
    return filemeta.read_meta_group(lambda offset, count: data[offset: offset + count], len(data))


def test_the_one_meta_reader_agrees_with_pydicom(tmp_path: Path) -> None:
    from pydicom.filereader import _read_file_meta_info, read_file_meta_info

    from tests.helpers import make_files

    [path] = make_files(tmp_path, 1)
    data = path.read_bytes()
    group = filemeta.read_meta_file(path)
    with path.open("rb") as fp:
        fp.seek(132)
        _read_file_meta_info(fp)
        assert group.end == fp.tell()
    meta = read_file_meta_info(path)
    assert group.text(0x00020003) == meta.MediaStorageSOPInstanceUID
    assert group.text(0x00020010) == meta.TransferSyntaxUID
    assert _group_of(data) == group
    with pytest.raises(errors.MetaCutShort):
        _group_of(data[:group.end - 3])
    with pytest.raises(errors.MetaError):
        _group_of(b"\0" * 200)


def test_the_meta_reader_reads_past_its_first_read_and_bounds_each_element() -> None:
    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + b"\0\0"
        return header + struct.pack("<L", len(value)) + value

    head = b"\0" * 128 + b"DICM"
    big = element(0x00020100, b"OB", b"x" * 20_000)
    data = head + big + element(0x00080016, b"UN", b"")
    group = _group_of(data)
    assert group.values[0x00020100] == b"x" * 20_000 and group.end == len(head) + len(big)
    with pytest.raises(errors.MetaError, match="bytes at byte"):
        _group_of(head + element(0x00020100, b"OB", b"x" * (filemeta.MAX_META_ELEMENT + 2)))
