"""The values de-identification writes: dummies (``D``), cleaned text (``C``), shifted dates.

Kept apart from the walk (:mod:`pipeline.shaping.deidentify`) because each is a small
policy an operator may ask about: what does a dummy look like, what does cleaning
remove, how are dates moved.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable

#: ``D``: a value of the right VR that names nobody (numbers 0, dates 1900-01-01)
DUMMY_TEXT = "ANONYMIZED"
DUMMIES: dict[str, object] = {
    "AE": "ANONYMOUS", "AS": "000D", "CS": "ANONYMIZED", "DA": "19000101",
    "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0", "LO": DUMMY_TEXT,
    "LT": DUMMY_TEXT, "SH": DUMMY_TEXT, "ST": DUMMY_TEXT, "UC": DUMMY_TEXT, "UT": DUMMY_TEXT,
    "PN": DUMMY_TEXT, "UR": "", "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0,
    "FL": 0.0, "FD": 0.0, "AT": 0,
}
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
#: dates written in free text (``20240115``, ``2024-01-15``, ``15.01.2024``) and long
#: digit runs (record numbers, phone numbers)
_DATES_AND_NUMBERS = re.compile(
    r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|\d{6,}")
_SPACES = re.compile(r"\s{2,}")
#: identity tokens shorter than this are not removed from text (initials would eat words)
MIN_TOKEN = 2


#: a binary dummy: zero bytes, a whole number of values for every binary VR (OB…OV)
BINARY_DUMMY = bytes(8)


def dummy(vr: str) -> object:
    """The dummy value of ``vr`` (binary VRs: :data:`BINARY_DUMMY`)."""
    return DUMMIES.get(vr, BINARY_DUMMY)


class TextCleaner:
    """Clean Descriptors: free text with the file's own identity taken out.

    The tokens are the identifying values of the file itself (patient name parts, IDs,
    accession number, institution, physicians, station…, gathered before any change);
    each occurrence is removed, case-insensitively, as are dates and long digit runs.
    What is left is the description's wording ("CT CHEST W CONTRAST"). This cannot find
    identity the file does not carry elsewhere (a relative's name typed into a comment):
    the README says so.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        words = sorted({t.strip() for t in tokens if len(t.strip()) >= MIN_TOKEN}, key=len,
                       reverse=True)
        self._pattern = (re.compile("|".join(re.escape(w) for w in words), re.IGNORECASE)
                         if words else None)

    def clean(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(" ", text)
        text = _DATES_AND_NUMBERS.sub(" ", text)
        return _SPACES.sub(" ", text).strip(" ^,;:-")


def identity_tokens(values: Iterable[str]) -> list[str]:
    """Each value, and each component of a person name or address (``^``, spaces)."""
    tokens: list[str] = []
    for value in values:
        tokens.append(value)
        tokens += [part for part in re.split(r"[\^=\s,]+", value) if part]
    return tokens


def shift_date(value: str, days: int) -> str | None:
    """A DA value ``days`` earlier; None when it is not a full date, or the shifted one
    would not be a date (it is then removed)."""
    try:
        day = datetime.datetime.strptime(value.strip(), "%Y%m%d").date()
    except ValueError:
        return None
    try:
        shifted = day - datetime.timedelta(days=days)
    except OverflowError:  # before year 1 (or after 9999): removed like a partial date
        return None
    return f"{shifted.year:04d}{shifted.month:02d}{shifted.day:02d}"


def shift_datetime(value: str, days: int) -> str | None:
    """A DT value with its date part ``days`` earlier (time and offset kept); None when
    it does not start with a full date."""
    text = value.strip()
    date = shift_date(text[:8], days) if len(text) >= 8 else None
    return None if date is None else date + text[8:]
