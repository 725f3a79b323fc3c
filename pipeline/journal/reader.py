"""Reading the journal back: an instance's events, a study's, and a stream for reconcile.

Read-only: a missing journal is said (:class:`JournalMissing`), never created — an
operator's look-up must not leave an empty journal behind that hides where the real
one went. Every look-up goes through an index (uid, study, at, patient_id, accession);
UIDs are asked for in batches, never one query per row.

An instance's events are linked by three things, because its copies do not all carry
its UID: the UID itself, each ``shaped`` event's ``copy_uid`` (a de-identified copy has
a new one), and the ``<time>-<counter>`` prefix that every copy of one arrival shares in
its file name — which links a copy whose ``shaped`` event was lost, through the files
the spool still holds (:mod:`pipeline.journal.whereabouts`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.journal import events as kinds
from pipeline.journal.whereabouts import Place, Whereabouts, split_name

BATCH = 500               # UIDs per IN (...) query (SQLite allows 32766 variables)
BUSY_TIMEOUT = 5.0        # seconds a read waits for a writer's checkpoint
FIELDS = "id, at, kind, daemon, uid, file, endpoint, study, series, status, detail"


class JournalMissing(Exception):
    """There is no journal to read (never created here: that would hide the real one)."""


@dataclass(frozen=True)
class Entry:
    """One event read back; ``detail`` already decoded."""

    id: int
    at: float
    kind: str
    daemon: str
    uid: str | None
    file: str | None
    endpoint: str | None
    study: str | None
    series: str | None
    status: int | None
    detail: dict[str, Any]

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Entry:
        id_, at, kind, daemon, uid, file, endpoint, study, series, status, detail = row
        return cls(id_, at, kind, daemon, uid, file, endpoint, study, series, status,
                   decode_detail(detail))

    @property
    def prefix(self) -> str | None:
        return file_prefix(self.file)

    @property
    def copy_uid(self) -> str | None:
        value = self.detail.get("copy_uid") if self.kind == kinds.SHAPED else None
        return value if isinstance(value, str) and value else None

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "daemon": self.daemon, "uid": self.uid,
                "file": self.file, "endpoint": self.endpoint, "study": self.study,
                "series": self.series, "status": self.status, "detail": self.detail}


def decode_detail(text: str | None) -> dict[str, Any]:
    """An event's detail object ({} for one that is not: a journal is history, not trusted)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def file_prefix(name: str | None) -> str | None:
    parts = split_name(name) if name else None
    return parts[0] if parts else None


def open_read(path: Path) -> sqlite3.Connection:
    """The journal at ``path``, read-only; :class:`JournalMissing` when there is none."""
    if not path.is_file():
        raise JournalMissing(f"no journal at {path} (is [router] journal on, has the "
                             "router run since?)")
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                           timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        found = conn.execute("SELECT name FROM sqlite_master WHERE name = 'events'").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise JournalMissing(f"the journal {path} cannot be read: {exc}") from exc
    if found is None:
        conn.close()
        raise JournalMissing(f"the journal {path} has no events yet")
    return conn


def events_for(conn: sqlite3.Connection, uids: Collection[str]) -> list[Entry]:
    """Every event of these UIDs, oldest first."""
    found: list[Entry] = []
    ordered = sorted(uids)
    for start in range(0, len(ordered), BATCH):
        chunk = ordered[start:start + BATCH]
        rows = conn.execute(f"SELECT {FIELDS} FROM events WHERE uid IN "
                            f"({', '.join('?' * len(chunk))})", chunk)
        found.extend(Entry.from_row(row) for row in rows)
    found.sort(key=lambda e: (e.at, e.id))
    return found


def events_with_prefixes(conn: sqlite3.Connection, prefixes: Collection[str]) -> list[Entry]:
    """Every event of a file named ``<prefix>-…``: one range of the file index per prefix
    (``-`` sorts just before ``.``, so the range is exactly the names with that prefix)."""
    found: list[Entry] = []
    for prefix in sorted(prefixes):
        rows = conn.execute(f"SELECT {FIELDS} FROM events WHERE file >= ? AND file < ?",
                            (f"{prefix}-", f"{prefix}."))
        found.extend(Entry.from_row(row) for row in rows)
    return found


