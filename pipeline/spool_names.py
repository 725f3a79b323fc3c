"""The standard name of a file in the spool, formatted and parsed in this one place.

``<YYYYmmddTHHMMSS.ffffff>-<counter>-<SOP Instance UID | nouid>.dcm``, e.g.
``20261128T060102.123456-000042-1.2.3.dcm`` (README, The spool): the UTC time the file
reached the spool, a 6-digit counter that keeps names of one microsecond apart, the
UID. Names sort in arrival order with ``ls``, carry no patient data (so INFO lines may
show them), and contain nothing from the network unchecked: a UID that is not
digits-and-dots (≤ 64 characters) becomes ``nouid``.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.names import is_valid_uid

SUFFIX = ".dcm"
NO_UID = "nouid"
_STAMP = "%Y%m%dT%H%M%S.%f"
_COUNTER_MOD = 1_000_000
_PATTERN = re.compile(
    r"(?P<stamp>\d{8}T\d{6}\.\d{6})-(?P<counter>\d{6})-(?P<uid>[0-9.]+|" + NO_UID + r")"
    + re.escape(SUFFIX))

#: starts at a random value so that two processes naming files in the same
#: microsecond (receiver and filter) are unlikely to pick the same counter
_counter = itertools.count(int.from_bytes(os.urandom(2), "big"))


@dataclass(frozen=True)
class SpoolName:
    """One standard name: ``str()`` formats it, :meth:`parse` reads it back exactly."""

    time: datetime
    counter: int
    uid: str | None

    @classmethod
    def new(cls, sop_instance_uid: str | None, now: float | None = None) -> SpoolName:
        """A fresh name for a file arriving now (or at ``now``, a Unix time)."""
        now = time.time() if now is None else now
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        stamp = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
        uid = sop_instance_uid if is_valid_uid(sop_instance_uid) else None
        return cls(stamp, next(_counter) % _COUNTER_MOD, uid)

    @classmethod
    def parse(cls, name: str) -> SpoolName | None:
        """The standard name ``name`` is, or None (a hand-dropped or foreign name).

        Cached (names are immutable, and the filter parses each several times)."""
        return _parse(name)

    @classmethod
    def _parse(cls, name: str) -> SpoolName | None:
        match = _PATTERN.fullmatch(name)
        if match is None:
            return None
        uid = match["uid"]
        if uid != NO_UID and not is_valid_uid(uid):
            return None
        try:
            stamp = datetime.strptime(match["stamp"], _STAMP).replace(tzinfo=UTC)
        except ValueError:  # digits, but no date (month 13)
            return None
        return cls(stamp, int(match["counter"]), None if uid == NO_UID else uid)

    @property
    def timestamp(self) -> float:
        """The arrival time as a Unix time (for ages)."""
        return self.time.timestamp()

    @property
    def prefix(self) -> str:
        """``<time>-<counter>``: what every copy of one arrival shares, whatever its UID part."""
        return f"{self.time.strftime(_STAMP)}-{self.counter:06d}"

    def __str__(self) -> str:
        return f"{self.prefix}-{self.uid or NO_UID}{SUFFIX}"


@functools.lru_cache(maxsize=8192)
def _parse(name: str) -> SpoolName | None:
    return SpoolName._parse(name)


def is_standard(name: str) -> bool:
    """Is ``name`` a name DicomFlow gives (no patient data in it)?"""
    return SpoolName.parse(name) is not None
