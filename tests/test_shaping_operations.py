"""Coercion operations: parsing (config errors name the line) and applying to real headers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.errors import ShapingError
from pipeline.shaping.operations import Changes, Operations, OperationSyntaxError, parse_operations
from tests.helpers import make_dataset

DEFER = 64 * 1024
PATIENT_ID = 0x00100020
OTHER_IDS = 0x00101002  # OtherPatientIDsSequence
REQUEST_ATTRIBUTES = 0x00400275


def read_header(path: Path | str) -> FileDataset:
    """The data set as the filter reads it: header only, large values deferred."""
    return dcmread(path, stop_before_pixels=True, defer_size=DEFER)


def ct_small() -> FileDataset:
    return read_header(str(get_testdata_file("CT_small.dcm")))


def written(ds: Dataset, tmp_path: Path, implicit: bool = False, name: str = "x.dcm") -> FileDataset:
    """``ds`` written as a Part-10 file and read back as the filter would."""
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return read_header(path)


def synthetic(**attrs: Any) -> Dataset:
    ds = make_dataset(**attrs)
    del ds.PixelData
    return ds


def item(**attrs: object) -> Dataset:
    out = Dataset()
    for key, value in attrs.items():
        setattr(out, key, value)
    return out


def apply(text: str, ds: Dataset) -> Changes:
    return parse_operations(text).apply(ds)


# --- parsing -----------------------------------------------------------------------------


def test_empty_text_gives_no_operations() -> None:
    assert not parse_operations("")
    assert not parse_operations("\n   \n\t\n")
    assert parse_operations("\n").lines == ()
    assert parse_operations("IssuerOfPatientID = SITEA")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("frobnicate PatientID", "unknown operation"),
        ("PatientID", "unknown operation"),
        ("PatientIdentity = x", "not a DICOM keyword"),
        ("delete PatientIdentity", "not a DICOM keyword"),
        ("OtherPatientIDsSequence = x", "is a sequence"),
        ("(0019,1010) = x", "private"),
        ("replace (0019,1010) /a/b/", "private"),
        ("(0028,0106) = 1", "ambiguous VR"),
        ("TransferSyntaxUID = 1.2.840.10008.1.2", "file meta"),
        ("delete (0002,0016)", "file meta"),
        ("SpecificCharacterSet = ISO_IR 100", "character set"),
        ("delete SpecificCharacterSet", "character set"),
        ("SOPClassUID = 1.2.3", "SOPClassUID"),
        ("delete PixelData", "Pixel Data"),
        ("delete (7FE1,0010)", "Pixel Data"),
        ("delete SOPInstanceUID", "SOPInstanceUID cannot be deleted"),
        ("PatientID[*].IssuerOfPatientID = x", "not a sequence"),
        ("OtherPatientIDsSequence[*] = x", "ends with an attribute"),
        ("OtherPatientIDsSequence.PatientID = x", "[*]"),
        ("OtherPatientIDsSequence[x].PatientID = x", "expected [*]"),
        ("(0009,1010)[*].PatientID = x", "private"),
        ("replace PatientID /(/x/", "bad regular expression"),
        ("replace PatientID /a/\\2/", "bad regular expression or replacement"),
        ("replace PatientID /a/\\q/", "bad regular expression or replacement"),
        ("replace PatientID /a/b", "exactly three"),
        ("replace PatientID /a/b/c", "exactly three"),
        ("replace PatientID //b/", "empty regular expression"),
        ("replace PatientID xaxbx", "delimiter"),
        ("replace PatientID", "expected replace"),
        ("if Modality~CT then delete PatientID", "bad condition"),
        ("if Modality=CT delete PatientID", "then"),
        ("if Modality=CT then frobnicate", "unknown operation"),
        ("= SITEA", "nothing before '='"),
        ("PatientID = {PatientID", "unbalanced"),
        ("PatientID = a}b", "unbalanced"),
        ("PatientID = {NotAKeyword}", "not a DICOM keyword"),
        ("PatientID = {}", "not a DICOM keyword"),
        ("PatientID = {Patient ID}", "not a DICOM keyword"),
        ("PatientID = {OtherPatientIDsSequence}", "no text value"),
        ("delete private except", "creator names"),
        ("delete private except A,,B", "creator names"),
        ("delete", "expected delete"),
        ("(0043,1028) = x", "private"),
        ("(0011,0010) = x", "private"),
        ("(0010,9999) = x", "not in the DICOM dictionary"),
        ("(001G,0010) = x", "not a (gggg,eeee) tag"),
        ("PixelData = x", "Pixel Data"),
    ],
)
def test_config_errors_name_the_line(line: str, fragment: str) -> None:
    text = f"\n  IssuerOfPatientID = SITEA\n\n  {line}\n"
    with pytest.raises(OperationSyntaxError) as caught:
        parse_operations(text)
    message = str(caught.value)
    assert message.startswith(f"line 2 '{line}': "), message
    assert fragment in message
    assert isinstance(caught.value, ValueError)


def test_every_operation_parses() -> None:
    operations = parse_operations(
        """
        PatientID = SITEA-{PatientID}
        (0010,0021) = SITEA
        StudyDescription =
        delete PatientBirthDate
        delete (0019,1010)
        delete private
        delete private except GEMS_IDEN_01 , SIEMENS CSA HEADER
        replace InstitutionName |a|b|
        replace RequestAttributesSequence[*].AccessionNumber !^0+!!
        if CallingAETitle=MOD.* then RequestAttributesSequence[0].ScheduledProcedureStepID = X
        OtherPatientIDsSequence[*].IssuerOfPatientID = {IssuerOfPatientID}
        SOPInstanceUID = 1.2.3.4
        """
    )
    assert len(operations.lines) == 12
    assert [op.line for op in operations.lines] == list(range(1, 13))


# --- set and templates -----------------------------------------------------------------


def test_set_from_template_keeps_the_raw_original() -> None:
    ds = ct_small()
    raw = ds.get_item(PATIENT_ID)
    assert isinstance(raw, RawDataElement)
    changes = apply("PatientID = SITEA-{PatientID}\nIssuerOfPatientID = SITEA", ds)
    assert ds.PatientID == "SITEA-1CT1"
    assert ds.IssuerOfPatientID == "SITEA"
    assert changes
    assert list(changes.originals) == [PATIENT_ID, 0x00100021]
    assert changes.originals[PATIENT_ID] is raw
    assert changes.originals[0x00100021] is None
    assert [(r.path, r.action, r.old, r.new) for r in changes.records] == [
        ("PatientID", "changed", "1CT1", "SITEA-1CT1"),
        ("IssuerOfPatientID", "added", None, "SITEA"),
    ]


def test_same_value_is_no_change() -> None:
    ds = ct_small()
    changes = apply("Modality = CT\nPatientID = {PatientID}", ds)
    assert not changes
    assert changes.records == []


def test_changed_back_is_still_listed() -> None:
    ds = ct_small()
    raw = ds.get_item(PATIENT_ID)
    changes = apply("PatientID = OTHER\nPatientID = 1CT1", ds)
    assert ds.PatientID == "1CT1"
    assert changes.originals == {PATIENT_ID: raw}
    assert [r.action for r in changes.records] == ["changed", "changed"]


def test_template_braces_and_several_values() -> None:
    ds = ct_small()
    apply("StudyDescription = {{x}} {Modality}}}\nImageType = DERIVED\\SECONDARY", ds)
    assert ds.StudyDescription == "{x} CT}"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]


def test_empty_template_sets_an_empty_value() -> None:
    ds = ct_small()
    changes = apply("PatientName =", ds)
    assert ds.PatientName == ""
    assert changes.records[0].new == ""


def test_missing_or_empty_placeholder_skips_the_operation(tmp_path: Path) -> None:
    ds = written(synthetic(IssuerOfPatientID=""), tmp_path)
    changes = apply("PatientID = A-{PatientComments}\nPatientID = B-{IssuerOfPatientID}", ds)
    assert ds.PatientID == "PID0001"
    assert not changes
    assert [(r.action, r.note) for r in changes.records] == [
        ("skipped", "PatientComments is missing"),
        ("skipped", "IssuerOfPatientID is empty"),
    ]


def test_multi_valued_placeholder_fails_the_file_without_values(tmp_path: Path) -> None:
    ds = written(synthetic(OtherPatientIDs=["SECRET1", "SECRET2"]), tmp_path)
    with pytest.raises(ShapingError) as caught:
        apply("IssuerOfPatientID = SITEA\nPatientID = {OtherPatientIDs}", ds)
    message = str(caught.value)
    assert "PatientID" in message and "2 values" in message and "line 2" in message
    assert "SECRET" not in message


def test_person_name_placeholder_is_its_original_string(tmp_path: Path) -> None:
    ds = written(synthetic(patient_name="Doe^John^^Dr"), tmp_path)
    apply("PatientComments = was {PatientName}", ds)
    assert ds.PatientComments == "was Doe^John^^Dr"


def test_value_too_long_for_its_vr(tmp_path: Path) -> None:
    ds = written(synthetic(), tmp_path)
    with pytest.raises(ShapingError) as caught:
        apply("PatientID = {PatientID}" + "X" * 63, ds)
    message = str(caught.value)
    assert message.startswith("PatientID: the new value is 70 characters, LO allows 64")
    assert "PID0001" not in message and "line 1" in message


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("Modality = ct!", "CS does not allow"),
        ("StudyDate = 2026-12-01", "DA does not allow"),
        ("SOPInstanceUID = 1.02.3", "UI does not allow"),
        ("PatientID = A\\B", "2 values, the attribute takes one"),
        ("Rows = many", "not an integer"),
        ("Rows = 70000", "out of the range of US"),
        ("SliceThickness = thick", "DS does not allow"),
        ("StationName = {PatientID}-AN-AE-TITLE-TOO-LONG", "characters, SH allows 16"),
    ],
)
def test_vr_violations(line: str, fragment: str, tmp_path: Path) -> None:
    ds = written(synthetic(), tmp_path)
    with pytest.raises(ShapingError) as caught:
        apply(line, ds)
    assert fragment in str(caught.value)
    assert "PID0001" not in str(caught.value)


def test_numbers_and_uids_are_written_typed(tmp_path: Path) -> None:
    ds = written(synthetic(), tmp_path)
    changes = apply("Rows = 0032\nSOPInstanceUID = 1.2.3.4\nSliceThickness = 2.50", ds)
    assert ds.Rows == 32 and isinstance(ds.Rows, int)
    assert ds.SOPInstanceUID == "1.2.3.4"
    assert str(ds.SliceThickness) == "2.50"
    assert 0x00080018 in changes.originals


# --- character sets --------------------------------------------------------------------


def test_latin1_values_stay_latin1(tmp_path: Path) -> None:
    ds = written(synthetic(SpecificCharacterSet="ISO_IR 100", InstitutionName="Clinique"), tmp_path)
    apply("InstitutionName = Hôpital {InstitutionName}", ds)
    assert ds.InstitutionName == "Hôpital Clinique"
    ds.save_as(tmp_path / "out.dcm")
    assert b"H\xf4pital Clinique" in (tmp_path / "out.dcm").read_bytes()


def test_value_outside_the_character_set_fails(tmp_path: Path) -> None:
    ds = written(synthetic(SpecificCharacterSet="ISO_IR 100"), tmp_path)
    with pytest.raises(ShapingError) as caught:
        apply("InstitutionName = 東京病院", ds)
    assert "ISO_IR 100" in str(caught.value) and "InstitutionName" in str(caught.value)


def test_default_repertoire_is_ascii_only(tmp_path: Path) -> None:
    ds = written(synthetic(), tmp_path)
    assert "SpecificCharacterSet" not in ds
    with pytest.raises(ShapingError, match="default character repertoire"):
        apply("InstitutionName = Hôpital", ds)


def test_utf8_takes_anything(tmp_path: Path) -> None:
    ds = written(synthetic(SpecificCharacterSet="ISO_IR 192"), tmp_path)
    apply("InstitutionName = 東京病院\nPatientName = 山田^太郎", ds)
    ds.save_as(tmp_path / "out.dcm")
    back = dcmread(tmp_path / "out.dcm")
    assert back.InstitutionName == "東京病院"
    assert str(back.PatientName) == "山田^太郎"


def test_items_inherit_the_character_set(tmp_path: Path) -> None:
    ds = synthetic(SpecificCharacterSet="ISO_IR 100")
    ds.OtherPatientIDsSequence = Sequence([item(PatientID="X1")])
    ds = written(ds, tmp_path)
    apply("OtherPatientIDsSequence[*].IssuerOfPatientID = Hôpital", ds)
    assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "Hôpital"
    with pytest.raises(ShapingError, match="ISO_IR 100"):
        apply("OtherPatientIDsSequence[*].IssuerOfPatientID = 病院", ds)


def charset_file(name: str) -> FileDataset:
    return read_header(get_charset_files(name)[0])


def test_real_iso_2022_file_takes_its_own_scripts_only(tmp_path: Path) -> None:
    ds = charset_file("chrH31.dcm")  # \ISO 2022 IR 87: ASCII and JIS X 0208 by escapes
    apply("PatientComments = was {PatientName}\nInstitutionName = 東京病院", ds)
    ds.save_as(tmp_path / "out.dcm")
    back = dcmread(tmp_path / "out.dcm")
    assert back.PatientComments == "was Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert back.InstitutionName == "東京病院"
    with pytest.raises(ShapingError, match="ISO 2022 IR 87 cannot hold"):
        apply("InstitutionName = Hôpital", ds)  # no Latin-1 behind the ASCII of ISO 2022 IR 6


@pytest.mark.parametrize(("name", "value"), [("chrFren.dcm", "Hôpital"), ("chrX1.dcm", "東京病院"),
                                             ("chrRuss.dcm", "Больница")])
def test_real_files_keep_their_character_set(name: str, value: str, tmp_path: Path) -> None:
    ds = charset_file(name)
    charset = ds.SpecificCharacterSet
    apply(f"InstitutionName = {value}", ds)
    ds.save_as(tmp_path / "out.dcm")
    back = dcmread(tmp_path / "out.dcm")
    assert back.SpecificCharacterSet == charset
    assert back.InstitutionName == value


@pytest.mark.filterwarnings("ignore:Unknown encoding")
def test_unknown_character_set_fails(tmp_path: Path) -> None:
    ds = written(synthetic(SpecificCharacterSet="ISO_IR 999"), tmp_path)
    with pytest.raises(ShapingError, match="ISO_IR 999 is not understood"):
        apply("InstitutionName = Clinic", ds)


# --- delete ------------------------------------------------------------------------------


def test_delete_keeps_the_raw_original_and_skips_absent() -> None:
    ds = ct_small()
    raw = ds.get_item(PATIENT_ID)
    changes = apply("delete PatientID\ndelete (0010,0020)\ndelete PatientComments", ds)
    assert PATIENT_ID not in ds
    assert changes.originals == {PATIENT_ID: raw}
    assert [(r.path, r.action, r.old, r.new) for r in changes.records] == [
        ("PatientID", "removed", "1CT1", None),
        ("PatientID", "skipped", None, None),
        ("PatientComments", "skipped", None, None),
    ]
    assert changes.records[2].note == "PatientComments is absent"


def test_deferred_value_is_not_read(tmp_path: Path) -> None:
    ds = synthetic()
    ds.add_new(0x00190010, "LO", "BIG VENDOR")
    ds.add_new(0x00191010, "OB", bytes(100 * 1024))
    ds = written(ds, tmp_path)
    big = ds.get_item(0x00191010, keep_deferred=True)
    assert isinstance(big, RawDataElement) and big.value is None
    apply("delete PatientID\nPatientName = X\nif Modality=CT then IssuerOfPatientID = Y", ds)
    after = ds.get_item(0x00191010, keep_deferred=True)
    assert after is big and after.value is None
    changes = apply("delete private", ds)
    assert changes.originals[0x00191010] is big and big.value is None
    removed = [r for r in changes.records if r.path == "(0019,1010)"]
    assert removed[0].old == "<OB, 102400 bytes, not read>"


def test_delete_inside_sequences_deep_copies_the_original(tmp_path: Path) -> None:
    ds = synthetic()
    ds.OtherPatientIDsSequence = Sequence([item(PatientID="A1", IssuerOfPatientID="I1"),
                                           item(PatientID="A2")])
    ds = written(ds, tmp_path)
    changes = apply("delete OtherPatientIDsSequence[*].IssuerOfPatientID", ds)
    assert "IssuerOfPatientID" not in ds.OtherPatientIDsSequence[0]
    original = changes.originals[OTHER_IDS]
    assert isinstance(original, DataElement)
    assert original is not ds[OTHER_IDS]
    assert original.value[0].IssuerOfPatientID == "I1"
    assert [(r.path, r.action) for r in changes.records] == [
        ("OtherPatientIDsSequence[0].IssuerOfPatientID", "removed"),
        ("OtherPatientIDsSequence[1].IssuerOfPatientID", "skipped"),
    ]


# --- delete private ----------------------------------------------------------------------


def private_dataset() -> Dataset:
    """Private blocks: kept, dropped, duplicated creator, orphans, never-private groups, nested."""
    ds = synthetic()
    ds.add_new(0x00090010, "LO", "KEEP ME ")
    ds.add_new(0x00091001, "LO", "kept value")
    ds.add_new(0x00090001, "LO", "no creator")  # below the creator range: malformed
    ds.add_new(0x00110010, "LO", "DROP")
    ds.add_new(0x00111001, "LO", "dropped value")
    ds.add_new(0x00130010, "LO", "KEEP ME")  # the same creator twice in one group
    ds.add_new(0x00130011, "LO", "KEEP ME")
    ds.add_new(0x00131001, "LO", "dup 1")
    ds.add_new(0x00131101, "LO", "dup 2")
    ds.add_new(0x00151001, "LO", "orphan")  # an element without its creator
    ds.add_new(0x00030010, "LO", "KEEP ME")  # group 0003 is never private
    ds.add_new(0x00031001, "LO", "never private")
    ds.add_new(0xFFFF0010, "LO", "KEEP ME")  # group FFFF is never private
    ds.add_new(0xFFFF1001, "LO", "never private")
    inner = item(PatientID="INNER")
    inner.add_new(0x00290010, "LO", "DROP")
    inner.add_new(0x00291001, "LO", "inner dropped")
    outer = item(PatientID="OUTER")
    outer.add_new(0x00090010, "LO", "KEEP ME")
    outer.add_new(0x00091001, "LO", "outer kept")
    outer.add_new(0x00190010, "LO", "DROP")
    outer.add_new(0x00191001, "LO", "outer dropped")
    outer.OtherPatientIDsSequence = Sequence([inner])
    ds.OtherPatientIDsSequence = Sequence([outer, item(PatientID="CLEAN")])
    ds.ReferencedStudySequence = Sequence([item(ReferencedSOPInstanceUID="1.2.3")])
    return ds


def odd_tags(dataset: Dataset) -> set[int]:
    return {int(tag) for tag in dataset.keys() if (tag >> 16) % 2}


@pytest.mark.parametrize("implicit", [False, True])
def test_delete_private_keeps_named_creators(implicit: bool, tmp_path: Path) -> None:
    ds = written(private_dataset(), tmp_path, implicit=implicit)
    assert len(odd_tags(ds)) == 14
    changes = apply("delete private except KEEP ME, OTHER", ds)
    assert odd_tags(ds) == {0x00090010, 0x00091001}
    outer = ds.OtherPatientIDsSequence[0]
    assert odd_tags(outer) == {0x00090010, 0x00091001}
    assert odd_tags(outer.OtherPatientIDsSequence[0]) == set()
    assert outer.OtherPatientIDsSequence[0].PatientID == "INNER"
    # Every top-level private element removed has its raw original; the sequence a copy.
    removed_top = {0x00090001, 0x00110010, 0x00111001, 0x00130010, 0x00130011, 0x00131001,
                   0x00131101, 0x00151001, 0x00030010, 0x00031001, 0xFFFF0010, 0xFFFF1001}
    assert set(changes.originals) == removed_top | {OTHER_IDS}
    assert all(isinstance(changes.originals[tag], RawDataElement) for tag in removed_top)
    seq_original = changes.originals[OTHER_IDS]
    assert isinstance(seq_original, DataElement)
    assert 0x00191001 in seq_original.value[0]
    assert 0x00291001 in seq_original.value[0].OtherPatientIDsSequence[0]
    assert 0x00080080 not in changes.originals  # untouched sequences are not listed
    paths = {r.path for r in changes.records}
    assert "OtherPatientIDsSequence[0].(0019,1001)" in paths
    assert "OtherPatientIDsSequence[0].OtherPatientIDsSequence[0].(0029,0010)" in paths
    assert {r.action for r in changes.records} == {"removed"}
    assert REQUEST_ATTRIBUTES not in changes.originals
    assert 0x00081110 not in changes.originals  # ReferencedStudySequence: nothing private


def test_delete_private_removes_everything_without_except(tmp_path: Path) -> None:
    ds = written(private_dataset(), tmp_path)
    apply("delete private", ds)
    assert odd_tags(ds) == set()
    assert odd_tags(ds.OtherPatientIDsSequence[0]) == set()


def test_delete_private_on_a_real_file_never_reads_public_values() -> None:
    ds = ct_small()
    changes = apply("delete private except GEMS_IDEN_01", ds)
    assert odd_tags(ds) == {0x00090010, 0x00091001, 0x00091002, 0x00091004, 0x00091027,
                            0x00091030, 0x00091031, 0x000910E6, 0x000910E7, 0x000910E9}
    assert isinstance(ds.get_item(PATIENT_ID), RawDataElement)
    assert all(tag >> 16 in (0x11, 0x19, 0x21, 0x23, 0x25, 0x27, 0x29, 0x43)
               for tag in changes.originals)


# --- replace -------------------------------------------------------------------------------


def test_replace_with_groups_and_every_match() -> None:
    ds = ct_small()
    changes = apply(r"replace PatientID |^(\d)CT(\d)$|P\2-\1|" "\n"
                    r"replace InstitutionName /(\w+)/<\1>/", ds)
    assert ds.PatientID == "P1-1"
    assert ds.InstitutionName == "<JFK> <IMAGING> <CENTER>"
    assert len(changes.originals) == 2


def test_replace_on_each_value_absent_and_unmatched(tmp_path: Path) -> None:
    ds = written(synthetic(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]), tmp_path)
    changes = apply("replace ImageType /^(ORIGINAL|PRIMARY)$/DERIVED/\n"
                    "replace PatientComments /a/b/\nreplace Modality /MR/CT/", ds)
    assert list(ds.ImageType) == ["DERIVED", "DERIVED", "AXIAL"]
    assert [r.action for r in changes.records] == ["changed", "skipped"]


def test_replace_result_checked_against_vr(tmp_path: Path) -> None:
    ds = written(synthetic(), tmp_path)
    with pytest.raises(ShapingError, match="LO allows 64"):
        apply("replace PatientID /$/" + "0" * 60 + "/", ds)


# --- conditions ------------------------------------------------------------------------------


def test_condition_decides_and_sees_earlier_lines(tmp_path: Path) -> None:
    ds = synthetic(modality="CT")
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY1"
    ds = written(ds, tmp_path)
    changes = apply(
        "if Modality=MR then PatientID = MR-{PatientID}\n"
        "if CallingAETitle=MODALITY\\d then IssuerOfPatientID = SITEA\n"
        "Modality = MR\n"
        "if Modality=MR then StudyDescription = now MR\n"
        "if PatientComments!=.+ then PatientComments = none",
        ds,
    )
    assert ds.PatientID == "PID0001"
    assert ds.IssuerOfPatientID == "SITEA"
    assert ds.StudyDescription == "now MR"
    assert ds.PatientComments == "none"
    assert [r.path for r in changes.records] == [
        "IssuerOfPatientID", "Modality", "StudyDescription", "PatientComments"]


# --- sequence paths -------------------------------------------------------------------------


def sequenced(tmp_path: Path) -> FileDataset:
    ds = synthetic(IssuerOfPatientID="TOP")
    ds.RequestAttributesSequence = Sequence([
        item(AccessionNumber="ACC1", RequestedProcedureID="RP1"),
        item(AccessionNumber="ACC2",
             ReferencedStudySequence=Sequence([item(ReferencedSOPInstanceUID="1.2.3"),
                                               item(ReferencedSOPInstanceUID="1.2.4")])),
    ])
    ds.OtherPatientIDsSequence = Sequence([item(PatientID="O1", IssuerOfPatientID="OWN"),
                                           item(PatientID="O2")])
    ds.ReferencedSeriesSequence = Sequence([])
    return written(ds, tmp_path)


def test_sequence_path_every_item_and_one_item(tmp_path: Path) -> None:
    ds = sequenced(tmp_path)
    before = copy.deepcopy(ds[REQUEST_ATTRIBUTES])
    changes = apply("RequestAttributesSequence[*].AccessionNumber = SITEA-{AccessionNumber}\n"
                    "RequestAttributesSequence[1].RequestedProcedureID = RP-NEW", ds)
    items = ds.RequestAttributesSequence
    assert [i.AccessionNumber for i in items] == ["SITEA-ACC1", "SITEA-ACC2"]
    assert items[0].RequestedProcedureID == "RP1"
    assert items[1].RequestedProcedureID == "RP-NEW"
    assert list(changes.originals) == [REQUEST_ATTRIBUTES]
    original = changes.originals[REQUEST_ATTRIBUTES]
    assert isinstance(original, DataElement)
    assert [i.AccessionNumber for i in original.value] == ["ACC1", "ACC2"]
    assert "RequestedProcedureID" not in original.value[1]
    assert original.value == before.value
    assert [(r.path, r.action) for r in changes.records] == [
        ("RequestAttributesSequence[0].AccessionNumber", "changed"),
        ("RequestAttributesSequence[1].AccessionNumber", "changed"),
        ("RequestAttributesSequence[1].RequestedProcedureID", "added"),
    ]


def test_nested_path_and_placeholder_fallback(tmp_path: Path) -> None:
    ds = sequenced(tmp_path)
    changes = apply(
        "RequestAttributesSequence[*].ReferencedStudySequence[*].ReferencedSOPInstanceUID = "
        "{ReferencedSOPInstanceUID}.9\n"
        "OtherPatientIDsSequence[*].IssuerOfPatientID = X-{IssuerOfPatientID}",
        ds,
    )
    nested = ds.RequestAttributesSequence[1].ReferencedStudySequence
    assert [i.ReferencedSOPInstanceUID for i in nested] == ["1.2.3.9", "1.2.4.9"]
    others = ds.OtherPatientIDsSequence
    assert [i.IssuerOfPatientID for i in others] == ["X-OWN", "X-TOP"]  # own item first, then top
    assert "RequestAttributesSequence[1].ReferencedStudySequence[0].ReferencedSOPInstanceUID" in {
        r.path for r in changes.records}
    skipped = [r for r in changes.records if r.action == "skipped"]
    assert [r.note for r in skipped] == ["RequestAttributesSequence[0].ReferencedStudySequence is absent"]


@pytest.mark.parametrize(
    ("line", "note"),
    [
        ("ReferencedPatientSequence[*].ReferencedSOPInstanceUID = 1.2",
         "ReferencedPatientSequence is absent"),
        ("ReferencedSeriesSequence[*].SeriesInstanceUID = 1.2", "ReferencedSeriesSequence is empty"),
        ("OtherPatientIDsSequence[2].PatientID = X", "OtherPatientIDsSequence has no item 2"),
        ("delete OtherPatientIDsSequence[5].PatientID", "OtherPatientIDsSequence has no item 5"),
    ],
)
def test_missing_sequence_or_item_is_skipped(line: str, note: str, tmp_path: Path) -> None:
    ds = sequenced(tmp_path)
    changes = apply(line, ds)
    assert not changes
    assert [(r.action, r.note) for r in changes.records] == [("skipped", note)]


def test_operations_object_is_reusable_across_files(tmp_path: Path) -> None:
    operations: Operations = parse_operations("PatientID = SITEA-{PatientID}")
    first = written(synthetic(patient_id="P1"), tmp_path, name="a.dcm")
    second = written(synthetic(patient_id="P2"), tmp_path, name="b.dcm")
    operations.apply(first)
    changes = operations.apply(second)
    assert (first.PatientID, second.PatientID) == ("SITEA-P1", "SITEA-P2")
    assert len(changes.records) == 1



def test_delete_a_whole_sequence_and_a_private_tag_keeps_raw_originals(tmp_path: Path) -> None:
    ds = sequenced(tmp_path)
    ds.add_new(0x00190010, "LO", "VENDOR")
    ds.add_new(0x00191010, "LO", "value")
    ds = written(ds, tmp_path, name="seq.dcm")
    raw_sequence = ds.get_item(REQUEST_ATTRIBUTES)
    raw_private = ds.get_item(0x00191010)
    changes = apply("delete RequestAttributesSequence\ndelete (0019,1010)", ds)
    assert REQUEST_ATTRIBUTES not in ds and 0x00191010 not in ds and 0x00190010 in ds
    assert changes.originals == {REQUEST_ATTRIBUTES: raw_sequence, 0x00191010: raw_private}
    assert isinstance(raw_sequence, RawDataElement)
    assert [r.path for r in changes.records] == ["RequestAttributesSequence", "(0019,1010)"]


def test_nested_condition_and_errors_inside_items_name_the_item(tmp_path: Path) -> None:
    ds = sequenced(tmp_path)
    apply("if Modality=CT then if PatientID=PID.* then PatientComments = both", ds)
    assert ds.PatientComments == "both"
    with pytest.raises(ShapingError) as caught:
        apply("\nPatientComments = x\n\nRequestAttributesSequence[*].AccessionNumber = "
              "{AccessionNumber}-MUCH-TOO-LONG", ds)
    assert str(caught.value) == ("RequestAttributesSequence[0].AccessionNumber: the new value is "
                                 "18 characters, SH allows 16 (operations line 2)")
