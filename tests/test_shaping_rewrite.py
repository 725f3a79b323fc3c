"""The shaping writer: only the changed attributes are re-encoded, every other byte of
the data set is copied through, in every transfer syntax."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.errors import QuarantineError, ShapingError
from pipeline.header import DEFAULT_LIMITS, read_meta
from pipeline.shaping import provenance
from pipeline.shaping.operations import parse_operations
from pipeline.shaping.rewrite import ShapingSource
from tests.helpers import make_dataset, write_dataset

NOTHING = parse_operations("IssuerOfPatientID = {IssuerOfPatientID}")  # never changes a value
SITE_A = parse_operations("PatientID = SITEA-{PatientID}")
FILES = ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm",
         "JPEG2000.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "reportsi.dcm"]


def shape(src: Path, out: Path, operations, mark_for: str | None = "ep"):
    with ShapingSource.open(src, DEFAULT_LIMITS, out.parent) as source:
        plan = source.plan(operations, "DICOMFLOW:ep")
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            plan.write(fd, None if mark_for is None else provenance.shaped_mark(mark_for))
        finally:
            os.close(fd)
    return plan


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a Part-10 file (inflated if it is deflated)."""
    with open(path, "rb") as fp:
        end = read_meta(fp, os.path.getsize(path)).end
    data = path.read_bytes()[end:]
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    if meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99":
        return zlib.decompress(data, -zlib.MAX_WBITS)
    return data


@pytest.mark.parametrize("name", FILES)
def test_a_copy_without_changes_has_the_very_same_data_set(tmp_path, name):
    src = Path(get_testdata_file(name))
    plan = shape(src, tmp_path / "out.dcm", NOTHING)
    assert not plan.changed
    assert dataset_bytes(tmp_path / "out.dcm") == dataset_bytes(src)


@pytest.mark.parametrize("name", FILES)
def test_a_coerced_copy_differs_in_the_changed_attributes_only(tmp_path, name):
    src = Path(get_testdata_file(name))
    out = tmp_path / "out.dcm"
    plan = shape(src, out, SITE_A)
    before, after = pydicom.dcmread(src), pydicom.dcmread(out)
    if "PatientID" not in before or not before.PatientID:
        assert not plan.changed  # a template over a missing value is skipped
        return
    assert after.PatientID == f"SITEA-{before.PatientID}"
    assert {e.tag for e in after} == {e.tag for e in before} | {provenance.ORIGINAL_ATTRIBUTES}
    for element in before:
        if element.tag != 0x00100020:
            assert after[element.tag] == element, element.keyword
    [item] = after.OriginalAttributesSequence
    assert item.ModifiedAttributesSequence[0].PatientID == before.PatientID
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.file_meta.PrivateInformation == provenance.shaped_mark("ep")


def _with_extras(tmp_path: Path) -> Path:
    """A file with a large private value, an undefined-length sequence, and trailing
    elements after the pixel data."""
    ds = make_dataset(patient_id="PID1")
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "OB", os.urandom(100 * 1024))
    ds.ReferencedStudySequence = Sequence([Dataset()])
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedStudySequence.is_undefined_length = True
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # Data Set Trailing Padding
    return write_dataset(ds, tmp_path / "in.dcm")


def test_large_values_sequences_and_trailing_elements_are_copied_through(tmp_path):
    src = _with_extras(tmp_path)
    shape(src, tmp_path / "same.dcm", NOTHING)
    assert dataset_bytes(tmp_path / "same.dcm") == dataset_bytes(src)
    out = tmp_path / "out.dcm"
    shape(src, out, SITE_A)
    before, after = pydicom.dcmread(src), pydicom.dcmread(out)
    assert after.PatientID == "SITEA-PID1"
    assert after[0x00091010].value == before[0x00091010].value
    assert after[0xFFFCFFFC].value == before[0xFFFCFFFC].value
    assert before[0x00091010].value in dataset_bytes(out)  # the 100 KiB value, verbatim


def test_an_operation_that_does_not_need_a_large_value_never_reads_it(tmp_path):
    src = _with_extras(tmp_path)
    with ShapingSource.open(src, DEFAULT_LIMITS, tmp_path) as source:
        source.plan(SITE_A, "DICOMFLOW:ep")
        element = source.dataset.get_item(0x00091010, keep_deferred=True)
        assert element is not None and element.value is None  # still deferred


