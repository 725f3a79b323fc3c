"""The values de-identification writes: cleaned text, shifted dates, dummies, burned-in."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pipeline.errors import ShapingError
from pipeline.shaping import deid_values
from pipeline.shaping.burned_in import RISKY_SOP_CLASSES, check_burned_in


def test_cleaning_removes_the_files_identity_dates_and_long_numbers_but_keeps_the_wording():
    cleaner = deid_values.TextCleaner(deid_values.identity_tokens(
        ["DOE^JOHN", "ST. ELSEWHERE HOSPITAL", "MRN4711"]))
    text = "CT chest for John Doe (mrn4711), St. Elsewhere Hospital 2024-01-15 tel 0123456789"
    assert deid_values.TextCleaner([]).clean("CT CHEST W CONTRAST") == "CT CHEST W CONTRAST"
    cleaned = cleaner.clean(text)
    for gone in ("John", "Doe", "4711", "Elsewhere", "2024", "0123456789"):
        assert gone.lower() not in cleaned.lower()
    assert cleaned.startswith("CT chest for")


def test_dates_shift_back_by_whole_days_and_what_is_not_a_date_is_dropped():
    assert deid_values.shift_date("20240301", 1) == "20240229"
    assert deid_values.shift_date("2024", 10) is None
    assert deid_values.shift_date("garbage!", 10) is None
    assert deid_values.shift_datetime("20240101093000.5+0100", 1) == "20231231093000.5+0100"
    assert deid_values.shift_datetime("2024", 1) is None


def test_dummies_fit_their_vr():
    assert deid_values.dummy("DA") == "19000101" and deid_values.dummy("US") == 0
    assert len(str(deid_values.dummy("SH"))) <= 16 and deid_values.dummy("OB") == bytes(8)


def _ds(sop_class: str, burned: str | None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    if burned is not None:
        ds.BurnedInAnnotation = burned
    return ds


@pytest.mark.parametrize("sop_class", sorted(RISKY_SOP_CLASSES))
def test_a_risky_class_is_refused_unless_it_says_no(sop_class):
    with pytest.raises(ShapingError, match="Burned In Annotation is missing"):
        check_burned_in(_ds(sop_class, None))
    with pytest.raises(ShapingError, match="is not NO"):
        check_burned_in(_ds(sop_class, "MAYBE"))
    check_burned_in(_ds(sop_class, "NO"))


def test_burned_in_yes_is_refused_for_any_class_and_a_ct_passes():
    ct = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(ShapingError, match="Burned In Annotation is YES"):
        check_burned_in(_ds(ct, "YES"))
    check_burned_in(_ds(ct, None))


def test_a_date_that_would_leave_the_calendar_is_removed_not_an_error():
    from pipeline.shaping.deid_values import shift_date, shift_datetime

    assert shift_date("00010101", 10) is None
    assert shift_date("99991231", -10) is None
    assert shift_datetime("00010101120000", 10) is None
    assert shift_date("20240311", 10) == "20240301"
