"""Keyed pseudonyms: stable for one key, unrelated across keys and kinds, valid UIDs."""

from __future__ import annotations

import uuid

from pipeline.names import is_valid_uid
from pipeline.shaping.pseudonyms import MAX_DATE_SHIFT_DAYS, Pseudonyms

KEY = b"0123456789abcdef0123456789abcdef"


def test_the_same_original_gives_the_same_uid_with_one_key_and_another_with_another():
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    assert Pseudonyms(KEY).uid(uid) == Pseudonyms(bytes(KEY)).uid(uid)
    assert Pseudonyms(KEY).uid(uid) != Pseudonyms(KEY[::-1]).uid(uid)
    assert Pseudonyms(KEY).uid(uid) != Pseudonyms(KEY).uid(uid + "1")


def test_a_uid_pseudonym_is_a_2_25_uuid_with_version_4_and_the_rfc_variant():
    for original in ("1.2.3", "", "not a uid at all \\ 😀", "9" * 200):
        new = Pseudonyms(KEY).uid(original)
        assert new.startswith("2.25.") and is_valid_uid(new) and len(new) <= 64
        value = uuid.UUID(int=int(new.removeprefix("2.25.")))
        assert value.version == 4 and value.variant == uuid.RFC_4122


def test_kinds_are_separated_and_names_and_ids_fit_their_vrs():
    p = Pseudonyms(KEY)
    assert p.patient_id("12345").startswith("DF") and len(p.patient_id("12345")) == 18
    assert p.patient_id("12345") != p.patient_id("12346")
    name = p.patient_name("DOE^JOHN")
    assert name.startswith("ANON^") and len(name) <= 64 and name == p.patient_name("DOE^JOHN")
    assert p.patient_id("X")[2:12] != p.patient_name("X")[5:]


def test_the_date_shift_is_per_patient_and_within_its_bounds():
    p = Pseudonyms(KEY)
    shifts = {p.date_shift_days(f"PAT{i}") for i in range(200)}
    assert min(shifts) >= 1 and max(shifts) <= MAX_DATE_SHIFT_DAYS and len(shifts) > 150
    assert p.date_shift_days("PAT1") == Pseudonyms(KEY).date_shift_days("PAT1")
