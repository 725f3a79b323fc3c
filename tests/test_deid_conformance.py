"""Conformance of de-identification with an independent copy of PS3.15 Table E.1-1.

The table DicomFlow applies (pipeline/shaping/table_e1_1.py) was generated from the
standard's 2024e edition. This test reads another copy: the PyPI package
``dicom-standard`` ships the table as ``standard/confidentiality_profile_attributes.json``
(2020 edition, extracted by other people with other code). For the Basic Profile and for
each option DicomFlow offers, one file carrying *every* attribute listed there goes
through the real writer, and each attribute must come out as the table prescribes:
removed (X), empty (Z), a dummy (D), kept (K), cleaned (C) or its UID replaced (U), or
one of a combined code's choices. Rows the standard changed between the two editions
are listed in :data:`EDITION_CHANGES`; the test checks the 2020 copy still says what the
list says, so the list cannot hide a mistake.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.header import DEFAULT_LIMITS
from pipeline.shaping import provenance
from pipeline.shaping.copies import plan_endpoint_copy
from pipeline.shaping.deidentify import DeidentifyConfig, SafePrivate
from pipeline.shaping.operations import parse_operations
from pipeline.shaping.rewrite import ShapingSource
from tests.helpers import make_dataset, write_dataset

TABLE = Path(sysconfig.get_paths()["data"]) / "standard" / "confidentiality_profile_attributes.json"
#: the 2020 copy's option columns → DicomFlow's option names (the two Clean options
#: DicomFlow refuses to offer — graphics, structured content — are not run)
COLUMNS = {
    "rtnSafePrivOpt": "retain_safe_private", "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity", "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics", "rtnLongFullDatesOpt": "retain_full_dates",
    "rtnLongModifDatesOpt": "retain_modified_dates", "cleanDescOpt": "clean_descriptors",
}
RUNS = [None, *COLUMNS]
#: rows changed between the 2020 copy and the 2024e edition DicomFlow applies:
#: (tag, column) → (what the 2020 copy says, what 2024e says)
EDITION_CHANGES = {
    ("00203401", "rtnDevIdOpt"): (None, "K"),           # Modifying Device ID
    ("00100020", "basicProfile"): ("Z", "Z/D"),         # Patient ID
    ("00400241", "rtnDevIdOpt"): ("K", "C"),            # Performed Station AE Title
    ("00081120", "rtnUIDsOpt"): ("X", "K"),             # Referenced Patient Sequence
    ("00400001", "rtnDevIdOpt"): ("K", "C"),            # Scheduled Station AE Title
    ("00321021", "rtnDevIdOpt"): ("K", "C"),            # Scheduled Study Location AE Title
    ("300A00B2", "basicProfile"): ("X", "X/Z"),         # Treatment Machine Name
}
#: rows the 2020 copy lists twice, with two Basic Profile codes; 2024e lists them once
DUPLICATED_2020 = {"30080105": ({"X", "X/Z"}, "X/Z")}  # Source Serial Number
FAMILY = "ZZFAM"
#: a wildcard row of the table, as one concrete tag
CONCRETE = {"(50XX,XXXX)": 0x50000005, "(60XX,4000)": 0x60004000, "(60XX,3000)": 0x60003000,
            "(GGGG,EEEE) WHERE GGGG IS ODD": 0x00091001}
KEY = b"conformance-test-key-0123456789"
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
#: rows of command elements (group 0000): they belong to a C-STORE request, never to a
#: file, and pynetdicom writes them afresh for each request (no value of the file's)
COMMAND_ROWS = 2


def rows() -> list[dict]:
    return json.loads(TABLE.read_text())


def tag_of(row: dict) -> int:
    return CONCRETE.get(row["tag"]) or int(row["tag"].strip("()").replace(",", ""), 16)


def expected_code(row: dict, column: str | None) -> str:
    """The 2020 copy's code for this run (the option's, else the Basic Profile's), but
    for the rows :data:`EDITION_CHANGES` and :data:`DUPLICATED_2020` list."""
    tag = row["id"].upper()
    own = bool(column and row.get(column))
    if tag in DUPLICATED_2020 and not own:
        codes, chosen = DUPLICATED_2020[tag]
        assert row["basicProfile"] in codes, f"{tag}: the 2020 copy no longer says {codes}"
        return chosen
    used = column if own else "basicProfile"
    code = row[used] if own or column is None else row["basicProfile"]
    for (changed, col), (old, new) in EDITION_CHANGES.items():
        if changed == tag and col in (used, column):
            assert row.get(col) == old, f"{tag} {col}: the 2020 copy no longer says {old}"
            code = new or code
    return code


def vr_of(tag: int) -> str:
    if tag == 0x00091001:
        return "LO"
    vr = dictionary_VR(tag)
    return vr.split(" or ")[0]


def value_for(vr: str, n: int) -> object:
    """A recognisable value of each VR (text carries the patient's family name, so that
    cleaning has something to remove)."""
    texts = {"AE": f"{FAMILY}{n}", "CS": f"ZZCS{n}", "SH": f"Z{n} {FAMILY}", "PN": f"{FAMILY}^ZZP{n}"}
    if vr in texts:
        return texts[vr]
    if vr in ("LO", "LT", "ST", "UC", "UT"):
        return f"ZZTEXT{n} {FAMILY}"
    fixed: dict[str, object] = {
        "AS": "045Y", "DA": "20190513", "DT": "20190513101500", "TM": "101500", "DS": "12.5",
        "IS": "42", "UR": f"http://zz.example/{n}", "US": 7, "SS": 7, "UL": 7, "SL": 7, "UV": 7,
        "SV": 7, "FL": 1.5, "FD": 1.5, "AT": 0x00100010}
    if vr in fixed:
        return fixed[vr]
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.999.{n}"
    if vr == "SQ":
        item = Dataset()
        item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.998.{n}"
        item.CodeValue = "ZZITEM"
        item.PersonName = f"{FAMILY}^ZZITEM"  # D in the table: an item always has identity
        return Sequence([item])
    return b"ZZBIN" + b"\0"  # OB, OW, OD, OF, OL, OV, UN


def carrier(table: list[dict]) -> Dataset:
    ds = make_dataset(patient_name=f"{FAMILY}^ZZGIVEN", patient_id="ZZPID")
    ds.add_new(0x00090010, "LO", "ZZPRIV")
    for n, row in enumerate(table):
        tag = tag_of(row)
        if tag >> 16 in (0x0000, 0x0002):
            continue  # command and file meta elements: not in a data set
        if tag in (0x00100010, 0x00100020):
            continue  # already set: the patient's identity the cleaning removes
        vr = vr_of(tag)
        ds[tag] = DataElement(tag, vr, value_for(vr, n))
    return ds


def run(tmp_path: Path, option: str | None) -> tuple[Dataset, Dataset]:
    ds = carrier(rows())
    src = write_dataset(ds, tmp_path / "src.dcm")
    options = frozenset() if option is None else frozenset({COLUMNS[option]})
    safe = (SafePrivate("ZZPRIV", 0x0009, 0x01),)
    config = DeidentifyConfig(options, KEY, safe_private=safe if option == "rtnSafePrivOpt" else ())

    class Endpoint:
        name, deidentify, coerce = "research", config, parse_operations("")

    out = tmp_path / "out.dcm"
    with ShapingSource.open(src, DEFAULT_LIMITS, tmp_path) as source:
        plan = plan_endpoint_copy(source, Endpoint(), "DICOMFLOW:research")  # type: ignore[arg-type]
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            plan.write(fd, provenance.shaped_mark("research"))
        finally:
            os.close(fd)
    return pydicom.dcmread(src), pydicom.dcmread(out)


def outcome(before: Dataset, after: Dataset, tag: int) -> str:
    """What happened to one attribute: X, Z, K, U (a new 2.25 UID), S (a sequence kept,
    its items de-identified) or V (a new value)."""
    if tag >> 16 == 0x0002:
        before, after = before.file_meta, after.file_meta
    if tag not in after:
        return "X"
    old, new = before[tag], after[tag]
    if new.VR == "SQ":
        return "Z" if not new.value else "K" if str(new.value) == str(old.value) else "S"
    if new.value in (None, "", b""):
        return "Z"
    if new.value == old.value:
        return "K"
    if new.VR == "UI":
        return "U" if str(new.value).startswith("2.25.") else "V"
    return "V"


def allowed(code: str, vr: str, tag: int) -> set[str]:
    """The outcomes a code allows (a combined code: any of its parts)."""
    result: set[str] = set()
    for part in code.replace("*", "").split("/"):
        if part == "X":
            result.add("X")
        elif part == "Z":
            result |= {"Z", "V"} if tag in (0x00100010, 0x00100020) else {"Z"}  # dummy allowed
        elif part == "D":
            result |= {"V", "U", "S"} if vr in ("UI", "SQ") else {"V"}
        elif part == "K":
            result |= {"K", "S"} if vr == "SQ" else {"K"}
        elif part == "C":
            result |= {"S"} if vr == "SQ" else {"K"} if vr == "TM" else {"V"}
            if vr in BINARY_VRS:
                result.add("X")  # a binary value cannot be cleaned: removed (README)
        elif part == "U":
            result |= {"S"} if vr == "SQ" else {"U"}
    return result


@pytest.fixture(scope="module")
def table() -> list[dict]:
    assert TABLE.is_file(), f"{TABLE}: install the test extras (pip install -e '.[test]')"
    return rows()


def test_the_independent_copy_is_the_2020_table(table):
    assert len(table) == 433 and sum(1 for r in table if r["basicProfile"] == "U") == 48
    for tag, (codes, _) in DUPLICATED_2020.items():
        assert {r["basicProfile"] for r in table if r["id"].upper() == tag} == codes
    assert sum(1 for r in table if r["tag"].startswith("(0000,")) == COMMAND_ROWS


@pytest.mark.parametrize("option", RUNS, ids=lambda o: o or "basic")
def test_every_attribute_of_the_table_gets_its_action(tmp_path, table, option):
    before, after = run(tmp_path, option)
    wrong = []
    for row in table:
        tag = tag_of(row)
        if tag >> 16 == 0x0000:
            continue  # a DIMSE command element: never in a stored file (see COMMAND_ROWS)
        code = expected_code(row, option)
        vr = "UI" if tag >> 16 == 0x0002 else vr_of(tag)
        if tag == 0x00091001 and option == "rtnSafePrivOpt":
            code = "K"  # Retain Safe Private: the element this run names as safe is kept
        got = outcome(before, after, tag)
        if got not in allowed(code, vr, tag):
            wrong.append(f"{row['tag']} {row['name']} ({vr}): {code} expected, got {got}")
        if got in ("V", "S") and "C" in code and FAMILY in str(after.get(tag, "")):
            wrong.append(f"{row['tag']} {row['name']}: cleaned, yet still names the patient")
    assert not wrong, f"{len(wrong)} attribute(s):\n" + "\n".join(wrong)


def test_the_de_identified_uids_are_consistent_across_attributes(tmp_path):
    _, after = run(tmp_path, None)
    data = (tmp_path / "out.dcm").read_bytes()
    assert FAMILY.encode() not in data and b"1.2.826.0.1.3680043.10.99" not in data
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert after.PatientIdentityRemoved == "YES" and "OriginalAttributesSequence" not in after
