"""De-identification through the shaping writer (pipeline/shaping/deidentify.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.errors import ShapingError
from pipeline.header import DEFAULT_LIMITS
from pipeline.shaping import provenance
from pipeline.shaping.copies import plan_endpoint_copy
from pipeline.shaping.deidentify import DeidentifyConfig, SafePrivate, well_known_uid
from pipeline.shaping.operations import parse_operations
from pipeline.shaping.rewrite import ShapingSource
from tests.helpers import make_dataset, write_dataset

KEY = b"k" * 32
NAME, PID, BIRTH = "ZZDOE^ZZJOHN", "PID-ZZ4711", "19610203"


class FakeEndpoint:
    """The two fields plan_endpoint_copy reads of an EndpointConfig."""

    def __init__(self, deidentify: DeidentifyConfig | None, coerce: str = "") -> None:
        self.name = "research"
        self.deidentify = deidentify
        self.coerce = parse_operations(coerce)


def identified(**attrs: object) -> Dataset:
    ds = make_dataset(patient_name=NAME, patient_id=PID, PatientBirthDate=BIRTH,
                      AccessionNumber="ACC-ZZ99", InstitutionName="ZZ GENERAL HOSPITAL",
                      ReferringPhysicianName="ZZREF^ZZDOC", StationName="ZZCT01",
                      StudyDescription=f"CT CHEST {NAME}", FrameOfReferenceUID=pydicom.uid.generate_uid(),
                      ContentDate="20261128", **attrs)
    ds.file_meta.SourceApplicationEntityTitle = "ZZMODALITY"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.111"
    ds.ReferencedImageSequence = Sequence([ref])
    old = Dataset()
    old.PatientID = "OLD-ZZ1"
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([old])
    ds.OriginalAttributesSequence = Sequence([item])
    block = ds.private_block(0x0009, "ZZVENDOR", create=True)
    block.add_new(0x01, "LO", NAME)
    block.add_new(0x02, "DS", "1.5")
    return ds


def deidentify(tmp_path: Path, ds: Dataset, options: frozenset[str] = frozenset(),
               coerce: str = "", **config: object) -> tuple[Path, object]:
    return deidentify_file(tmp_path, write_dataset(ds, tmp_path / "src.dcm"), options, coerce,
                           **config)


def deidentify_file(tmp_path: Path, src: Path, options: frozenset[str] = frozenset(),
                    coerce: str = "", **config: object) -> tuple[Path, object]:
    out = tmp_path / "out.dcm"
    ep = FakeEndpoint(DeidentifyConfig(options, KEY, **config), coerce)  # type: ignore[arg-type]
    with ShapingSource.open(src, DEFAULT_LIMITS, tmp_path) as source:
        plan = plan_endpoint_copy(source, ep, "DICOMFLOW:research")  # type: ignore[arg-type]
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            plan.write(fd, provenance.shaped_mark("research"))
        finally:
            os.close(fd)
    return out, plan


def test_the_copy_carries_no_identity_in_any_byte_and_says_how_it_was_made(tmp_path):
    ds = identified()
    out, _ = deidentify(tmp_path, ds)
    data = out.read_bytes()
    for value in (NAME, "ZZDOE", "ZZJOHN", PID, BIRTH, "ACC-ZZ99", "ZZ GENERAL", "ZZREF", "ZZCT01",
                  "ZZMODALITY", "OLD-ZZ1", "ZZVENDOR", "20261128", ds.SOPInstanceUID,
                  ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID,
                  "1.2.826.0.1.3680043.8.498.111"):
        assert value.encode() not in data, value
    copy = pydicom.dcmread(out)
    assert copy.PatientIdentityRemoved == "YES"
    assert copy.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert copy.LongitudinalTemporalInformationModified == "REMOVED"
    assert "OriginalAttributesSequence" not in copy
    assert copy.PixelData == ds.PixelData
    assert copy.SOPClassUID == ds.SOPClassUID and well_known_uid(copy.SOPClassUID)
    assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
    assert copy.SOPInstanceUID.startswith("2.25.") and copy.PatientID.startswith("DF")
    assert copy.file_meta.get("SourceApplicationEntityTitle", "") in ("", None)
    assert not [e for e in copy.iterall() if e.tag.is_private]


def test_pseudonyms_are_stable_and_references_follow_the_uids_they_name(tmp_path):
    ds = identified()
    first = ds.SOPInstanceUID
    other = identified(StudyInstanceUID=ds.StudyInstanceUID)
    other.ReferencedImageSequence[0].ReferencedSOPInstanceUID = first
    a, _ = deidentify(tmp_path / "a", ds)
    b, _ = deidentify(tmp_path / "b", other)
    one, two = pydicom.dcmread(a), pydicom.dcmread(b)
    assert two.ReferencedImageSequence[0].ReferencedSOPInstanceUID == one.SOPInstanceUID
    assert one.StudyInstanceUID == two.StudyInstanceUID != ds.StudyInstanceUID
    assert one.PatientID == two.PatientID and one.PatientName == two.PatientName
    again, _ = deidentify(tmp_path / "c", ds)
    assert pydicom.dcmread(again).SOPInstanceUID == one.SOPInstanceUID


def test_options_keep_what_they_name(tmp_path):
    ds = identified(PatientSex="F", PatientAge="063Y")
    out, _ = deidentify(tmp_path, ds, frozenset({"retain_full_dates", "retain_institution_identity",
                                                 "retain_patient_characteristics",
                                                 "retain_device_identity"}))
    copy = pydicom.dcmread(out)
    assert copy.StudyDate == ds.StudyDate and copy.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert copy.InstitutionName == ds.InstitutionName and copy.PatientSex == "F"
    assert copy.StationName == "ZZCT01" and copy.file_meta.SourceApplicationEntityTitle == "ZZMODALITY"
    codes = {item.CodeValue for item in copy.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113106", "113112", "113108", "113109"}


def test_modified_dates_move_every_date_of_a_patient_by_one_offset(tmp_path):
    ds = identified(StudyDate="20240301", SeriesDate="20240302", AcquisitionDateTime="20240301101500",
                    StudyTime="101500")
    out, _ = deidentify(tmp_path, ds, frozenset({"retain_modified_dates"}))
    copy = pydicom.dcmread(out)
    import datetime as dt

    def day(text: str) -> dt.date:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    assert day(copy.SeriesDate) - day(copy.StudyDate) == dt.timedelta(days=1)
    assert copy.StudyDate != "20240301" and day(copy.StudyDate) < day("20240301")
    assert copy.AcquisitionDateTime.endswith("101500") and copy.StudyTime == "101500"
    assert copy.LongitudinalTemporalInformationModified == "MODIFIED"


def test_retain_uids_keeps_them_and_clean_descriptors_cleans_the_description(tmp_path):
    ds = identified()
    out, _ = deidentify(tmp_path, ds, frozenset({"retain_uids", "clean_descriptors"}))
    copy = pydicom.dcmread(out)
    assert copy.SOPInstanceUID == ds.SOPInstanceUID and copy.StudyInstanceUID == ds.StudyInstanceUID
    assert copy.StudyDescription.startswith("CT CHEST") and "ZZDOE" not in copy.StudyDescription


def test_retain_safe_private_keeps_only_the_named_elements(tmp_path):
    ds = identified()
    safe = (SafePrivate("ZZVENDOR", 0x0009, 0x02),)
    out, _ = deidentify(tmp_path, ds, frozenset({"retain_safe_private"}), safe_private=safe)
    copy = pydicom.dcmread(out)
    block = copy.private_block(0x0009, "ZZVENDOR")
    assert block[0x02].value == "1.5" and 0x01 not in block
    assert NAME.encode() not in out.read_bytes()


def test_coercion_applies_after_de_identification_and_sees_only_pseudonyms(tmp_path):
    ds = identified()
    out, plan = deidentify(tmp_path, ds, coerce="PatientComments = was {PatientID}")
    copy = pydicom.dcmread(out)
    assert copy.PatientComments == f"was {copy.PatientID}" and PID not in copy.PatientComments
    assert "OriginalAttributesSequence" not in copy


def test_burned_in_files_are_refused_unless_allowed(tmp_path):
    us = identified(SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1")
    with pytest.raises(ShapingError, match="Ultrasound"):
        deidentify(tmp_path, us)
    out, _ = deidentify(tmp_path, identified(SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1"),
                        allow_burned_in=True)
    assert pydicom.dcmread(out).PatientIdentityRemoved == "YES"


def test_the_records_show_pseudonyms_but_keep_originals_for_show_values(tmp_path):
    _, plan = deidentify(tmp_path, identified())
    records = {change.path: change for change in plan.changes.records}
    assert records["PatientID"].new.startswith("DF") and records["PatientID"].new_shown
    assert records["PatientID"].old == PID
    assert records["PatientBirthDate"].new is None  # emptied (Z) or removed (X)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "image_dfl.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"])
def test_every_transfer_syntax_is_de_identified_in_its_own_encoding(tmp_path, name):
    from pydicom.data import get_testdata_file

    original = pydicom.dcmread(get_testdata_file(name))
    out, _ = deidentify(tmp_path, original, allow_burned_in=True)  # two are secondary captures
    copy = pydicom.dcmread(out)
    assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert copy.PatientIdentityRemoved == "YES" and copy.SOPInstanceUID != original.SOPInstanceUID
    assert copy.PixelData == original.PixelData
    if str(original.get("PatientName", "")):
        assert str(copy.PatientName).startswith("ANON^")
    if name != "image_dfl.dcm":  # deflated: the bytes are compressed
        assert original.SOPInstanceUID.encode() not in out.read_bytes()


def identified_meta(ds: Dataset) -> Dataset:
    """``ds`` with identity in its preamble and in every kind of file meta element."""
    ds.preamble = b"ZZDOE^ZZJOHN".ljust(128, b"\0")
    meta = ds.file_meta
    meta.ImplementationVersionName = "ZZIMPL"
    meta.SourcePresentationAddress = "dicom://zzhost.example:104"
    meta.SendingPresentationAddress = "dicom://zzsend.example:104"
    meta.ReceivingPresentationAddress = "dicom://zzrecv.example:104"
    meta.RTVMetaInformationVersion = b"\0\1"
    meta.RTVCommunicationSOPClassUID = "1.2.826.0.1.3680043.8.498.777"
    meta.RTVCommunicationSOPInstanceUID = "1.2.826.0.1.3680043.8.498.778"
    meta.add_new(0x00020099, "LO", "ZZUNKNOWN")
    return ds


def test_the_preamble_and_unlisted_file_meta_elements_do_not_travel(tmp_path):
    ds = identified_meta(identified())
    out, _ = deidentify(tmp_path, ds)
    data = out.read_bytes()
    assert data[:128] == bytes(128)
    for value in ("ZZDOE", "ZZIMPL", "zzhost", "zzsend", "zzrecv", "ZZUNKNOWN",
                  "1.2.826.0.1.3680043.8.498.777", "1.2.826.0.1.3680043.8.498.778", "ZZMODALITY"):
        assert value.encode() not in data, value
    meta = pydicom.dcmread(out).file_meta
    assert {int(tag) for tag in meta.keys()} <= {
        0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013,
        0x00020016, 0x00020017, 0x00020018, provenance.PRIVATE_CREATOR_UID,
        provenance.PRIVATE_INFORMATION}
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID


def test_retain_device_identity_keeps_the_presentation_addresses_only(tmp_path):
    ds = identified_meta(identified())
    out, _ = deidentify(tmp_path, ds, frozenset({"retain_device_identity"}))
    meta = pydicom.dcmread(out).file_meta
    assert meta.SourcePresentationAddress == "dicom://zzhost.example:104"
    assert b"ZZUNKNOWN" not in out.read_bytes() and b"ZZIMPL" not in out.read_bytes()


def test_without_a_sop_instance_uid_the_media_storage_uid_is_a_pseudonym(tmp_path):
    ds = identified()
    original = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    out, _ = deidentify(tmp_path, ds)
    assert original.encode() not in out.read_bytes()
    uid = pydicom.dcmread(out).file_meta.MediaStorageSOPInstanceUID
    assert uid.startswith("2.25.")
    with_uid = identified()
    with_uid.file_meta.MediaStorageSOPInstanceUID = with_uid.SOPInstanceUID = original
    again, _ = deidentify(tmp_path / "b", with_uid)
    assert pydicom.dcmread(again).SOPInstanceUID == uid  # the same pseudonym


def test_unlisted_urls_unknown_and_command_elements_are_removed(tmp_path):
    ds = identified()
    url = f"https://zzpacs.example/wado?study={ds.StudyInstanceUID}"
    for keyword in ("RetrieveURL", "RetrieveURI", "StorageURL", "PixelDataProviderURL",
                    "StoredInstanceBaseURI", "ContactURI"):
        setattr(ds, keyword, url)
    ds.add_new(0x00200FF0, "LO", "ZZUNKNOWNPUBLIC")
    src = write_dataset(ds, tmp_path / "src.dcm")
    data = src.read_bytes()
    meta_end = 144 + struct.unpack_from("<L", data, 140)[0]
    command = struct.pack("<HH2sH", 0x0000, 0x0902, b"LO", 10) + b"ZZCOMMAND "
    src.write_bytes(data[:meta_end] + command + data[meta_end:])
    out, plan = deidentify_file(tmp_path, src)
    data = out.read_bytes()
    for value in ("zzpacs", ds.StudyInstanceUID, "ZZUNKNOWNPUBLIC", "ZZCOMMAND"):
        assert value.encode() not in data, value
    removed = {change.path for change in plan.changes.records if change.action == "removed"}
    assert {"RetrieveURL", "StorageURL", "ContactURI", "(0020,0FF0)"} <= removed


def test_burned_in_reads_the_meta_class_multiple_values_and_enhanced_us_volume(tmp_path):
    no_class = identified(SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1")
    no_class.file_meta.MediaStorageSOPClassUID = no_class.SOPClassUID
    del no_class.SOPClassUID  # the file meta still says ultrasound
    with pytest.raises(ShapingError, match="Ultrasound"):
        deidentify(tmp_path / "a", no_class)
    twice = identified(BurnedInAnnotation=["YES", "YES"])
    with pytest.raises(ShapingError, match="is YES"):
        deidentify(tmp_path / "b", twice)
    mixed = identified(SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1", BurnedInAnnotation=["NO", "YES"])
    with pytest.raises(ShapingError, match="is YES"):
        deidentify(tmp_path / "c", mixed)
    volume = identified(SOPClassUID="1.2.840.10008.5.1.4.1.1.6.2")
    with pytest.raises(ShapingError, match="Enhanced US Volume"):
        deidentify(tmp_path / "d", volume)
    said_no = identified(SOPClassUID="1.2.840.10008.5.1.4.1.1.6.2", BurnedInAnnotation="NO")
    out, _ = deidentify(tmp_path / "e", said_no)
    assert NAME.encode() not in out.read_bytes()


def with_element_bytes(src: Path, old: bytes, new: bytes) -> Path:
    """``src`` with the encoded element ``old`` replaced by the crafted ``new``."""
    data = src.read_bytes()
    assert data.count(old) == 1
    src.write_bytes(data.replace(old, new))
    return src


def binary_name_file(tmp_path: Path) -> Path:
    """A file whose Patient's Name is written as FL with 13 bytes (no whole FL value)."""
    src = write_dataset(identified(), tmp_path / "src.dcm")
    old = struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", len(NAME)) + NAME.encode()
    new = struct.pack("<HH2sH", 0x0010, 0x0010, b"FL", 13) + b"ZZDOE^ZZJOHNX"
    return with_element_bytes(src, old, new)


