"""The filter's header scan (pipeline.header_scan) against pydicom's full read.

Every file of the interop corpus, every pydicom test and character-set file, generated
files (non-ASCII character sets, private tags, tags after sequences, both VR encodings)
and the hostile corpus are read both ways: the quarantine verdicts are the same, and
where a file is read, the Header fields, each rule attribute's values and the routing
decisions are the same. Separate tests show that the short cut is taken in the common
case and that each fallback is taken when it must be.
"""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from pipeline import header_scan
from pipeline.errors import QuarantineError
from pipeline.header import Header, open_regular, read_header_fd
from pipeline.rules import RuleSet, attribute_values, decide, parse_conditions, parse_sop_list
from tests import corpus, interop_corpus
from tests.helpers import make_dataset, write_dataset

#: (keyword or tag, as a rule names it) the scan must answer exactly as pydicom does
ATTRIBUTES = ["Modality", "StationName", "PatientName", "InstitutionName", "BodyPartExamined",
              "SeriesDescription", "PatientID", "StudyDescription", "(0009,1001)", "(0011,1010)",
              "(0019,1002)", "(0029,1010)", "PatientSex", "ImageType", "InstanceNumber",
              "SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet", "CallingAETitle",
              "CalledAETitle", "(0002,0010)", "AccessionNumber", "OtherPatientIDsSequence",
              "Manufacturer", "ReferringPhysicianName"]
CONDITIONS = "\n".join(f"{name}!=(?!x)x.*" if i % 2 else f"{name}=.*" for i, name in enumerate(ATTRIBUTES))
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixel data needed
UNDEFINED = 0xFFFFFFFF
CHARSET_FOLDER = Path(get_testdata_file("CT_small.dcm")).parent.parent / "charset_files"


def _conditions():
    return parse_conditions(CONDITIONS)


def _rules() -> tuple[RuleSet, dict[str, RuleSet]]:
    """Global rules and a few endpoints over the attributes (the decision is compared too)."""
    conditions = _conditions()
    global_rules = RuleSet(sop_blacklist=parse_sop_list("EncapsulatedPDFStorage"))
    endpoints = {f"ep{i}": RuleSet(conditions=(c,)) for i, c in enumerate(conditions)}
    endpoints["ct"] = RuleSet(sop_whitelist=parse_sop_list("CTImageStorage"),
                              conditions=parse_conditions("Modality=CT|MR"))
    endpoints["latin"] = RuleSet(conditions=parse_conditions("PatientName=.*[äöüéÆ].*"))
    return global_rules, endpoints


def _wanted() -> header_scan.Wanted:
    global_rules, endpoints = _rules()
    wanted = header_scan.wanted_for([global_rules, *endpoints.values()])
    assert wanted is not None
    return wanted


@contextmanager
def _switch(on: bool):
    """The ``scan`` switch for the calls inside (off: today's element walk and full read)."""
    saved = os.environ.get("DICOMFLOW_PATCHES_OFF")
    os.environ["DICOMFLOW_PATCHES_OFF"] = "" if on else "scan"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DICOMFLOW_PATCHES_OFF"]
        else:
            os.environ["DICOMFLOW_PATCHES_OFF"] = saved


def _read(path: Path, wanted: header_scan.Wanted | None) -> Header | str:
    """The Header, or the quarantine reason; without ``wanted``, the reader as it was
    before the scan (switch off)."""
    with _switch(wanted is not None):
        return _read_now(path, wanted)


def _read_now(path: Path, wanted: header_scan.Wanted | None) -> Header | str:
    try:
        fd, st = open_regular(path)
    except QuarantineError as exc:
        return f"quarantine: {exc}"
    try:
        return read_header_fd(fd, st.st_size, wanted=wanted)
    except QuarantineError as exc:
        return f"quarantine: {exc}"
    finally:
        os.close(fd)


def _scanned(head: Header | str, wanted: header_scan.Wanted) -> bool:
    return isinstance(head, Header) and set(head.dataset.keys()) <= wanted.tags


