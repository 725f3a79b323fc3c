"""The generated Table E.1-1 (pipeline/shaping/table_e1_1.py): well formed, and rows read
in the standard (PS3.15 2024e, Table E.1-1) spot-checked."""

from __future__ import annotations

import re

import pytest

from pipeline.shaping.deid_table import COMBINED, SINGLE, ActionTable, resolve
from pipeline.shaping.table_e1_1 import OPTIONS, ROWS

CODES = SINGLE | set(COMBINED)


def test_every_row_is_well_formed_and_listed_once():
    tags = [row[0] for row in ROWS]
    assert len(tags) == len(set(tags)) == 620
    for tag, name, basic, by_option in ROWS:
        assert re.fullmatch(r"[0-9A-Fx]{8}", tag) and name
        assert basic in CODES and set(by_option) <= set(OPTIONS)
        assert set(by_option.values()) <= CODES


@pytest.mark.parametrize("tag, basic, by_option", [
    ("00100010", "Z", {}),                                       # Patient's Name
    ("00100020", "Z/D", {}),                                     # Patient ID (Z before 2021)
    ("00100030", "Z", {}),                                       # Patient's Birth Date
    ("00080050", "Z", {}),                                       # Accession Number
    ("0020000D", "U", {"retain_uids": "K"}),                     # Study Instance UID
    ("00081155", "U", {"retain_uids": "K"}),                     # Referenced SOP Instance UID
    ("00080080", "X/Z/D", {"retain_institution_identity": "K"}),  # Institution Name
    ("00080020", "Z", {"retain_full_dates": "K", "retain_modified_dates": "C"}),  # Study Date
    ("00081030", "X", {"clean_descriptors": "C"}),               # Study Description
    ("04000561", "X", {}),                                       # Original Attributes Sequence
    ("50xxxxxx", "X", {"clean_graphics": "C"}),                  # Curve Data
    ("60xx3000", "X", {"clean_graphics": "C"}),                  # Overlay Data
])
def test_rows_read_in_the_standard(tag, basic, by_option):
    row = {r[0]: r for r in ROWS}[tag]
    assert (row[2], row[3]) == (basic, by_option)


def test_options_resolve_as_the_readme_says():
    assert resolve("X/Z/D", {"retain_institution_identity": "K"}, []) == "D"
    assert resolve("X/Z/D", {"retain_institution_identity": "K"}, ["retain_institution_identity"]) == "K"
    assert resolve("X", {"retain_device_identity": "C", "retain_full_dates": "K"},
                   ["retain_device_identity", "retain_full_dates"]) == "K"
    assert resolve("X/Z/U*", {}, []) == "U" and resolve("X/Z", {}, []) == "Z"
    table = ActionTable(frozenset())
    assert table.action(0x60023000) == "X" and table.action(0x50100020) == "X"
    assert table.action(0x00080016) is None  # SOP Class UID: not listed, kept


def test_an_x_z_sequence_is_removed_unless_it_is_type_2():
    table = ActionTable(frozenset())
    assert table.action(0x00081110) == "X"  # Referenced Study Sequence: Type 3, no empty item list
    assert table.action(0x00400555) == "Z"  # Acquisition Context Sequence: Type 2
    assert table.action(0x00080022) == "Z"  # Acquisition Date: X/Z, not a sequence