def test_an_undecodable_value_fails_naming_the_tag_and_the_error_type_only(tmp_path):
    src = binary_name_file(tmp_path)
    with pytest.raises(ShapingError) as caught:
        deidentify_file(tmp_path, src)
    assert "BytesLengthException" in str(caught.value) and "ZZDOE" not in str(caught.value)
    assert "PatientName" in str(caught.value) or "(0010,0010)" in str(caught.value)


def test_a_short_group_length_is_removed_or_refused_without_its_value(tmp_path):
    src = write_dataset(identified(), tmp_path / "src.dcm")
    data = src.read_bytes()
    meta_end = 144 + struct.unpack_from("<L", data, 140)[0]
    src.write_bytes(data[:meta_end] + struct.pack("<HH2sH", 0x0008, 0x0000, b"UL", 2) + b"ZZ"
                    + data[meta_end:])
    try:
        out, _ = deidentify_file(tmp_path, src)
    except ShapingError as exc:
        assert "ZZ" not in str(exc)
    else:
        assert NAME.encode() not in out.read_bytes()


def test_a_date_shifted_before_year_one_is_removed(tmp_path):
    ds = identified(StudyDate="00010101", SeriesDate="00010101")
    out, _ = deidentify(tmp_path, ds, frozenset({"retain_modified_dates"}))
    copy = pydicom.dcmread(out)
    assert not copy.get("SeriesDate") and b"00010101" not in out.read_bytes()


