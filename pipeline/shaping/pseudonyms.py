"""Stable, keyed pseudonyms for de-identification: UIDs, patient IDs and names, date shifts.

Each pseudonym is an HMAC-SHA-256 of the original under the endpoint's secret key, with
a label per kind of value (a patient ID and a UID that happen to be equal do not give
related outputs). The same original gives the same pseudonym in every file, after every
restart and on every machine that holds the same key — so a study sent twice, or split
across two routers, keeps its references — while without the key the originals cannot
be recovered or confirmed by trying candidates (a plain hash of a patient ID could be).

UIDs become ``2.25.<integer>`` (PS3.5 B.2): the integer of a UUID made of the HMAC's
first 16 bytes with the RFC 4122 variant and version 4 set. Version 4 because ITU-T
X.667 (which PS3.5 B.2 cites) knows only versions 1 to 5, and a keyed HMAC is, to
anyone without the key, the random value version 4 describes; 122 bits keep collisions
out of reach for any number of images a hospital holds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

#: how far back dates are shifted with Retain Longitudinal Temporal Information with
#: Modified Dates: 1 to this many days, per patient (intervals within a patient are kept)
MAX_DATE_SHIFT_DAYS = 3650


class Pseudonyms:
    """The pseudonyms of one key (one de-identifying endpoint)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _digest(self, label: str, value: str) -> bytes:
        message = label.encode() + b"\0" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.<int>``: at most 44 characters, a valid UID whatever the original was."""
        value = uuid.UUID(bytes=self._digest("uid", original)[:16], version=4)
        return f"2.25.{value.int}"

    def _code(self, label: str, value: str, length: int) -> str:
        digest = base64.b32encode(self._digest(label, value)).decode("ascii")
        return digest[:length]

    def patient_id(self, original: str) -> str:
        """``DF`` and 16 base-32 characters (80 bits): fits LO, readable over a phone."""
        return "DF" + self._code("patient-id", original, 16)

    def patient_name(self, original: str) -> str:
        """``ANON^<10 base-32 characters>``: a valid PN, family name ``ANON``."""
        return "ANON^" + self._code("patient-name", original, 10)

    def date_shift_days(self, patient_id: str) -> int:
        """How many days this patient's dates go back (1 to :data:`MAX_DATE_SHIFT_DAYS`)."""
        number = int.from_bytes(self._digest("date-shift", patient_id)[:8], "big")
        return 1 + number % MAX_DATE_SHIFT_DAYS
