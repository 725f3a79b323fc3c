"""Modality Performed Procedure Steps, recorded durably under ``<spool>/run/mpps/``.

Why: a study is complete when its modality says so (MPPS COMPLETED and every instance
it references has arrived), long before a stable time runs out (issue 17, item 2).
The receive daemon answers N-CREATE / N-SET through :class:`MppsStore` (only after the
record is durable: tmp → fsync → rename → directory fsync, through :class:`Spool`);
the filter reads the records with :meth:`MppsStore.load_all`.

One JSON file per step, ``run/mpps/<uid>.json``, named by its MPPS SOP Instance UID
(validated: digits and dots, so never a path). A record keeps what completion needs
and nothing that is PHI: the step's status, the Study Instance UIDs it was scheduled
for, and per performed series the SOP Instance UIDs it references. What it keeps is
bounded (:data:`MAX_INSTANCES`); a reference that is not a valid UID is ignored.

N-SET follows DICOM's semantics: an attribute in the modification list replaces its
value, so a Performed Series Sequence in an N-SET replaces the series recorded so far.

No pynetdicom here: the network boundary is ``pipeline/dicom/``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.log import escape, logger
from pipeline.names import is_valid_uid
from pipeline.spool import Spool, fsync_dir, make_private_dir

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STEP_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FORMAT = 1
SUFFIX = ".json"
MAX_INSTANCES = 100_000  # referenced instances (and series) kept per record

# DIMSE statuses (PS3.4 F.7, PS3.7 C)
STATUS_SUCCESS = 0x0000
STATUS_INVALID_VALUE = 0x0106
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_DUPLICATE_INSTANCE = 0x0111
STATUS_NO_SUCH_INSTANCE = 0x0112
STATUS_MISSING_ATTRIBUTE = 0x0120
STATUS_MAY_NO_LONGER_BE_UPDATED = 0xA710


@dataclass(frozen=True)
class MppsRecord:
    """One performed procedure step as the filter needs it (no patient data)."""

    uid: str
    status: str
    studies: frozenset[str]
    series: dict[str, frozenset[str]]
    updated: float

    @property
    def finished(self) -> bool:
        """COMPLETED or DISCONTINUED: the modality will not change it any more."""
        return self.status in (COMPLETED, DISCONTINUED)

    @property
    def instances(self) -> frozenset[str]:
        """Every SOP Instance UID the step references, over all its series."""
        return frozenset().union(*self.series.values())

    def to_json(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "uid": self.uid, "status": self.status,
            "studies": sorted(self.studies),
            "series": {uid: sorted(refs) for uid, refs in sorted(self.series.items())},
            "updated": self.updated,
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MppsRecord:
        """Parse a record file; ValueError for anything that is not one we wrote."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("not an MPPS record of format 1")
        uid, status, updated = raw.get("uid"), raw.get("status"), raw.get("updated")
        if not isinstance(uid, str) or not is_valid_uid(uid) or status not in STEP_STATUSES:
            raise ValueError("invalid uid or status")
        if not isinstance(updated, int | float):
            raise ValueError("invalid update time")
        series = raw.get("series")
        if not isinstance(series, dict):
            raise ValueError("invalid series")
        return cls(uid, status, frozenset(_uid_list(raw.get("studies"))),
                   {key: frozenset(_uid_list(refs)) for key, refs in series.items()
                    if is_valid_uid(key)}, float(updated))


def _uid_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError("a UID list is expected")
    return [uid for uid in value if is_valid_uid(uid)]