def test_an_undecodable_burned_in_annotation_is_refused_without_its_value(tmp_path):
    src = write_dataset(identified(BurnedInAnnotation="NO"), tmp_path / "src.dcm")
    old = struct.pack("<HH2sH", 0x0028, 0x0301, b"CS", 2) + b"NO"
    src = with_element_bytes(src, old, struct.pack("<HH2sH", 0x0028, 0x0301, b"FL", 2) + b"ZZ")
    with pytest.raises(ShapingError, match="BytesLengthException") as caught:
        deidentify_file(tmp_path, src)
    assert "ZZ" not in str(caught.value)


@pytest.mark.parametrize("charset", ["ISO_IR100", "ISO IR 100", "ISO_IR 192"])
def test_a_misspelt_character_set_is_read_and_written_as_pydicom_corrects_it(tmp_path, charset):
    ds = identified(SpecificCharacterSet=charset, SeriesDescription="CT THORAX ÄÖ")
    out, _ = deidentify(tmp_path, ds, frozenset({"clean_descriptors"}))
    copy = pydicom.dcmread(out)
    assert copy.PatientIdentityRemoved == "YES" and copy.SeriesDescription == "CT THORAX ÄÖ"
    assert NAME.encode() not in out.read_bytes()


def test_a_value_the_character_set_cannot_hold_is_still_refused(tmp_path):
    ds = identified(SpecificCharacterSet="ISO_IR 100")
    with pytest.raises(ShapingError, match="SeriesDescription") as caught:
        deidentify(tmp_path, ds, coerce="SeriesDescription = 日本")
    assert "日本" not in str(caught.value)