def assert_same(path: Path, wanted: header_scan.Wanted, conditions: str | None = None) -> bool:
    """Both reads agree on ``path`` (for ``conditions``, by default every rule of
    :func:`_rules`); returns whether the scan served it."""
    full, scanned = _read(path, None), _read(path, wanted)
    if isinstance(full, str) or isinstance(scanned, str):
        assert scanned == full, path.name
        return False
    assert (scanned.sop_instance_uid, scanned.sop_class_uid, scanned.transfer_syntax, scanned.size) == (
        full.sop_instance_uid, full.sop_class_uid, full.transfer_syntax, full.size), path.name
    if conditions is not None:
        global_rules, endpoints = RuleSet(), {"ep": RuleSet(conditions=parse_conditions(conditions))}
    else:
        global_rules, endpoints = _rules()
    for condition in [c for rules in endpoints.values() for c in rules.conditions]:
        expected = attribute_values(full.dataset, condition.keyword, condition.tag)
        got = attribute_values(scanned.dataset, condition.keyword, condition.tag)
        assert got == expected, (path.name, condition.source)
    assert decide(global_rules, endpoints, scanned.dataset) == decide(global_rules, endpoints, full.dataset)
    return _scanned(scanned, wanted)


# -- equality ------------------------------------------------------------------------


def test_the_interop_corpus_reads_the_same(tmp_path_factory):
    wanted = _wanted()
    files = interop_corpus.session_corpus(tmp_path_factory)
    served = [path.name for path in files if assert_same(path, wanted)]
    assert "CT_small.dcm" in served and "big_multiframe.dcm" in served  # the short cut is used


def test_every_pydicom_test_and_charset_file_reads_the_same(tmp_path):
    wanted = _wanted()
    folder = Path(get_testdata_file("CT_small.dcm")).parent
    files = sorted(folder.glob("*.dcm")) + sorted(CHARSET_FOLDER.glob("*.dcm"))
    assert len(files) > 80
    served = [path.name for path in files if assert_same(path, wanted)]
    assert {"MR_small_implicit.dcm", "chrH31.dcm", "chrX1.dcm"} <= set(served)


def test_the_hostile_corpus_gets_the_same_verdicts(tmp_path):
    wanted = _wanted()
    cases = corpus.build(tmp_path / "corpus")
    for case in cases:
        verdict = _read(tmp_path / "corpus" / case.name, wanted)
        assert verdict == _read(tmp_path / "corpus" / case.name, None), case.name
        assert isinstance(verdict, str) and case.expect in verdict, case.name


NAMES = {  # (SpecificCharacterSet, PatientName, InstitutionName)
    "utf8": ("ISO_IR 192", "Müller^Jürgen", "Hôpital Saint-Éloi"),
    "latin1": ("ISO_IR 100", "Æsir^Björk", "Sjúkrahús"),
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "病院"),
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞", "병원"),
    "greek": ("ISO_IR 126", "Διονυσιος", "Νοσοκομείο"),
    "none": (None, "PLAIN^NAME", "GENERAL HOSPITAL"),
}