class _Refused(Exception):
    """An N-CREATE / N-SET answered with a failure status (and why, for the log)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class MppsStore:
    """The records of ``<spool>/run/mpps/``: written by the receiver, read by the filter.

    Thread-safe within a process (one lock around read-modify-write); across
    receive processes an N-CREATE never overwrites (rename without replace)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.directory = spool.run_dir / "mpps"
        self._lock = threading.Lock()
        #: file name -> ((mtime_ns, size), record or None for a corrupt file)
        self._cache: dict[str, tuple[tuple[int, int], MppsRecord | None]] = {}
        spool.clean_dead_tmp(self.directory)

    # -- the receiver's side ---------------------------------------------------

    def create(self, uid: str, ds: Dataset, source: str = "") -> int:
        """N-CREATE: a new step, IN PROGRESS. Returns the DIMSE status to answer, after
        the record is durable. ``source`` (the calling AE title) is for the log only."""
        try:
            _check_uid(uid)
            status = _step_status(ds, required=True)
            if status != IN_PROGRESS:
                raise _Refused(STATUS_INVALID_VALUE, f"N-CREATE with status {escape(status, 20)!r}")
            record = MppsRecord(uid, IN_PROGRESS, _studies(ds), _series(ds) or {}, time.time())
            with self._lock:
                if self._path(uid).exists():
                    raise _Refused(STATUS_DUPLICATE_INSTANCE, "it exists already")
                self._write(record, replace=False)
        except _Refused as refusal:
            return _refused("N-CREATE", uid, refusal, source)
        except FileExistsError:  # another receive process created it meanwhile
            return _refused("N-CREATE", uid, _Refused(STATUS_DUPLICATE_INSTANCE, "it exists already"),
                            source)
        except OSError as exc:
            return _disk_error("N-CREATE", uid, exc)
        _log_change(record, source)
        return STATUS_SUCCESS

    def update(self, uid: str, ds: Dataset, source: str = "") -> int:
        """N-SET: merge the modification list into the step (an attribute given replaces
        its value). Returns the DIMSE status to answer, after the record is durable."""
        try:
            _check_uid(uid)
            with self._lock:
                old = self._read(uid)
                if old.finished:
                    raise _Refused(STATUS_MAY_NO_LONGER_BE_UPDATED, f"it is {old.status} already")
                status = _step_status(ds, required=False) or old.status
                if status not in STEP_STATUSES:
                    raise _Refused(STATUS_INVALID_VALUE, f"status {escape(status, 20)!r}")
                series = _series(ds)
                record = MppsRecord(uid, status, _studies(ds) or old.studies,
                                    old.series if series is None else series, time.time())
                self._write(record, replace=True)
        except _Refused as refusal:
            return _refused("N-SET", uid, refusal, source)
        except OSError as exc:
            return _disk_error("N-SET", uid, exc)
        if record.status != old.status or record.series != old.series:
            _log_change(record, source)
        return STATUS_SUCCESS

    # -- the filter's side -------------------------------------------------------

    def load_all(self) -> dict[str, MppsRecord]:
        """Every readable record by its uid; only files changed since the last call are
        parsed again. A corrupt file is skipped with one WARNING (until it changes)."""
        with self._lock:
            return self._load_all()

    def _load_all(self) -> dict[str, MppsRecord]:
        records: dict[str, MppsRecord] = {}
        seen: set[str] = set()
        for entry in self._entries():
            seen.add(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            key = (st.st_mtime_ns, st.st_size)
            cached = self._cache.get(entry.name)
            if cached is None or cached[0] != key:
                cached = (key, self._parse(Path(entry.path)))
                self._cache[entry.name] = cached
            if cached[1] is not None:
                records[cached[1].uid] = cached[1]
        for name in set(self._cache) - seen:
            del self._cache[name]
        return records

    def prune(self, older_than: float) -> int:
        """Remove the records not updated for ``older_than`` seconds; returns the count."""
        cutoff = time.time() - older_than
        removed = 0
        for uid, record in self.load_all().items():
            if record.updated < cutoff:
                try:
                    self.spool.unlink(self._path(uid))
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    logger.error("cannot remove MPPS record {}: {}", uid, escape(exc.strerror or exc))
                    continue
                removed += 1
        return removed

    # -- files --------------------------------------------------------------------

    def _path(self, uid: str) -> Path:
        return self.directory / f"{uid}{SUFFIX}"

    def _entries(self) -> Iterable[os.DirEntry]:
        try:
            with os.scandir(self.directory) as entries:
                return [e for e in entries if e.name.endswith(SUFFIX) and not e.name.startswith(".")
                        and e.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def _parse(self, path: Path) -> MppsRecord | None:
        try:
            record = MppsRecord.from_json(_read_file(path))
            if path.name != f"{record.uid}{SUFFIX}":
                raise ValueError("its uid is not its name")
            return record
        except (OSError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            logger.warning("skipping MPPS record {}: {}", escape(path.name), escape(exc, 120))
            return None

    def _read(self, uid: str) -> MppsRecord:
        path = self._path(uid)
        try:
            return MppsRecord.from_json(_read_file(path))
        except FileNotFoundError:
            raise _Refused(STATUS_NO_SUCH_INSTANCE, "no such step") from None
        except (ValueError, RecursionError) as exc:
            raise _Refused(STATUS_PROCESSING_FAILURE, f"its record is corrupt ({escape(exc, 80)})") from None

    def _write(self, record: MppsRecord, replace: bool) -> None:
        _mkdir(self.directory)
        self.spool.write_bytes(self.directory, f"{record.uid}{SUFFIX}", record.to_json(), replace=replace)


def _read_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        return file.read()


def _mkdir(path: Path) -> None:
    """``run/mpps/`` on demand (0700), its entry in ``run/`` durable before any record."""
    if not path.is_dir():
        make_private_dir(path)
        fsync_dir(path.parent)


# -- what a data set says ----------------------------------------------------------------

def _check_uid(uid: str) -> None:
    if not uid:
        raise _Refused(STATUS_MISSING_ATTRIBUTE, "no SOP Instance UID")
    if not is_valid_uid(uid):
        raise _Refused(STATUS_INVALID_VALUE, "invalid SOP Instance UID")


def _step_status(ds: Dataset, required: bool) -> str | None:
    try:
        value = ds.get("PerformedProcedureStepStatus")
    except Exception:  # noqa: BLE001 - a value pydicom cannot decode is an invalid value
        raise _Refused(STATUS_INVALID_VALUE, "undecodable Performed Procedure Step Status") from None
    if value is None or value == "":
        if required:
            raise _Refused(STATUS_MISSING_ATTRIBUTE, "no Performed Procedure Step Status")
        return None
    if not isinstance(value, str) or value.strip() not in STEP_STATUSES:
        raise _Refused(STATUS_INVALID_VALUE, f"Performed Procedure Step Status {escape(value, 20)!r}")
    return value.strip()


def _items(ds: Dataset, keyword: str) -> list[Dataset] | None:
    """The items of a sequence; None when the attribute is absent."""
    try:
        if keyword not in ds:
            return None
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001
        raise _Refused(STATUS_INVALID_VALUE, f"undecodable {keyword}") from None
    if value is None or value == "":
        return []
    if not isinstance(value, Sequence):
        raise _Refused(STATUS_INVALID_VALUE, f"{keyword} is not a sequence")
    return [item for item in value if isinstance(item, Dataset)]


def _uid_of(item: Dataset, keyword: str) -> str | None:
    """A valid UID in ``item``, or None (a non-UID reference is ignored, DEBUG)."""
    try:
        value = item.get(keyword)
    except Exception:  # noqa: BLE001
        value = "<undecodable>"
    if value is None:
        return None
    if isinstance(value, str) and is_valid_uid(value):
        return str(value)
    logger.debug("MPPS: ignoring a {} that is not a UID: {!s}", keyword, escape(value, 80))
    return None


def _studies(ds: Dataset) -> frozenset[str]:
    studies = set()
    for item in _items(ds, "ScheduledStepAttributesSequence") or []:
        uid = _uid_of(item, "StudyInstanceUID")
        if uid is not None:
            studies.add(uid)
        if len(studies) > MAX_INSTANCES:
            raise _Refused(STATUS_PROCESSING_FAILURE, f"too many studies (> {MAX_INSTANCES})")
    return frozenset(studies)


def _series(ds: Dataset) -> dict[str, frozenset[str]] | None:
    """Performed Series Sequence: series uid -> referenced instances; None if absent."""
    items = _items(ds, "PerformedSeriesSequence")
    if items is None:
        return None
    series: dict[str, set[str]] = {}
    count = 0
    for item in items:
        uid = _uid_of(item, "SeriesInstanceUID")
        if uid is None:
            continue
        refs = series.setdefault(uid, set())
        for keyword in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in _items(item, keyword) or []:
                instance = _uid_of(ref, "ReferencedSOPInstanceUID")
                if instance is not None and instance not in refs:
                    refs.add(instance)
                    count += 1
                    if count > MAX_INSTANCES:
                        raise _Refused(STATUS_PROCESSING_FAILURE,
                                       f"too many referenced instances (> {MAX_INSTANCES})")
        if len(series) > MAX_INSTANCES:
            raise _Refused(STATUS_PROCESSING_FAILURE, f"too many series (> {MAX_INSTANCES})")
    return {uid: frozenset(refs) for uid, refs in series.items()}


# -- log lines (no PHI: UIDs, counts and the calling AE title, escaped) --------------------

def _log_change(record: MppsRecord, source: str) -> None:
    studies = sorted(record.studies)
    study = f"study {studies[0]}" if len(studies) == 1 else f"{len(studies)} studies"
    logger.info("MPPS {} {} ({}, {} instances) from {!r}", record.uid, record.status, study,
                len(record.instances), escape(source))


def _refused(operation: str, uid: str, refusal: _Refused, source: str) -> int:
    logger.warning("MPPS {} of {} from {!r} refused (0x{:04X}): {}", operation, escape(uid, 80),
                   escape(source), refusal.status, refusal.reason)
    return refusal.status


def _disk_error(operation: str, uid: str, exc: OSError) -> int:
    logger.error("MPPS {} of {}: cannot write its record: {}", operation, uid,
                 escape(exc.strerror or exc))
    return STATUS_PROCESSING_FAILURE
