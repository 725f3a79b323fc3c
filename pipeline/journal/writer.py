"""A daemon's journal writer: events queued on the data path, written by a thread.

:meth:`Journal.record` only builds a tuple and appends it to a bounded queue — it never
touches SQLite, never blocks and never raises, so an acknowledgement never waits for
the journal. A thread of its own writes what is queued every :data:`FLUSH_INTERVAL`
(one transaction per batch), so a kill -9 loses at most the last second of events.

Whatever goes wrong with the database costs events, never images, and is said once:

- locked beyond ``busy_timeout``, or the disk full: the batch is kept and written
  later; if the queue reaches :data:`MAX_QUEUED` new events are dropped and counted;
- deleted (an operator's ``rm``) or replaced: noticed at the next write, a new one is
  opened;
- corrupt: moved aside and a new one started (:mod:`pipeline.journal.store`).

Retention runs here too (:meth:`Journal.request_prune`), in slices of
:data:`PRUNE_SLICE` rows, so that other daemons' writes never wait long behind it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.journal import schema, store
from pipeline.journal.events import DELETED, Event
from pipeline.log import escape, logger
from pipeline.spool_names import SpoolName

FLUSH_INTERVAL = 0.5     # seconds between writes (a kill -9 loses at most this, and a write)
MAX_BATCH = 5000         # events per transaction
MAX_QUEUED = 200_000     # events kept while the database cannot take them (~100 MB)
RETRY_OPEN = 30.0        # seconds between attempts to open a journal that cannot be opened
RETRY_SOON = 2.0         # ... after an I/O error
CLOSE_WAIT = 5.0         # seconds close() waits for the last write
PRUNE_SLICE = 5000       # rows deleted per transaction by retention


class Journal:
    """The journal of one daemon (``daemon``: its process name, recorded with each event)."""

    def __init__(self, path: Path, daemon: str, *, phi: bool = False,
                 flush_interval: float = FLUSH_INTERVAL, max_queued: int = MAX_QUEUED) -> None:
        self.path = path
        self.daemon = daemon
        self.phi = phi
        self.flush_interval = flush_interval
        self.max_queued = max_queued
        self._queue: deque[Event] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._opened: store.Opened | None = None
        self._broken: tuple[int, int] | None = None
        self._next_open = 0.0
        self._prune_before: float | None = None
        self._dropped = 0
        self._trouble = ""        # what was last said about the database ("" = all well)
        self._opened_before = False  # a journal missing after this was deleted while in use
        self.written = 0

    # -- the data path ---------------------------------------------------------------

    def record(self, kind: str, *, uid: str | None = None, file: str | None = None,
               endpoint: str | None = None, study: str | None = None,
               series: str | None = None, status: int | None = None,
               patient_id: str | None = None, accession: str | None = None,
               **detail: Any) -> None:
        """Queue one event (cheap; never blocks, never raises)."""
        if len(self._queue) >= self.max_queued:
            self._dropped += 1
            return
        if not self.phi:
            patient_id = accession = None
        self._queue.append(Event(time.time(), kind, self.daemon, uid or None, file, endpoint,
                                 study or None, series or None, status, detail,
                                 patient_id or None, accession or None))
        if len(self._queue) >= MAX_BATCH:
            self._wake.set()

    def about(self, kind: str, name: str, **fields: Any) -> None:
        """An event of the spool file ``name``: its SOP Instance UID read from the
        standard name (the caller may give ``uid=`` instead)."""
        if fields.get("uid") is None:
            parsed = SpoolName.parse(name)
            fields["uid"] = parsed.uid if parsed is not None else None
        self.record(kind, file=name, **fields)

    def deleted_from_sent(self, why: str) -> Callable[[Path], None]:
        """What :meth:`pipeline.spool.Spool.prune_sent` calls for each deleted copy."""
        def deleted(path: Path) -> None:
            self.about(DELETED, path.name, endpoint=path.parent.name, why=why)
        return deleted

    def request_prune(self, older_than: float) -> None:
        """Delete the events older than ``older_than`` seconds, on the writer's thread."""
        self._prune_before = time.time() - older_than
        self._wake.set()

    # -- the thread --------------------------------------------------------------------

    def start(self) -> Journal:
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Write what is queued (within :data:`CLOSE_WAIT`), then close the database."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT)
        elif self._queue:
            self.flush()
        if self._queue:
            logger.warning("journal: {} event(s) not written at shutdown", len(self._queue))
        if self._opened is not None and (self._thread is None or not self._thread.is_alive()):
            self._opened.conn.close()
            self._opened = None

    def _run(self) -> None:
        try:  # at once: a journal deleted later is then told from a new spool's first
            self._connection()
        except Exception as exc:  # noqa: BLE001 - the journal never takes a daemon down
            self._say(f"journal: unexpected error: {type(exc).__name__}: {exc}")
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stop
            try:
                self.flush()
                if self._prune_before is not None:
                    self._prune()
            except Exception as exc:  # noqa: BLE001 - the journal never takes a daemon down
                self._say(f"journal: unexpected error, events kept: {type(exc).__name__}: {exc}")
            if stopping:
                return

    def flush(self) -> int:
        """Write every queued event now (the thread's work; tests call it directly)."""
        written = 0
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            if not self._write(batch):
                self._queue.extendleft(reversed(batch))
                break
            written += len(batch)
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            self._say(f"journal: {dropped} event(s) dropped: {len(self._queue)} were waiting "
                      "for the database (reconcile recovers them from the spool)")
        return written

    def _write(self, batch: list[Event]) -> bool:
        conn = self._connection()
        if conn is None:
            return False
        rows = [(*event[:9], json.dumps(event.detail, separators=(",", ":")), *event[10:])
                for event in batch]
        try:
            conn.execute("BEGIN")
            conn.executemany(schema.INSERT, rows)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(conn, exc)
            return False
        self.written += len(batch)
        if self._trouble:
            logger.info("journal: writing again ({} event(s) waited)", len(batch))
            self._trouble = ""
        return True

    def _failed(self, conn: sqlite3.Connection, exc: sqlite3.Error) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        if store.is_corruption(exc) and self._opened is not None:
            self._broken = self._opened.identity
            self._drop_connection()
            self._next_open = 0.0
            return
        self._say(f"journal: cannot write ({escape(exc)}); events are kept and written later")

    def _connection(self) -> sqlite3.Connection | None:
        """The open database — reopened when it was deleted, replaced or found corrupt."""
        if self._opened is not None and store.identity(self.path) != self._opened.identity:
            self._drop_connection()  # rm'd by an operator, or moved aside by another daemon
            self._next_open = 0.0
        if self._opened is None:
            if time.monotonic() < self._next_open:
                return None
            try:
                self._opened = store.open_journal(self.path, self._broken)
            except (sqlite3.Error, OSError) as exc:
                self._next_open = time.monotonic() + _retry_after(exc)
                self._say(f"journal: cannot open {self.path} ({escape(exc)}); events are kept "
                          f"and written when it can be")
                return None
            self._broken = None
            self._tell(self._opened.news)
            self._opened_before = True
        return self._opened.conn

    def _tell(self, news: str) -> None:
        """What opening found, said by the one daemon that acted on it."""
        if news == store.CREATED and self._opened_before:
            logger.warning("journal: {} was deleted while in use: a new one is started", self.path)
        elif news == store.CREATED:  # a new spool, or deleted while the router was stopped
            logger.info("journal: new journal {}", self.path)
        elif news:
            logger.warning("journal: {}", news)

    def _drop_connection(self) -> None:
        if self._opened is not None:
            try:
                self._opened.conn.close()
            except sqlite3.Error:
                pass
            self._opened = None

    def _prune(self) -> None:
        before, self._prune_before = self._prune_before, None
        conn = self._connection()
        if conn is None or before is None:
            return
        deleted = 0
        try:
            while True:
                cursor = conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? LIMIT ?)",
                    (before, PRUNE_SLICE))
                deleted += cursor.rowcount
                if cursor.rowcount < PRUNE_SLICE or self._stop:
                    break
        except sqlite3.Error as exc:
            self._failed(conn, exc)
        if deleted:
            logger.info("journal: {} event(s) older than the retention deleted", deleted)

    def _say(self, message: str) -> None:
        """One WARNING per kind of trouble, not one per batch."""
        kind = message.split("(")[0]
        if kind != self._trouble:
            logger.warning("{}", message)
            self._trouble = kind


def _retry_after(exc: BaseException) -> float:
    """Seconds before opening again: at once when another daemon held the lock, soon
    after an I/O error (often passing: a disk remounted, files moved under us), else
    :data:`RETRY_OPEN` (a full disk or a bad permission does not mend in a second)."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return 0.0
    if isinstance(exc, sqlite3.OperationalError) and "disk i/o error" in text:
        return RETRY_SOON
    return RETRY_OPEN


class NoJournal(Journal):
    """``[router] journal = false`` (and tests that need none): records nothing."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"), "none")

    def record(self, kind: str, **fields: Any) -> None:  # type: ignore[override]
        return None

    def about(self, kind: str, name: str, **fields: Any) -> None:
        return None

    def request_prune(self, older_than: float) -> None:
        return None

    def start(self) -> Journal:
        return self

    def close(self) -> None:
        return None


def for_daemon(run_dir: Path, daemon: str, enabled: bool, phi: bool) -> Journal:
    """The started journal of one daemon, or :class:`NoJournal` when it is off."""
    if not enabled:
        return NoJournal()
    return Journal(store.journal_path(run_dir), daemon, phi=phi).start()
