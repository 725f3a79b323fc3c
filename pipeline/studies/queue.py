"""Study lists: the order in which a released study (or series) goes out.

Hard links keep each copy's arrival-time name, and a sender sends in name order; a
study-level endpoint's receiver wants a study whole, in (Series Number, Instance
Number) order, on one association (README, Studies). So the filter, when it releases a
study to an endpoint, first publishes a small *study list* under
``<spool>/run/studies/queue/<endpoint>/`` naming the copies in sending order, then
links the copies into ``outbox/<endpoint>/``. The sender orders its outbox by the
lists (:func:`order`) and removes a list once its files have left (:func:`retire`);
``dicomflow status`` counts the queued studies with :func:`load` and nothing else.

Lists name the copies' *prefixes* (``<time>-<counter>``, :attr:`SpoolName.prefix`),
not their full names: a shaped copy carries another SOP Instance UID after the prefix.
A list is runtime state, never a stage: it lives under ``run/``, written through the
spool (temp file, fsync, rename, directory fsync), JSON, bounded when read.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SpoolError
from pipeline.log import escape, logger
from pipeline.names import is_valid_endpoint_name, is_valid_uid
from pipeline.spool import Spool, make_private_dir
from pipeline.spool_names import SpoolName

VERSION = 1
SUFFIX = ".study"
BAD_SUFFIX = ".bad"
LEVELS = ("study", "series")
MAX_LIST_BYTES = 16 * 1024 * 1024   # a bigger list file is corrupt (never read whole)
MAX_PREFIXES = 200_000              # …and so is one naming more copies than this
NEVER_ARRIVED_AGE = 3600.0          # a list none of whose files ever came is dropped after this
_PREFIX = r"\d{8}T\d{6}\.\d{6}-\d{6}"
_PREFIX_RE = re.compile(_PREFIX)
_NAME_RE = re.compile(_PREFIX + re.escape(SUFFIX))
_PREFIX_LEN = 29                    # len("20261128T060102.123456-000042")


@dataclass(frozen=True)
class StudyList:
    """One released study (or series) of one endpoint, in sending order."""

    name: str                  # file name in the list dir; "<UTC stamp>-<counter>.study"
    endpoint: str
    study: str                 # Study Instance UID
    series: str | None         # Series Instance UID of a series-level release, else None
    level: str                 # "study" | "series"
    released: float            # wall time
    prefixes: tuple[str, ...]  # the copies' name prefixes, in sending order


def list_dir(spool: Spool, endpoint: str, create: bool = True) -> Path:
    """``<spool>/run/studies/queue/<endpoint>/`` (mode 0700; made unless ``create`` is
    false: a sender or ``status`` only looks, and a missing folder means no lists)."""
    if not is_valid_endpoint_name(endpoint):
        raise SpoolError(f"invalid endpoint name {endpoint!r}")
    path = spool.run_dir / "studies" / "queue" / endpoint
    if create:
        for folder in (path.parent.parent, path.parent, path):
            make_private_dir(folder)
    return path


def prefix_of(name: str) -> str | None:
    """The ``<time>-<counter>`` a spool file's name starts with (None: not a standard
    name). A cheap slice: the sender computes it for every file of its outbox."""
    if len(name) > _PREFIX_LEN and name[_PREFIX_LEN] == "-" and _PREFIX_RE.match(name):
        return name[:_PREFIX_LEN]
    return None


def publish(spool: Spool, endpoint: str, study: str, series: str | None, level: str,
            prefixes: Sequence[str], now: float | None = None) -> StudyList:
    """Write one study list durably (temp file, fsync, rename, directory fsync) under a
    fresh name that sorts in release order. The filter calls it *before* it links the
    copies into the outbox, so a sender never sees a released study's file unlisted."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    if not is_valid_uid(study) or (series is not None and not is_valid_uid(series)):
        raise ValueError("a study list needs valid Study (and Series) Instance UIDs")
    if len(prefixes) > MAX_PREFIXES:
        raise ValueError(f"{len(prefixes)} copies, a study list holds at most {MAX_PREFIXES}")
    bad = [p for p in prefixes if not _PREFIX_RE.fullmatch(p)]
    if bad:
        raise ValueError(f"not a copy's name prefix: {escape(bad[0])}")
    directory = list_dir(spool, endpoint)
    released = time.time() if now is None else now
    for _ in range(100):
        entry = StudyList(SpoolName.new(None, released).prefix + SUFFIX, endpoint, study, series,
                          level, float(released), tuple(prefixes))
        try:
            spool.write_bytes(directory, entry.name, _encode(entry))
        except FileExistsError:  # another list of the same microsecond and counter
            continue
        return entry
    raise SpoolError(f"could not find a free study list name in {directory}")


