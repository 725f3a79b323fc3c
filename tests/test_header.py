"""Safe header reading: regular files only, bounded memory, complete files only."""

from __future__ import annotations

import io
import os
import resource
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from pipeline.errors import QuarantineError
from pipeline.header import open_regular, read_header
from tests import corpus
from tests.helpers import make_dataset, write_dataset

VALID_TESTDATA = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                  "MR_small_RLE.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "image_dfl.dcm", "reportsi.dcm",
                  "waveform_ecg.dcm", "liver_1frame.dcm", "SC_rgb_jpeg.dcm"]


@pytest.mark.parametrize("name", VALID_TESTDATA)
def test_real_files_are_read(name, tmp_path):
    path = Path(shutil.copy(get_testdata_file(name), tmp_path / name))
    header = read_header(path)
    assert header.sop_instance_uid == str(header.dataset.SOPInstanceUID)
    assert "PixelData" not in header.dataset
    assert header.size == path.stat().st_size


def test_the_corpus_is_quarantined_with_reasons(tmp_path):
    cases = corpus.build(tmp_path / "corpus")
    assert len(cases) >= 15
    for case in cases:
        with pytest.raises(QuarantineError) as info:
            read_header(tmp_path / "corpus" / case.name)
        assert case.expect in str(info.value), case.name
        assert "\n" not in str(info.value)


def test_a_symlink_is_never_followed(tmp_path):
    target = write_dataset(make_dataset(), tmp_path / "real.dcm")
    (tmp_path / "link.dcm").symlink_to(target)
    with pytest.raises(QuarantineError, match="symbolic link"):
        open_regular(tmp_path / "link.dcm")


