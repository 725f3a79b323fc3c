"""Safe header reading: regular files only, bounded memory, complete files only."""

from __future__ import annotations

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