def _generated(tmp_path: Path, charset, name: str, institution: str, implicit: bool,
               undefined_sequence: bool = False) -> Path:
    ds = make_dataset(modality="MR", StationName="STATION_1", BodyPartExamined="HEAD",
                      SeriesDescription="t1 sag", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName, ds.InstitutionName = name, institution
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
    ds.ReferencedStudySequence = Sequence([item])  # (0008,1110): before the tags below
    ds["ReferencedStudySequence"].is_undefined_length = undefined_sequence
    ds.private_block(0x0019, "DICOMFLOW TEST", create=True).add_new(0x02, "LO", "private value")
    ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", b"\x01\x02")
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    label = "implicit" if implicit else "explicit"
    return write_dataset(ds, tmp_path / f"{name[:4]}-{label}-{undefined_sequence}.dcm")


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("case", sorted(NAMES))
def test_generated_files_read_the_same(tmp_path, case, implicit):
    charset, name, institution = NAMES[case]
    wanted = _wanted()
    path = _generated(tmp_path, charset, name, institution, implicit)
    assert assert_same(path, wanted)  # the short cut took it: defined-length sequence
    head = _read(path, wanted)
    assert isinstance(head, Header)
    assert attribute_values(head.dataset, "PatientName", 0x00100010) == [name]
    assert attribute_values(head.dataset, "(0019,1002)", 0x00191002) == ["private value"]
    assert attribute_values(head.dataset, "BodyPartExamined", 0x00180015) == ["HEAD"]
    undefined = _generated(tmp_path, charset, name, institution, implicit, undefined_sequence=True)
    assert not assert_same(undefined, wanted)  # pydicom's read: an undefined-length sequence first


# -- the short cut and its fallbacks -------------------------------------------------


def test_only_the_wanted_elements_are_built(tmp_path):
    wanted = header_scan.wanted_for([RuleSet(conditions=parse_conditions("Modality=CT"))])
    assert wanted is not None and wanted.tags == header_scan.FILTER_TAGS | {0x00080060}
    path = write_dataset(make_dataset(SpecificCharacterSet="ISO_IR 100"), tmp_path / "a.dcm")
    head = _read(path, wanted)
    assert isinstance(head, Header)
    assert set(head.dataset.keys()) == {0x00080005, 0x00080016, 0x00080018, 0x00080060}
    assert head.dataset.file_meta.TransferSyntaxUID == head.transfer_syntax
    assert "PixelData" not in head.dataset


def test_a_private_tag_brings_its_creator():
    wanted = header_scan.wanted_for([RuleSet(conditions=parse_conditions("(0029,1010)=x"))])
    assert wanted is not None and {0x00291010, 0x00290010} <= wanted.tags
    # file-meta attributes are not data-set tags
    meta = header_scan.wanted_for([RuleSet(conditions=parse_conditions("CallingAETitle=A\n(0002,0016)=B"))])
    assert meta is not None and meta.tags == header_scan.FILTER_TAGS


def test_a_private_tag_below_block_10_brings_its_creator_as_in_pydicom(tmp_path):
    """pydicom looks the creator of (gggg,0100)-(gggg,0FFF) up too: (0019,0510) is an
    ADAC_IMG element whose VR comes from (0019,0005)."""
    wanted = header_scan.wanted_for([RuleSet(conditions=parse_conditions("(0019,0510)=A"))])
    assert wanted is not None and {0x00190510, 0x00190005} <= wanted.tags
    for tag in (0x00190005, 0x00190000, 0x00080060):  # a creator, a group length, public
        assert header_scan.wanted_for([RuleSet(conditions=parse_conditions(
            f"({tag >> 16:04X},{tag & 0xFFFF:04X})=A"))]).tags == header_scan.FILTER_TAGS | {tag}
    meta = make_dataset(sop_class=SR_CLASS, modality="SR")
    empty = Dataset()
    empty.file_meta = meta.file_meta
    head = write_dataset(empty, tmp_path / "low.dcm").read_bytes()

    def explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"UN"):
            return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, element, vr, len(value)) + value

    uid = str(meta.SOPInstanceUID)
    body = (explicit(0x0008, 0x0016, b"UI", SR_CLASS.encode() + b"\0" * (len(SR_CLASS) % 2))
            + explicit(0x0008, 0x0018, b"UI", uid.encode() + b"\0" * (len(uid) % 2))
            + explicit(0x0019, 0x0005, b"LO", b"ADAC_IMG") + explicit(0x0019, 0x0510, b"UN", b"A\\B "))
    path = tmp_path / "low.dcm"
    path.write_bytes(head + body)
    assert assert_same(path, wanted, "(0019,0510)=A")
    scanned = _read(path, wanted)
    assert isinstance(scanned, Header)
    assert attribute_values(scanned.dataset, "(0019,0510)", 0x00190510) == ["A", "B"]


def test_a_rule_on_an_ambiguous_vr_means_the_full_read():
    """pydicom settles US-or-SS from PixelRepresentation: such a rule is not scanned."""
    assert header_scan.wanted_for([RuleSet(conditions=parse_conditions("SmallestImagePixelValue=0"))]) is None
    assert header_scan.wanted_for([RuleSet(conditions=parse_conditions("Rows=512"))]) is not None


def test_the_switch():
    rules = [RuleSet()]
    assert header_scan.plan(rules, {}) is not None
    assert header_scan.plan(rules, {"DICOMFLOW_FASTPATH": "0"}) is None
    assert header_scan.plan(rules, {"DICOMFLOW_PATCHES_OFF": "reactors, scan"}) is None
    assert header_scan.plan(rules, {"DICOMFLOW_PATCHES_OFF": "reactors"}) is not None