def uids_where(conn: sqlite3.Connection, column: str, value: str) -> set[str]:
    """The UIDs of the events whose ``column`` (study, patient_id, accession) is ``value``."""
    if column not in ("study", "patient_id", "accession"):
        raise ValueError(f"no look-up by {column!r}")
    rows = conn.execute(f"SELECT DISTINCT uid FROM events WHERE {column} = ? "
                        "AND uid IS NOT NULL", (value,))
    return {row[0] for row in rows}


def count_since(conn: sqlite3.Connection, since: float) -> int:
    return int(conn.execute("SELECT count(*) FROM events WHERE at >= ?", (since,)).fetchone()[0])


def earliest(conn: sqlite3.Connection, uids: Collection[str]) -> float | None:
    """The time of the oldest event of any of ``uids`` (None: none has one)."""
    oldest: float | None = None
    ordered = sorted(uids)
    for start in range(0, len(ordered), BATCH):
        chunk = ordered[start:start + BATCH]
        row = conn.execute(f"SELECT min(at) FROM events WHERE uid IN "
                           f"({', '.join('?' * len(chunk))})", chunk).fetchone()
        if row[0] is not None and (oldest is None or row[0] < oldest):
            oldest = float(row[0])
    return oldest


def stream(conn: sqlite3.Connection, since: float) -> Iterator[tuple[Any, ...]]:
    """Every event from ``since`` on, in time order, as raw rows (``FIELDS``; detail not
    decoded: most rows never need it). One query, read as it goes."""
    cursor = conn.execute(f"SELECT {FIELDS} FROM events WHERE at >= ? ORDER BY at, id",
                          (since,))
    while True:
        rows = cursor.fetchmany(5000)
        if not rows:
            return
        yield from rows


# -- linking an instance's events and files ---------------------------------------------

@dataclass
class Instance:
    """One arrival: its UIDs (its own, its copies'), its name prefixes, events and files."""

    uid: str | None
    uids: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    events: list[Entry] = field(default_factory=list)
    places: list[Place] = field(default_factory=list)

    @property
    def study(self) -> str | None:
        return next((e.study for e in self.events if e.study), None)

    @property
    def series(self) -> str | None:
        return next((e.series for e in self.events if e.series), None)


def link(conn: sqlite3.Connection | None, seeds: set[str], where: Whereabouts) -> list[Instance]:
    """The instances of ``seeds`` (SOP Instance UIDs), each with every event and file that
    belongs to it, oldest arrival first.

    Grows the sets of UIDs and prefixes until nothing new turns up: a seed's events name
    its copies' UIDs (``shaped``) and prefixes (file names); the events of files with
    those prefixes name the UID it arrived with (a de-identified copy's own events name
    only its new UID); the spool's files with those prefixes name more UIDs (a copy
    whose ``shaped`` event was lost), and so on. ``conn`` None: there is no journal, the
    spool alone is asked."""
    uids, prefixes = set(seeds), set[str]()
    asked_uids, asked_prefixes, entries = set[str](), set[str](), dict[int, Entry]()
    while uids - asked_uids or prefixes - asked_prefixes:
        new_uids, new_prefixes = uids - asked_uids, prefixes - asked_prefixes
        asked_uids |= new_uids
        asked_prefixes |= new_prefixes
        found = ([*events_for(conn, new_uids), *events_with_prefixes(conn, new_prefixes)]
                 if conn is not None else [])
        for entry in found:
            entries[entry.id] = entry
            uids.update(u for u in (entry.uid, entry.copy_uid) if u)
            if entry.prefix:
                prefixes.add(entry.prefix)
        _spread(where, uids, prefixes)
    return _group(seeds, list(entries.values()), where.of(uids, prefixes))


def _spread(where: Whereabouts, uids: set[str], prefixes: set[str]) -> None:
    """Add the UIDs and prefixes of the files named with any of them, until none is new."""
    size = -1
    while size != len(uids) + len(prefixes):
        size = len(uids) + len(prefixes)
        for place in where.of(uids, prefixes):
            if place.uid:
                uids.add(place.uid)
            if place.prefix:
                prefixes.add(place.prefix)