def load(spool: Spool, endpoint: str, set_aside: bool = True) -> list[StudyList]:
    """The endpoint's lists, sorted by name (release order). A corrupt or unreadable
    list costs one WARNING and is moved aside as ``<name>.bad`` (for the operator);
    the others load. No folder: no lists (and none is made). ``set_aside=False`` (a
    read-only caller such as ``status``): a corrupt list is skipped silently, left as is."""
    directory = list_dir(spool, endpoint, create=False)
    try:
        names = sorted(e.name for e in os.scandir(directory) if _NAME_RE.fullmatch(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    lists = []
    for name in names:
        path = directory / name
        try:
            lists.append(_decode(name, endpoint, _read_bounded(path)))
        except FileNotFoundError:  # retired meanwhile
            continue
        except (OSError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            if set_aside:  # a corrupt list never stops a sender: set aside, sent in name order
                _set_aside(spool, path, exc)
    return lists


def order(paths: Sequence[Path], lists: Sequence[StudyList]) -> list[Path]:
    """``paths`` (outbox files) in sending order: a file whose prefix a list names
    sorts at (that list's name, its position there) — the earliest list, if several
    name it — any other file at (its own name, 0). Both kinds of names start with a
    UTC stamp, so a study goes out where it was released and whole, in its list's
    order, and a file arriving after its study's release sorts after that list."""
    rank: dict[str, tuple[str, int]] = {}
    for entry in sorted(lists, key=lambda one: one.name):
        for position, prefix in enumerate(entry.prefixes):
            rank.setdefault(prefix, (entry.name, position))

    def key(path: Path) -> tuple[str, int, str]:
        name = path.name  # rank's keys are valid prefixes: a slice and a lookup suffice
        found = rank.get(name[:_PREFIX_LEN]) if name[_PREFIX_LEN:_PREFIX_LEN + 1] == "-" else None
        return (found[0], found[1], name) if found else (name, 0, name)

    return sorted(paths, key=key)


def retire(spool: Spool, endpoint: str, lists: Sequence[StudyList], present_prefixes: set[str],
           *, arrived: Collection[str] = (), now: float | None = None) -> list[StudyList]:
    """Remove the lists none of whose prefixes is still in the outbox, and return the
    rest. A list without any file present is removed when its files have been there
    (``arrived``: names of lists all of whose prefixes the caller has seen in the
    outbox — they have all left since, sent or failed) or when it is older than
    :data:`NEVER_ARRIVED_AGE`: the filter publishes a list just *before* it links the
    files, so a young list with no file yet is waiting for them, not done."""
    now = time.time() if now is None else now
    directory = list_dir(spool, endpoint, create=False)
    kept = []
    for entry in lists:
        if any(p in present_prefixes for p in entry.prefixes) or (
                entry.name not in arrived and now - entry.released < NEVER_ARRIVED_AGE):
            kept.append(entry)
            continue
        try:
            spool.unlink(directory / entry.name)
        except OSError as exc:
            logger.bind(endpoint=endpoint).warning(
                "cannot remove study list {}: {}; trying again later", entry.name,
                exc.strerror or exc)
            kept.append(entry)
            continue
        how = "delivered" if entry.name in arrived else "its files never came"
        logger.bind(endpoint=endpoint).info("{}-level list {} ({} files) retired: {}",
                                            entry.level, entry.name, len(entry.prefixes), how)
    return kept


# -- the file format ------------------------------------------------------------------

def _encode(entry: StudyList) -> bytes:
    body = {"version": VERSION, "endpoint": entry.endpoint, "study": entry.study,
            "series": entry.series, "level": entry.level, "released": entry.released,
            "prefixes": list(entry.prefixes)}
    return (json.dumps(body, separators=(",", ":")) + "\n").encode("ascii")


def _read_bounded(path: Path) -> bytes:
    """The list file's bytes, never more than :data:`MAX_LIST_BYTES` (no symlinks)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_LIST_BYTES:
            raise ValueError(f"{st.st_size} bytes, more than {MAX_LIST_BYTES}")
        data = file.read(MAX_LIST_BYTES + 1)
    if len(data) > MAX_LIST_BYTES:
        raise ValueError(f"more than {MAX_LIST_BYTES} bytes")
    return data


def _decode(name: str, endpoint: str, data: bytes) -> StudyList:
    """One list from its bytes; ValueError says why it is corrupt. Prefixes that are
    not a copy's prefix are ignored (and duplicates: a copy goes out once)."""
    body = json.loads(data.decode("utf-8"))
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise ValueError("not a version 1 study list")
    study, series, level = body.get("study"), body.get("series"), body.get("level")
    released, prefixes = body.get("released"), body.get("prefixes")
    if body.get("endpoint") != endpoint:
        raise ValueError("it names another endpoint")
    if not isinstance(study, str) or not is_valid_uid(study) \
            or not (series is None or is_valid_uid(series)):
        raise ValueError("no valid Study/Series Instance UID")
    if level not in LEVELS:
        raise ValueError("no valid level")
    if isinstance(released, bool) or not isinstance(released, int | float) \
            or not math.isfinite(released):
        raise ValueError("no valid release time")
    if not isinstance(prefixes, list):
        raise ValueError("no list of prefixes")
    if len(prefixes) > MAX_PREFIXES:
        raise ValueError(f"{len(prefixes)} prefixes, more than {MAX_PREFIXES}")
    valid = (p for p in prefixes if isinstance(p, str) and _PREFIX_RE.fullmatch(p))
    return StudyList(name, endpoint, study, series, level, float(released),
                     tuple(dict.fromkeys(valid)))


def _set_aside(spool: Spool, path: Path, exc: Exception) -> None:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    log = logger.bind(endpoint=path.parent.name)
    try:
        spool.move(path, path.parent, path.name + BAD_SUFFIX)
        where = f"moved aside as {path.name}{BAD_SUFFIX}"
    except OSError as move_error:
        where = f"and cannot be moved aside ({move_error.strerror or move_error})"
    log.warning("study list {} is corrupt or unreadable ({}): skipped, {}", path.name,
                escape(why, limit=200), where)