def _recorder_after_walk(path: Path, wanted: header_scan.Wanted) -> header_scan.Recorder | None:
    """What the header reader's walk recorded for ``path`` (None: no recorder at all)."""
    from pipeline.header import _check_meta, _read_meta, check_complete

    with path.open("rb") as fp:
        size = path.stat().st_size
        meta = _read_meta(fp, size, corpus_limits())
        start = fp.tell()
        syntax, sop_class = _check_meta(meta)
        recorder = header_scan.recorder_for(wanted, syntax)
        if recorder is not None:
            check_complete(fp, size, syntax, sop_class, recorder=recorder, dataset_start=start)
    return recorder


def corpus_limits():
    from pipeline.header import DEFAULT_LIMITS

    return DEFAULT_LIMITS


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, "1.2.840.10008.1.2.1.99"],
                         ids=["big-endian", "deflated"])
def test_big_endian_and_deflated_take_pydicom(syntax):
    assert header_scan.recorder_for(_wanted(), syntax) is None


def test_real_big_endian_and_deflated_files_take_pydicom():
    wanted = _wanted()
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):
        head = _read(Path(get_testdata_file(name)), wanted)
        assert isinstance(head, Header) and not _scanned(head, wanted), name


def test_an_undefined_length_element_before_a_wanted_tag_blocks(tmp_path):
    wanted = _wanted()
    path = _generated(tmp_path, None, "A^B", "X", implicit=False, undefined_sequence=True)
    recorder = _recorder_after_walk(path, wanted)
    assert recorder is not None and recorder.blocked is not None and "undefined-length" in recorder.blocked
    defined = _generated(tmp_path, None, "A^B", "X", implicit=False)
    recorder = _recorder_after_walk(defined, wanted)
    assert recorder is not None and recorder.blocked is None


def test_an_undefined_length_sequence_after_the_wanted_tags_takes_pydicom(tmp_path):
    """Even after the last wanted tag: pydicom parses its items its own way."""
    wanted = header_scan.wanted_for([RuleSet(conditions=parse_conditions("Modality=CT"))])
    assert wanted is not None
    ds = make_dataset(StationName="LATE")
    item = Dataset()
    item.CodeValue = "1"
    ds.ProcedureCodeSequence = Sequence([item])  # (0008,1032), after (0008,0060)
    ds["ProcedureCodeSequence"].is_undefined_length = True
    path = write_dataset(ds, tmp_path / "late-sq.dcm")
    assert not assert_same(path, wanted, "Modality=CT")
    assert not assert_same(path, _wanted())
    recorder = _recorder_after_walk(path, wanted)
    assert recorder is not None and recorder.blocked is not None and "undefined-length" in recorder.blocked


def _implicit_element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def _smuggling_file(path: Path, forged: bytes) -> Path:
    """An implicit VR SR file whose wanted tags all come first, then an undefined-length
    OB element (0042,0011) whose item holds a fake sequence delimiter and ``forged``
    elements: pydicom reads them as top-level elements (and keeps the last copy of a
    tag), the walk sees fragment bytes (the reviewer's smuggle_implicit3.dcm)."""
    meta = make_dataset(sop_class=SR_CLASS, modality="SR")
    meta.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    empty = Dataset()
    empty.file_meta = meta.file_meta
    head = write_dataset(empty, path).read_bytes()  # preamble and file meta only

    def uid(text: str) -> bytes:
        return text.encode() + b"\0" * (len(text) % 2)

    body = (_implicit_element(0x0008, 0x0016, uid(SR_CLASS))
            + _implicit_element(0x0008, 0x0018, uid(str(meta.SOPInstanceUID)))
            + _implicit_element(0x0008, 0x0060, b"SR") + _implicit_element(0x0010, 0x0020, b"REAL"))
    fake = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + forged
    body += struct.pack("<HHL", 0x0042, 0x0011, UNDEFINED)
    body += struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + _implicit_element(0x0008, 0x0100, fake)
    body += struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    path.write_bytes(head + body)
    return path


