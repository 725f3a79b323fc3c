"""The receiver's pre-acknowledgement checks (pipeline/intake.py) on files at rest.

The network side (real senders, both reactors) is in test_receive.py; this checks the
rules themselves on pydicom's test files, as pynetdicom's chunked receive would hand
them over (the file meta carries the command's UIDs and the context's syntax).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info

from pipeline.errors import Refusal
from pipeline.header import HeaderLimits
from pipeline.intake import Command, check_received


def command_of(path: Path, syntax: str | None = None) -> Command:
    meta = read_file_meta_info(path)
    return Command(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                   syntax or str(meta.TransferSyntaxUID))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                                  "SC_rgb_jpeg.dcm", "reportsi.dcm", "image_dfl.dcm",
                                  "MR_small_padded.dcm"])
def test_complete_files_pass(name: str) -> None:
    path = Path(get_testdata_file(name))
    check_received(path, command_of(path))


def test_encapsulated_pixel_data_in_a_native_context_is_refused() -> None:
    path = Path(get_testdata_file("SC_rgb_jpeg.dcm"))
    with pytest.raises(Refusal) as refused:
        check_received(path, command_of(path, syntax="1.2.840.10008.1.2.1"))
    assert refused.value.status == 0xC000
    assert "encapsulated" in refused.value.comment


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(source[: len(source) - 1000])
    with pytest.raises(Refusal) as refused:
        check_received(cut, command_of(cut))
    assert refused.value.status == 0xC000 and "truncated" in refused.value.comment


def test_other_instance_than_the_command_is_refused() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    command = command_of(path)
    with pytest.raises(Refusal) as refused:
        check_received(path, Command(command.sop_class_uid, "1.2.3.4", command.transfer_syntax))
    assert refused.value.status == 0xA900 and "SOP Instance" in refused.value.comment
    with pytest.raises(Refusal) as refused:
        check_received(path, Command("1.2.840.10008.5.1.4.1.1.4", command.sop_instance_uid,
                                     command.transfer_syntax))
    assert refused.value.status == 0xA900 and "SOP Class" in refused.value.comment


def test_deflate_bomb_is_refused_at_the_cap(tmp_path: Path) -> None:
    source = Path(get_testdata_file("image_dfl.dcm"))
    inflated = zlib.decompress(source.read_bytes()[_head_length(source):], -zlib.MAX_WBITS)
    bomb = tmp_path / "bomb.dcm"
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(inflated)
    body += compressor.compress(b"\x09\x00\x10\x10OB\x00\x00" + (64 * 1024 * 1024).to_bytes(4, "little"))
    chunk = bytes(1024 * 1024)
    for _ in range(64):
        body += compressor.compress(chunk)
    body += compressor.flush()
    bomb.write_bytes(source.read_bytes()[:_head_length(source)] + body)
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(Refusal) as refused:
        check_received(bomb, command_of(bomb), HeaderLimits(max_inflated_size=8 * 1024 * 1024))
    assert "inflates to more than 8 MiB" in refused.value.comment


def _head_length(path: Path) -> int:
    """Preamble + file meta group of a Part-10 file (explicit VR little endian)."""
    raw = path.read_bytes()
    offset = 132
    while raw[offset:offset + 2] == b"\x02\x00":
        if raw[offset + 4:offset + 6] in (b"OB", b"UN", b"SQ", b"UT", b"OW"):
            offset += 12 + int.from_bytes(raw[offset + 8:offset + 12], "little")
        else:
            offset += 8 + int.from_bytes(raw[offset + 6:offset + 8], "little")
    return offset
