"""The journal's schema, built and upgraded by numbered migrations only.

A new journal is created by running every migration from version 0, and an older one
is brought up to date by running the ones it lacks, so the path an upgrade takes is the
path every fresh journal takes too (and the tests run it). The version lives in SQLite's
``PRAGMA user_version``. A journal newer than this code (written by a later DicomFlow,
then downgraded) is never written to: :class:`NewerSchema`, and the store moves it
aside rather than guess what its columns mean.

One table: one row per event of an instance (:mod:`pipeline.journal.events`). The
columns are what trace and reconcile look things up by; everything else about an event
is one small JSON object in ``detail``.
"""

from __future__ import annotations

import sqlite3

#: migration N (index N - 1) takes a journal from version N - 1 to N
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the events, looked up by instance, by study and by time
    (
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            daemon TEXT NOT NULL,
            uid TEXT,
            file TEXT,
            endpoint TEXT,
            study TEXT,
            series TEXT,
            status INTEGER,
            detail TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX events_uid ON events (uid)",
        "CREATE INDEX events_study ON events (study) WHERE study IS NOT NULL",
        "CREATE INDEX events_at ON events (at)",
    ),
    # 2: journal_phi — Patient ID and Accession Number, for look-ups (NULL unless on)
    (
        "ALTER TABLE events ADD COLUMN patient_id TEXT",
        "ALTER TABLE events ADD COLUMN accession TEXT",
        "CREATE INDEX events_patient ON events (patient_id) WHERE patient_id IS NOT NULL",
        "CREATE INDEX events_accession ON events (accession) WHERE accession IS NOT NULL",
    ),
    # 3: by file name — every copy of one arrival shares its name's prefix, including a
    # de-identified copy under a new UID whose events name only that UID
    (
        "CREATE INDEX events_file ON events (file) WHERE file IS NOT NULL",
    ),
)
VERSION = len(MIGRATIONS)

#: the columns an event is written with, in this order (pipeline.journal.events.Event)
COLUMNS = ("at", "kind", "daemon", "uid", "file", "endpoint", "study", "series", "status",
           "detail", "patient_id", "accession")
INSERT = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class NewerSchema(Exception):
    """The journal was written by a newer DicomFlow (its version is higher than ours)."""

    def __init__(self, found: int) -> None:
        super().__init__(f"schema version {found}, this DicomFlow knows up to {VERSION}")
        self.found = found


def version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int = VERSION) -> int:
    """Bring the journal to ``target`` (default: this code's version); returns the
    version it had. One transaction that takes the write lock first, so that two
    daemons starting together cannot both run a migration."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = version(conn)
        if found > VERSION:
            raise NewerSchema(found)
        for number in range(found + 1, target + 1):
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
        if target > found:
            conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