def _group(seeds: set[str], entries: list[Entry], places: list[Place]) -> list[Instance]:
    """One :class:`Instance` per arrival — per name prefix, since the same image sent
    twice is two arrivals under one UID; what has no prefix joins the latest arrival
    before it that has its UID (or stands alone)."""
    groups: dict[str, Instance] = {}
    loose: list[Entry] = []
    for entry in sorted(entries, key=lambda e: (e.at, e.id)):
        if entry.prefix is None:
            loose.append(entry)
            continue
        instance = groups.setdefault(entry.prefix, Instance(None, prefixes={entry.prefix}))
        instance.events.append(entry)
        instance.uids.update(u for u in (entry.uid, entry.copy_uid) if u)
    for place in places:
        key = place.prefix or f"u:{place.uid}"
        instance = groups.setdefault(key, Instance(None))
        if place.prefix:
            instance.prefixes.add(place.prefix)
        instance.places.append(place)
        if place.uid:
            instance.uids.add(place.uid)
    for entry in loose:
        _attach(groups, entry)
    _join_renamed(groups)
    for instance in groups.values():
        instance.events.sort(key=lambda e: (e.at, e.id))
        instance.uid = _original(instance, seeds)
    return sorted(groups.values(), key=_arrival)


def _join_renamed(groups: dict[str, Instance]) -> None:
    """A prefix with no ``received`` or ``routed`` event of its own — a copy renamed on a
    clash in its stage (:func:`pipeline.spool.fresh_name_like`), its events and files —
    joins the latest arrival of its UID, as ``reconcile`` counts it."""
    arrivals = [i for i in groups.values() if _arrived(i)]
    for key, instance in list(groups.items()):
        mine = [a for a in arrivals if instance.uids & a.uids] if not _arrived(instance) else []
        if mine:
            owner = max(mine, key=_arrival)
            owner.events += instance.events
            owner.places += instance.places
            owner.prefixes |= instance.prefixes
            owner.uids |= instance.uids
            del groups[key]


def _arrived(instance: Instance) -> bool:
    return any(e.kind in (kinds.RECEIVED, kinds.ROUTED) for e in instance.events)


def _attach(groups: dict[str, Instance], entry: Entry) -> None:
    """An event without a spool file name: to the latest arrival of its UID before it."""
    if entry.uid is None:
        return
    mine = [i for i in groups.values() if entry.uid in i.uids]
    before = [i for i in mine if i.events and i.events[0].at <= entry.at]
    if before or mine:
        max(before or mine, key=_arrival).events.append(entry)
        return
    groups[f"u:{entry.uid}"] = Instance(None, uids={entry.uid}, events=[entry])


def _original(instance: Instance, seeds: set[str]) -> str | None:
    """The UID it arrived with: its ``received``/``routed`` event's, else a seed's."""
    for kind in (kinds.RECEIVED, kinds.ROUTED):
        for entry in instance.events:
            if entry.kind == kind and entry.uid:
                return entry.uid
    copies = {e.copy_uid for e in instance.events if e.copy_uid}
    candidates = sorted((instance.uids & seeds) - copies) or sorted(instance.uids - copies)
    return candidates[0] if candidates else None


def _arrival(instance: Instance) -> tuple[str, float]:
    first = instance.events[0].at if instance.events else 0.0
    return (min(instance.prefixes) if instance.prefixes else "", first)



#: how far back :func:`latest` looks (rows by id): a page load stays cheap on a big journal
LATEST_WINDOW = 200_000


def latest(conn: sqlite3.Connection, wanted: Collection[str], limit: int) -> list[Entry]:
    """The newest ``limit`` events of these kinds among the journal's last
    :data:`LATEST_WINDOW` rows, newest first (the status page's last failures)."""
    names = sorted(wanted)
    rows = conn.execute(
        f"SELECT {FIELDS} FROM events WHERE id > (SELECT coalesce(max(id), 0) FROM events) - ? "
        f"AND kind IN ({', '.join('?' * len(names))}) ORDER BY id DESC LIMIT ?",
        (LATEST_WINDOW, *names, limit))
    return [Entry.from_row(row) for row in rows]