@pytest.mark.parametrize("forged", ["PatientID", "SOPInstanceUID"])
def test_a_value_smuggled_after_the_wanted_tags_is_read_as_pydicom_reads_it(tmp_path, forged):
    """The old reader and the new one agree on a forged file (the review's blocker): a
    forged PatientID changes the decision, a forged SOP Instance UID quarantines it."""
    element = (_implicit_element(0x0010, 0x0020, b"EVIL") if forged == "PatientID"
               else _implicit_element(0x0008, 0x0018, b"1.2.3.4\0"))
    path = _smuggling_file(tmp_path / f"smuggle-{forged}.dcm", element)
    wanted = header_scan.wanted_for([RuleSet(conditions=parse_conditions("PatientID=REAL"))])
    assert wanted is not None
    full = _read(path, None)
    if forged == "PatientID":
        assert isinstance(full, Header) and full.dataset.PatientID == "EVIL"  # the forgery works on pydicom
    else:
        assert isinstance(full, str) and "does not match" in full
    assert not assert_same(path, wanted, "PatientID=REAL")


def test_a_data_set_contradicting_its_syntax_takes_pydicom(tmp_path):
    """Implicit VR bytes under an Explicit VR transfer syntax: pydicom's sniff decides."""
    ds = make_dataset(modality="CT")
    path = write_dataset(ds, tmp_path / "implicit.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = write_dataset(ds, tmp_path / "implicit2.dcm")
    raw_explicit, raw_implicit = path.read_bytes(), implicit.read_bytes()
    explicit_meta = raw_explicit[: raw_explicit.index(b"\x08\x00\x16\x00")]
    implicit_body = raw_implicit[raw_implicit.index(b"\x08\x00\x16\x00"):]
    mixed = tmp_path / "mixed.dcm"
    mixed.write_bytes(explicit_meta + implicit_body)
    wanted = _wanted()
    recorder = _recorder_after_walk(mixed, wanted)
    assert recorder is not None and recorder.blocked is None  # the walk alone does not know
    head = _read(mixed, wanted)
    assert isinstance(head, Header) and not _scanned(head, wanted)
    assert_same(mixed, wanted)


def test_a_large_wanted_value_is_left_out_as_pydicom_drops_it(tmp_path):
    wanted = _wanted()
    path = write_dataset(make_dataset(StudyDescription="x" * (70 * 1024)), tmp_path / "big.dcm")
    assert assert_same(path, wanted)
    head = _read(path, wanted)
    assert isinstance(head, Header) and "StudyDescription" not in head.dataset


def test_a_file_cut_after_the_walk_takes_pydicom(tmp_path):
    recorder = header_scan.Recorder(_wanted())
    recorder.element(0x00080060, b"CS", 2, 1000)
    assert header_scan.build(recorder, lambda offset, count: b"", True, "1.2.840.10008.1.2.1",
                             pydicom.dataset.FileMetaDataset()) is None


# -- the filter ----------------------------------------------------------------------


def test_the_filter_scans_for_what_its_configuration_reads(tmp_path, monkeypatch):
    from pipeline.config import load
    from services.filter import FilterDaemon
    from tests.helpers import write_conf

    monkeypatch.delenv("DICOMFLOW_FASTPATH", raising=False)
    monkeypatch.delenv("DICOMFLOW_PATCHES_OFF", raising=False)
    endpoint = {"endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"},
                "filter": {"conditions": "StationName=CT1"}}
    conf = write_conf(tmp_path, filter_={"conditions": "Modality=CT|MR"}, endpoints={"pacs": endpoint})
    daemon = FilterDaemon(load(conf))
    daemon.spool.create(daemon.config.endpoints)
    assert daemon.wanted is not None
    # the study and series UIDs: for the journal's events (pipeline/journal)
    journal = {0x0020000D, 0x0020000E}
    assert daemon.wanted.tags == header_scan.FILTER_TAGS | {0x00080060, 0x00081010} | journal
    endpoint["filter"] = {"conditions": "(0019,1002)=x"}
    write_conf(tmp_path, filter_={"conditions": "Modality=CT|MR"}, endpoints={"pacs": endpoint})
    daemon.reload()
    assert daemon.wanted is not None
    assert daemon.wanted.tags == header_scan.FILTER_TAGS | {0x00080060, 0x00191002, 0x00190010} | journal
    monkeypatch.setenv("DICOMFLOW_PATCHES_OFF", "scan")
    assert FilterDaemon(load(conf)).wanted is None