def test_a_fifo_never_blocks(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(QuarantineError, match="FIFO"):
        read_header(tmp_path / "fifo")    # returns at once: O_NONBLOCK, then fstat


def test_every_truncation_is_refused(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    accepted = []
    for cut in range(1, len(data), 211):
        path.write_bytes(data[:cut])
        try:
            read_header(path)
            accepted.append(cut)
        except QuarantineError:
            pass
    assert accepted == []


def test_encapsulated_fragments_are_checked(tmp_path):
    data = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    (tmp_path / "j.dcm").write_bytes(data[:-20])
    with pytest.raises(QuarantineError, match="truncated"):
        read_header(tmp_path / "j.dcm")


def test_a_large_file_costs_no_more_memory(tmp_path):
    """A 200 MB object is read without its pixel data (ru_maxrss grows far less than that)."""
    ds = make_dataset(rows=10, cols=10)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 1000, 1000, 100
    path = write_dataset(ds, tmp_path / "big.dcm")
    with open(path, "r+b") as handle:  # patch the pixel data to 200 MB without building it in memory
        data = handle.read()
        offset = data.rindex(b"\xe0\x7f\x10\x00")
        handle.seek(offset + 8)
        handle.write((200_000_000).to_bytes(4, "little"))
        handle.truncate(offset + 12 + 200_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    header = read_header(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert header.size > 200_000_000
    assert grown_kib < 50_000


def test_large_non_pixel_values_are_dropped_not_read(tmp_path):
    ds = make_dataset()
    ds.add_new(0x00091010, "OB", b"x" * 300_000)
    ds.add_new(0x00090010, "LO", "PRIVATE")
    header = read_header(write_dataset(ds, tmp_path / "p.dcm"))
    assert 0x00091010 not in header.dataset
    assert header.dataset[0x00090010].value == "PRIVATE"


# -- issue 10: hostile headers ---------------------------------------------------------

MiB = 1024 * 1024
DEFLATED_LE = "1.2.840.10008.1.2.1.99"


def _meta_bytes(ds, transfer_syntax: str) -> bytes:
    """Preamble, 'DICM' and the file meta of ``ds`` with ``transfer_syntax``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
    return buffer.getvalue()


def _body_bytes(ds) -> bytes:
    """The data set of ``ds`` (explicit VR little endian, file meta excluded)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset as write_body

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_body(buffer, ds)
    return buffer.getvalue()


def deflate_bomb(path: Path, inflated: int, before_pixels: bool = False) -> Path:
    """A small Deflated Explicit VR Little Endian image inflating to ``inflated`` bytes of
    zeros: as pixel data, or (``before_pixels``) as a private OB value ahead of it."""
    import struct
    import zlib

    ds = make_dataset(rows=16, cols=16)
    del ds.PixelData
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = max(inflated // (2 * MiB), 1)
    head = _body_bytes(ds)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(_meta_bytes(ds, DEFLATED_LE))
        out.write(squeeze.compress(head))
        tag = (0x0009, 0x1010, b"OB") if before_pixels else (0x7FE0, 0x0010, b"OW")
        out.write(squeeze.compress(struct.pack("<HH2sHL", tag[0], tag[1], tag[2], 0, inflated)))
        zeros = bytes(MiB)
        for _ in range(inflated // MiB):
            out.write(squeeze.compress(zeros))
        if before_pixels:
            out.write(squeeze.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 8) + bytes(8)))
        out.write(squeeze.flush())
    return path


def many_elements(path: Path, count: int) -> Path:
    """A valid small CT with ``count`` empty private elements (8 bytes each) before its
    pixel data: a few MB on disk, hundreds of MB as pydicom objects."""
    import struct

    ds = make_dataset()
    pixels = ds.PixelData
    del ds.PixelData
    parts = [_meta_bytes(ds, ds.file_meta.TransferSyntaxUID), _body_bytes(ds)]
    pack = struct.Struct("<HH2sH").pack
    group, element = 0x0029, 0x1000
    for _ in range(count):
        parts.append(pack(group, element, b"LO", 0))
        element += 1
        if element > 0xFFFF:
            group, element = group + 2, 0x1000
    parts.append(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels)
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("keyword, value, expect", [
    ("TransferSyntaxUID", "1." + "2" * 67, "Transfer Syntax UID"),           # 69 characters
    ("TransferSyntaxUID", "1.2.840.10008.1.2.1x", "Transfer Syntax UID"),
    ("MediaStorageSOPClassUID", "1.2.840.10008.5.1.4.1.1.2.x", "SOP Class UID"),
    ("MediaStorageSOPClassUID", "1." + "2" * 67, "SOP Class UID"),
])
def test_defect03_file_meta_uids_must_be_uids(tmp_path, keyword, value, expect):
    """A 69-character Transfer Syntax UID passed (non-empty only) and stopped the sender."""
    import warnings

    ds = make_dataset()
    syntax = ds.file_meta.TransferSyntaxUID
    body = _body_bytes(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID, as it should
        setattr(ds.file_meta, keyword, value)
        if keyword == "MediaStorageSOPClassUID":
            ds.SOPClassUID = value
            body = _body_bytes(ds)
        meta = _meta_bytes(ds, ds.file_meta.TransferSyntaxUID if keyword != "MediaStorageSOPClassUID"
                           else syntax)
    path = tmp_path / "x.dcm"
    path.write_bytes(meta + body)
    with pytest.raises(QuarantineError, match=f"invalid {expect}") as info:
        read_header(path)
    assert "(0002," in str(info.value) and "\n" not in str(info.value)


def test_defect04_deflate_bomb_is_refused_at_the_inflation_cap(tmp_path):
    """512 MiB of zeros in a 0.5 MB file: refused once 256 MiB came out, and inflated
    chunk by chunk (memory grows by far less than the cap)."""
    from pipeline.header import HeaderLimits

    for before_pixels in (False, True):
        path = deflate_bomb(tmp_path / f"bomb{before_pixels}.dcm", 512 * MiB, before_pixels)
        assert path.stat().st_size < 2 * MiB
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(QuarantineError, match="max_inflated_size") as info:
            read_header(path, limits=HeaderLimits(max_inflated_size=256 * MiB))
        assert "256 MiB" in str(info.value)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_defect04_deflated_files_within_the_cap_are_read_and_checked(tmp_path):
    from pipeline.header import HeaderLimits, check_complete

    path = deflate_bomb(tmp_path / "ok.dcm", 8 * MiB)
    header = read_header(path, limits=HeaderLimits(max_inflated_size=16 * MiB))
    assert header.transfer_syntax == DEFLATED_LE and "PixelData" not in header.dataset
    assert header.dataset.Rows == 1024
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-30])    # the deflate stream cut short
    with pytest.raises(QuarantineError, match="truncated"):
        read_header(tmp_path / "cut.dcm")
    real = Path(get_testdata_file("image_dfl.dcm"))
    with open(real, "rb") as handle:                  # the receiver's pre-acknowledgement check
        check_complete(handle, real.stat().st_size, DEFLATED_LE, header.sop_class_uid)
    cut = real.read_bytes()[:-200]
    (tmp_path / "cut_dfl.dcm").write_bytes(cut)
    with open(tmp_path / "cut_dfl.dcm", "rb") as handle, pytest.raises(QuarantineError):
        check_complete(handle, len(cut), DEFLATED_LE, "")


def test_defect05_very_many_elements_are_refused_before_they_are_read(tmp_path):
    from pipeline.header import HeaderLimits

    path = many_elements(tmp_path / "many.dcm", 300_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(QuarantineError, match="max_header_elements") as info:
        read_header(path, limits=HeaderLimits(max_header_elements=100_000))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    assert "100000" in str(info.value)
    header = read_header(path, limits=HeaderLimits(max_header_elements=400_000))
    assert len(header.dataset) > 300_000


def test_defect05_header_bytes_are_bounded(tmp_path):
    """Values up to 64 KiB are read into memory: their total is bounded too (nested
    values are read whatever their size)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from pipeline.header import HeaderLimits

    ds = make_dataset()
    for index in range(40):
        ds.add_new(0x00291000 + index, "OB", b"x" * 60_000)
    item = Dataset()
    item.add_new(0x00291010, "OB", b"y" * 3 * MiB)
    ds.add_new(0x00331010, "SQ", Sequence([item]))
    ds[0x00331010].is_undefined_length = True
    path = write_dataset(ds, tmp_path / "bytes.dcm")
    with pytest.raises(QuarantineError, match="max_header_bytes"):
        read_header(path, limits=HeaderLimits(max_header_bytes=4 * MiB))
    assert len(read_header(path, limits=HeaderLimits(max_header_bytes=8 * MiB)).dataset) > 40


@pytest.mark.parametrize("padding", [b"\0", b"\0" * 7])
def test_defect18_trailing_zero_padding_is_tolerated(tmp_path, padding):
    """PixelMed pads an odd-length data set with one 0x00 after the last element; up to
    7 zero bytes (less than an element header) are tolerated, nothing else."""
    from pipeline.header import check_complete

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "padded.dcm"
    path.write_bytes(data + padding)
    header = read_header(path)
    assert header.size == len(data) + len(padding)
    with open(path, "rb") as handle:
        check_complete(handle, len(data) + len(padding), header.transfer_syntax, header.sop_class_uid)


@pytest.mark.parametrize("padding", [b"\x01", b"\0" * 6 + b"\x20", b"\0" * 8 + b"\x00"])
def test_defect18_other_trailing_bytes_are_still_refused(tmp_path, padding):
    ds = make_dataset()
    path = write_dataset(ds, tmp_path / "x.dcm")
    path.write_bytes(path.read_bytes() + padding)
    with pytest.raises(QuarantineError, match="truncated or corrupt"):
        read_header(path)


def test_defect04_sibling_deflated_image_frames_are_walked_like_any_data_set(tmp_path):
    """Deflated Image Frame Compression (1.2.840.10008.1.2.8.1) deflates pixel frames,
    not the data set: it was taken for a deflated data set and never walked, so a file
    cut short passed."""
    ds = make_dataset()
    data = _meta_bytes(ds, "1.2.840.10008.1.2.8.1") + _body_bytes(ds)
    (tmp_path / "whole.dcm").write_bytes(data)
    assert read_header(tmp_path / "whole.dcm").transfer_syntax == "1.2.840.10008.1.2.8.1"
    (tmp_path / "cut.dcm").write_bytes(data[:-100])
    with pytest.raises(QuarantineError, match="truncated"):
        read_header(tmp_path / "cut.dcm")


def test_header_limits_are_configured_in_the_filter_section(tmp_path):
    from pipeline.config import load_router
    from pipeline.errors import ConfigError
    from pipeline.header import HeaderLimits
    from tests.helpers import write_conf

    conf = write_conf(tmp_path, filter_={"max_header_elements": "1000", "max_header_bytes": "1 MiB",
                                         "max_inflated_size": "2 GiB"})
    assert load_router(conf).header_limits == HeaderLimits(1000, MiB, 2 * 1024 * MiB)
    assert write_conf(tmp_path / "d") and load_router(tmp_path / "d" / "conf").header_limits \
        == HeaderLimits()
    conf = write_conf(tmp_path / "bad", filter_={"max_inflated_size": "0"})
    with pytest.raises(ConfigError, match=r"\[filter\] max_inflated_size"):
        load_router(conf)


def test_defect05_the_file_meta_counts_too(tmp_path):
    import struct

    from pipeline.header import HeaderLimits

    meta = b"".join(struct.pack("<HH2sH", 0x0002, 0x0100 + i, b"LO", 0) for i in range(2000))
    (tmp_path / "meta.dcm").write_bytes(b"\0" * 128 + b"DICM" + meta)
    with pytest.raises(QuarantineError, match="max_header_elements"):
        read_header(tmp_path / "meta.dcm", limits=HeaderLimits(max_header_elements=1000))


# -- issue 13: the walk's block loop against the element-by-element one ---------------

BLOCK_WALK_FILES = ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "reportsi.dcm",
                    "SC_rgb_small_odd.dcm", "liver_1frame.dcm"]


def _verdicts(path: Path, variants: list[bytes], monkeypatch, off: bool) -> list[str]:
    """What read_header says of each variant, with the ``scan`` switch on or off."""
    if off:
        monkeypatch.setenv("DICOMFLOW_PATCHES_OFF", "scan")
    else:
        monkeypatch.delenv("DICOMFLOW_PATCHES_OFF", raising=False)
        monkeypatch.delenv("DICOMFLOW_FASTPATH", raising=False)
    verdicts = []
    for data in variants:
        path.write_bytes(data)
        try:
            verdicts.append(f"read {read_header(path).sop_instance_uid}")
        except QuarantineError as exc:
            verdicts.append(str(exc))
    return verdicts


@pytest.mark.parametrize("name", BLOCK_WALK_FILES)
def test_the_block_walk_gives_the_element_walks_verdicts(tmp_path, monkeypatch, name):
    """Cut short anywhere in the header (and further on), or with a byte changed in the
    header: the same verdict and message with the block loop as without it."""
    from pipeline.dicom.filemeta import read_meta_file

    source = Path(get_testdata_file(name))
    data = source.read_bytes()
    start = read_meta_file(source).end
    head = min(len(data), start + 1500)
    cuts = [data[:cut] for cut in [*range(start, head, 3), *range(head, len(data), 1999)]]
    flips = [data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:] for at in range(start, head, 7)]
    padded = [data + b"\0" * n for n in range(1, 10)] + [data + b"\0\0\0\1"]
    variants = cuts + flips + padded
    path = tmp_path / "variant.dcm"
    fast = _verdicts(path, variants, monkeypatch, off=False)
    assert fast == _verdicts(path, variants, monkeypatch, off=True)
    assert any(v.startswith("read") for v in fast) and any("truncated" in v for v in fast)


class _CountingFileIO(io.FileIO):
    """A raw file that counts the bytes read from it (what reaches the disk cache)."""

    read_bytes = 0

    def readinto(self, buffer):  # type: ignore[override]
        count = super().readinto(buffer)
        self.read_bytes += count or 0
        return count


def _bytes_walked(path: Path, monkeypatch, off: bool) -> int:
    """Bytes check_complete reads from ``path`` through a buffered reader, as the filter's
    ``os.fdopen`` gives it, with the ``scan`` switch on or off."""
    from pipeline.header import check_complete

    monkeypatch.delenv("DICOMFLOW_FASTPATH", raising=False)
    monkeypatch.setenv("DICOMFLOW_PATCHES_OFF", "scan" if off else "")
    raw = _CountingFileIO(path)
    with io.BufferedReader(raw) as fp:
        check_complete(fp, path.stat().st_size, "1.2.840.10008.1.2.1", SR_CLASS)
    return raw.read_bytes


SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"


def test_the_block_walk_seeks_over_large_values_as_the_element_walk(tmp_path, monkeypatch):
    """200 private OB values just above the defer size: the block loop must not read
    what lies between their headers (the review measured the whole file read)."""
    import struct

    ds = make_dataset(sop_class=SR_CLASS, modality="SR")
    del ds.PixelData
    path = tmp_path / "large-values.dcm"
    header = struct.pack("<HH2sHL", 0x0011, 0x1010, b"OB", 0, 65537)
    with path.open("wb") as out:
        out.write(_meta_bytes(ds, "1.2.840.10008.1.2.1") + _body_bytes(ds))
        for _ in range(200):
            out.write(header)
            out.seek(65537, os.SEEK_CUR)  # sparse: zeros (odd length: not block aligned)
        out.truncate()
    size = path.stat().st_size
    element_walk = _bytes_walked(path, monkeypatch, off=True)
    block_walk = _bytes_walked(path, monkeypatch, off=False)
    assert element_walk < size // 5  # the element walk only seeks (8 KiB buffer a header)
    assert block_walk <= 2 * element_walk + 64 * 1024, (block_walk, element_walk, size)