def test_a_coerced_sop_instance_uid_follows_in_the_file_meta(tmp_path):
    src = write_dataset(make_dataset(), tmp_path / "in.dcm")
    out = tmp_path / "out.dcm"
    plan = shape(src, out, parse_operations("SOPInstanceUID = 1.2.826.0.1.3680043.2.1143.7"))
    after = pydicom.dcmread(out)
    assert plan.sop_instance_uid == after.SOPInstanceUID == "1.2.826.0.1.3680043.2.1143.7"
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID


def test_a_second_stage_adds_its_own_item_after_the_files_own(tmp_path):
    src = write_dataset(make_dataset(patient_id="P"), tmp_path / "in.dcm")
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    shape(src, first, SITE_A, mark_for=None)
    with ShapingSource.open(first, DEFAULT_LIMITS, tmp_path) as source:
        plan = source.plan(parse_operations("IssuerOfPatientID = SITEA"), "DICOMFLOW:ep")
        fd = os.open(second, os.O_WRONLY | os.O_CREAT, 0o600)
        plan.write(fd, provenance.shaped_mark("ep"))
        os.close(fd)
    after = pydicom.dcmread(second)
    assert after.PatientID == "SITEA-P" and after.IssuerOfPatientID == "SITEA"
    assert [i.ModifyingSystem for i in after.OriginalAttributesSequence] == ["DICOMFLOW:ep"] * 2
    # the first item is the file's, byte for byte
    data = dataset_bytes(first)
    element = data[data.index(b"\x00\x04\x61\x05SQ"):data.index(b"\xe0\x7f\x10\x00")]
    assert element[12:-8] in dataset_bytes(second)  # its items, without header and delimiter


@pytest.mark.parametrize(("charset", "name"), [("ISO_IR 192", "Müller"), ("ISO_IR 100", "Müller"),
                                               (["ISO 2022 IR 6", "ISO 2022 IR 87"], "\u5c71\u7530")])
def test_previous_values_keep_their_encoding(tmp_path, charset, name):
    ds = make_dataset(SpecificCharacterSet=charset, InstitutionName="X")
    ds.PatientName = name
    ds.InstitutionName = name if isinstance(charset, str) else "X"
    src = write_dataset(ds, tmp_path / "in.dcm")
    out = tmp_path / "out.dcm"
    shape(src, out, parse_operations("delete InstitutionName\nPatientName = X{PatientName}"))
    after = pydicom.dcmread(out)
    modified = after.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert str(modified.PatientName) == name and str(after.PatientName) == f"X{name}"
    assert modified.InstitutionName == ds.InstitutionName and "InstitutionName" not in after


def test_an_invalid_previous_value_does_not_stop_its_coercion(tmp_path):
    ds = make_dataset()
    ds.add_new(0x00100020, "LO", "9" * 80)  # too long for LO: the coercion is the fix
    src = write_dataset(ds, tmp_path / "in.dcm")
    out = tmp_path / "out.dcm"
    shape(src, out, parse_operations("PatientID = FIXED"))
    after = pydicom.dcmread(out)
    assert after.PatientID == "FIXED"
    assert after.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientID == "9" * 80


def test_a_truncated_file_is_refused_before_anything_is_written(tmp_path):
    src = write_dataset(make_dataset(rows=64, cols=64), tmp_path / "in.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(QuarantineError), ShapingSource.open(cut, DEFAULT_LIMITS, tmp_path):
        pass


def test_what_follows_the_pixel_data_is_refused_where_operations_would_miss_it(tmp_path):
    ds = make_dataset(patient_id="P")
    block = ds.private_block(0x7FE1, "GEMS_VIEWER_01", create=True)  # after (7FE0,0010)
    block.add_new(0x01, "LO", "private")
    src = write_dataset(ds, tmp_path / "private-after.dcm")
    out = tmp_path / "out.dcm"
    shape(src, out, SITE_A)  # not deleting private elements: copied through
    assert pydicom.dcmread(out)[0x7FE11001].value == "private"
    with pytest.raises(ShapingError, match=r"private element \(7FE1,0010\) follows the pixel"):
        shape(src, out, parse_operations("delete private"))
    ds = make_dataset(patient_id="P")
    ds.add_new(0x7FE20010, "LO", "out of place")
    src = write_dataset(ds, tmp_path / "public-after.dcm")
    with pytest.raises(ShapingError, match=r"attribute \(7FE2,0010\) follows the pixel data"):
        shape(src, out, SITE_A)
