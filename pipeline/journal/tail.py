"""The journal's new events, in the order they were written: what ``/metrics`` counts.

Prometheus counters must only go up, and the stage folders shrink (retention prunes
``sent/``), so the web daemon counts events, not files. A :class:`Tail` starts at the
journal's end (a web daemon restarting is a counter reset, as Prometheus expects) and
on each :meth:`Tail.read` returns the events written since, by ``id``. A journal that
appears later, or is replaced (deleted by an operator, moved aside as corrupt and
recreated), is read from its first event: everything in it is new.

Read-only and cheap: one indexed range query on the primary key, a bounded number of
rows per call, the two numbers a histogram needs taken out of ``detail`` by SQLite's
``json_extract`` rather than by parsing each event's JSON in Python.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from pipeline.journal import store
from pipeline.log import logger

BUSY_TIMEOUT = 1.0   # seconds a read waits for a writer's lock (WAL readers rarely wait)
MAX_ROWS = 20_000    # events per read (the caller reads again while it gets this many)
QUERY = ("SELECT id, kind, endpoint, status, json_extract(detail, '$.size'), "
         "json_extract(detail, '$.duration') FROM events WHERE id > ? ORDER BY id LIMIT ?")


class TailEvent(NamedTuple):
    """What a counter or histogram needs of one event."""

    id: int
    kind: str
    endpoint: str | None
    status: int | None
    size: float | None
    duration: float | None


class Tail:
    """New events of the journal at ``path`` since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # the file the connection is on
        self._counted: tuple[int, int] | None = None   # the file ``_last`` is a position in
        self._last = 0
        self._started = False  # the first look positions at the end of what is there
        self._trouble = ""     # the last trouble said (one WARNING per kind, not per scrape)

    def begin(self) -> Tail:
        """Start counting now: what the journal holds already is history (called when
        the counters are made, not at the first scrape — the events in between count)."""
        self._connection()
        return self

    def read(self, limit: int = MAX_ROWS) -> list[TailEvent]:
        """Up to ``limit`` events written since the last call ([] when there is no
        journal, or it cannot be read now: the next call tries again, from where this
        one stood)."""
        conn = self._connection()
        if conn is None:
            return []
        try:
            rows = conn.execute(QUERY, (self._last, limit)).fetchall()
            if not rows:
                self._after_prune(conn)
        except sqlite3.Error as exc:
            self._say(f"journal: cannot read {self.path} for /metrics ({exc}); counting "
                      "resumes where it stopped")
            self._close()  # opened afresh next time; the same file keeps its position
            return []
        if self._trouble:
            logger.info("journal: reading {} for /metrics again", self.path)
            self._trouble = ""
        events = [TailEvent(int(r[0]), str(r[1]), r[2], _int(r[3]), _float(r[4]), _float(r[5]))
                  for r in rows]
        if events:
            self._last = events[-1].id
        return events

    def _after_prune(self, conn: sqlite3.Connection) -> None:
        """Retention deleting every row lets SQLite give out ids from 1 again (the table
        has no AUTOINCREMENT): a highest id below our position means they restarted."""
        top = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        if int(top) < self._last:
            self._last = 0

    def _connection(self) -> sqlite3.Connection | None:
        found = store.identity(self.path)
        if found is None:
            self._started = True  # no journal (yet, or any more): whatever comes is new
        if found != self._identity:
            self._close()
            if found is not None:
                self._open(found)
        return self._conn

    def _open(self, identity: tuple[int, int]) -> None:
        try:
            conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True,
                                   timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            self._say(f"journal: cannot open {self.path} for /metrics ({exc})")
            return  # asked again at the next read
        try:
            top = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            if "no such table" in str(exc):
                self._started = True  # a journal being created: its events will all be new
            else:
                self._say(f"journal: cannot read {self.path} for /metrics ({exc})")
            return  # not ready, or unreadable now: asked again at the next read
        if identity != self._counted:  # the same file reopened keeps its position
            self._last = 0 if self._started else int(top)
            self._counted = identity
        self._started = True
        self._conn, self._identity = conn, identity

    def _say(self, message: str) -> None:
        kind = message.split("(")[0]
        if kind != self._trouble:
            logger.warning("{}", message)
            self._trouble = kind

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn, self._identity = None, None

    def close(self) -> None:
        self._close()


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