def test_a_private_element_after_the_pixel_data_is_left_out_of_the_copy(tmp_path):
    src = write_dataset(identified(), tmp_path / "src.dcm")
    trailing = struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 8) + b"ZZVENDOR"
    trailing += struct.pack("<HH2sH", 0x7FE1, 0x1001, b"LO", 12) + NAME.encode()
    src.write_bytes(src.read_bytes() + trailing)
    out, _ = deidentify_file(tmp_path, src)
    data = out.read_bytes()
    assert NAME.encode() not in data and b"ZZVENDOR" not in data
    assert pydicom.dcmread(out).PatientIdentityRemoved == "YES"


def test_a_coercion_reading_an_undecodable_value_fails_without_it(tmp_path):
    src = write_dataset(identified(), tmp_path / "src.dcm")
    old = struct.pack("<HH2sH", 0x0008, 0x0080, b"LO", 20) + b"ZZ GENERAL HOSPITAL "
    src = with_element_bytes(src, old, struct.pack("<HH2sH", 0x0008, 0x0080, b"FL", 19)
                             + b"ZZ GENERAL HOSPITAL")
    ep = FakeEndpoint(None, "StudyComments = {InstitutionName}")
    with ShapingSource.open(src, DEFAULT_LIMITS, tmp_path) as source, \
            pytest.raises(ShapingError, match="BytesLengthException") as caught:
        plan_endpoint_copy(source, ep, "DICOMFLOW:research")  # type: ignore[arg-type]
    assert "ZZ" not in str(caught.value)
