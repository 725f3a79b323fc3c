"""Opening ``run/journal.sqlite``: create, migrate, and move aside one that is unusable.

Every daemon has its own connection to the one file (SQLite in WAL mode: readers never
wait for writers, writers take turns within ``busy_timeout``). ``synchronous=NORMAL``:
a commit is in the OS's hands before it returns, so a kill -9 loses nothing committed
and never corrupts the database (a power cut may lose the last commits, never the
spool's files — the spool is the truth, the journal its history).

Only :mod:`pipeline.spool` renames files (README, Layout): moving aside goes through
its ``rename_noreplace``. Creating, and moving aside a corrupt or too-new journal,
happen under an ``flock`` on ``run/journal.lock``, so that of several daemons finding
the same trouble one acts and logs, and the others open what it made.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.journal import schema
from pipeline.spool import rename_noreplace

FILE_NAME = "journal.sqlite"
LOCK_NAME = "journal.lock"
BUSY_TIMEOUT = 2.0        # seconds a writer waits for another's transaction
KEEP_ASIDE = 3            # journals moved aside that are kept (older ones are deleted)
SIDE_FILES = ("-wal", "-shm")
SQLITE_MAGIC = b"SQLite format 3\x00"
CREATED = "created"       # Opened.news of a journal this process made (none was there)
CORRUPT_WORDS = ("malformed", "not a database", "file is encrypted", "corrupt")


def journal_path(run_dir: Path) -> Path:
    return run_dir / FILE_NAME


def is_corruption(exc: BaseException) -> bool:
    """Whether an SQLite error says the file itself is damaged (not locked or full)."""
    if isinstance(exc, sqlite3.OperationalError):
        return False
    return isinstance(exc, sqlite3.DatabaseError) and any(
        word in str(exc).lower() for word in CORRUPT_WORDS)


@dataclass(frozen=True)
class Opened:
    """A connection, which file it is (to notice a deleted or replaced journal), and
    what happened on the way: :data:`CREATED`, a line to log, or ""."""

    conn: sqlite3.Connection
    identity: tuple[int, int]
    news: str


def identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_journal(path: Path, broken: tuple[int, int] | None = None) -> Opened:
    """Open (creating and migrating when needed) the journal at ``path``.

    ``broken``: the identity of a file this process found corrupt; if ``path`` is still
    that file it is moved aside first (another process may have done so already).
    Raises sqlite3.Error / OSError when it cannot be opened at all (the caller retries
    later and keeps its events meanwhile)."""
    news = ""
    with locked(path.parent):
        if broken is None and not _looks_like_sqlite(path):
            news = f"the journal was corrupt (not an SQLite file): moved aside to " \
                   f"{move_aside(path, 'corrupt')}; a new one is started"
        elif broken is not None and identity(path) == broken:
            news = f"the journal was corrupt: moved aside to {move_aside(path, 'corrupt')}; " \
                   "a new one is started"
        if identity(path) is None:
            _drop_orphaned_side_files(path)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            news = news or CREATED
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_mode = WAL")
            schema.migrate(conn)
        except schema.NewerSchema as exc:
            conn.close()
            news = f"the journal has {exc}: moved aside to {move_aside(path, 'newer')}; " \
                   "a new one is started"
            return _fresh(path, news)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if not is_corruption(exc):
                raise
            news = f"the journal was corrupt ({exc}): moved aside to " \
                   f"{move_aside(path, 'corrupt')}; a new one is started"
            return _fresh(path, news)
        found = identity(path)
        assert found is not None
        return Opened(conn, found, news)


def _looks_like_sqlite(path: Path) -> bool:
    """Missing, empty, or starting with SQLite's magic. Checked before SQLite opens it: a
    WAL left beside a file that is not the database it belongs to would be replayed
    into it (its pages read in place of the file's), hiding the damage."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return True
    return not head or head == SQLITE_MAGIC


def _drop_orphaned_side_files(path: Path) -> None:
    """Delete the WAL and shared-memory files of a journal that is gone (an operator's
    ``rm journal.sqlite``, or a kill -9 before it). SQLite never deletes them itself
    once their database has been unlinked or moved, and a new database beside them
    would read them as its own: a "disk I/O error", or the old pages in the new file.
    Connections still open on the old database keep their own descriptors, and their
    close leaves the names alone (SQLite checks that the database has not moved)."""
    for suffix in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _fresh(path: Path, news: str) -> Opened:
    """A new, empty journal in place of one just moved aside (the lock is held)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA journal_mode = WAL")
    schema.migrate(conn)
    found = identity(path)
    assert found is not None
    return Opened(conn, found, news)


def move_aside(path: Path, why: str) -> str:
    """Rename the journal and its WAL files to ``journal.sqlite.<why>-<UTC time>`` (a
    WAL left beside a new database would be replayed into it); keep the newest few."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while identity(target) is not None:
        n += 1
        target = path.with_name(f"{path.name}.{why}-{stamp}.{n}")
    for suffix in ("", *SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            rename_noreplace(Path(f"{path}{suffix}"), Path(f"{target}{suffix}"))
    _drop_old_asides(path)
    return target.name


def _drop_old_asides(path: Path) -> None:
    asides = sorted((p for p in path.parent.glob(f"{path.name}.*-*")
                     if not p.name.endswith(SIDE_FILES)),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in asides[KEEP_ASIDE:]:
        for suffix in ("", *SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{old}{suffix}")


def size_bytes(path: Path) -> int | None:
    """The journal's size on disk (database and WAL), None when there is none."""
    total = None
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total = (total or 0) + os.stat(f"{path}{suffix}").st_size
    return total
