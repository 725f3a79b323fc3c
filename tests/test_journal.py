"""The journal's writer and store: schema and migrations, batching off the caller's
thread, and every way the database can fail (deleted, corrupt, too new, locked, a
queue that overflows, a kill -9) costing events, never the caller."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loguru import logger

from pipeline.journal import schema, store, writer
from pipeline.journal.events import RECEIVED, ROUTED, SENT
from pipeline.journal.writer import Journal, NoJournal, for_daemon
from tests.helpers import wait_for


@pytest.fixture
def warnings():
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    yield lines
    logger.remove(sink)


def rows(path: Path, columns: str = "kind, uid, file, endpoint, status") -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT {columns} FROM events ORDER BY id").fetchall()
    finally:
        conn.close()


def journal(tmp_path: Path, **kwargs) -> Journal:
    return Journal(store.journal_path(tmp_path), "test", **kwargs)


def test_a_new_journal_is_built_by_every_migration(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.record(RECEIVED, uid="1.2.3", file="a.dcm", calling="CT1", size=10)
    assert j.flush() == 1
    conn = sqlite3.connect(j.path)
    assert schema.version(conn) == schema.VERSION == len(schema.MIGRATIONS)
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"events_uid", "events_study", "events_at", "events_patient", "events_file"} <= indexes
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    kind, detail, daemon = conn.execute("SELECT kind, detail, daemon FROM events").fetchone()
    assert (kind, json.loads(detail), daemon) == (RECEIVED, {"calling": "CT1", "size": 10}, "test")
    assert stat.S_IMODE(os.stat(j.path).st_mode) == 0o600


def test_an_older_journal_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = store.journal_path(tmp_path)
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, target=1)
    conn.execute("INSERT INTO events (at, kind, daemon, uid) VALUES (1.0, 'received', 'old', '9.9')")
    conn.close()
    j = journal(tmp_path, phi=True)
    j.record(ROUTED, uid="9.9", patient_id="P1", accession="A1")
    j.flush()
    assert rows(path, "kind, uid, patient_id, accession") == [
        ("received", "9.9", None, None), ("routed", "9.9", "P1", "A1")]
    assert schema.version(sqlite3.connect(path)) == schema.VERSION


def test_patient_data_is_kept_only_with_journal_phi(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.record(ROUTED, uid="1.2", patient_id="P1", accession="A1", study="1.3")
    j.flush()
    assert rows(j.path, "patient_id, accession, study") == [(None, None, "1.3")]


def test_a_journal_from_a_newer_dicomflow_is_moved_aside(tmp_path: Path, warnings) -> None:
    path = store.journal_path(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    conn.close()
    j = journal(tmp_path)
    j.record(SENT, uid="1.2")
    assert j.flush() == 1
    asides = list(tmp_path.glob("journal.sqlite.newer-*"))
    assert len(asides) == 1
    assert schema.version(sqlite3.connect(asides[0])) == schema.VERSION + 1
    assert rows(path, "kind") == [("sent",)]
    assert len(warnings) == 1 and "moved aside" in warnings[0]


def test_a_deleted_journal_is_recreated_with_one_line(tmp_path: Path, warnings) -> None:
    """An operator's ``rm journal.sqlite`` while another daemon has it open too: the
    WAL and shared-memory files stay behind (SQLite leaves those of a database that is
    gone), and a new journal must not read them as its own."""
    j = journal(tmp_path)
    j.record(RECEIVED, uid="1")
    j.flush()
    other_daemon = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute(\"INSERT INTO events (at, kind, daemon) VALUES (1.0, 'received', 'other')\")\n"
         "print('open', flush=True)\ntime.sleep(120)\n", str(j.path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert other_daemon.stdout is not None and other_daemon.stdout.readline() == "open\n"
        j.path.unlink()
        assert Path(f"{j.path}-wal").exists() and Path(f"{j.path}-shm").exists()
        j.record(RECEIVED, uid="2")
        assert j.flush() == 1
        j.record(RECEIVED, uid="3")
        assert j.flush() == 1
        assert rows(j.path, "uid") == [("2",), ("3",)]
    finally:
        other_daemon.kill()
        other_daemon.wait()
    assert len(warnings) == 1 and "was deleted while in use: a new one is started" in warnings[0]


def test_a_corrupt_journal_is_moved_aside_and_recreated(tmp_path: Path, warnings) -> None:
    j = journal(tmp_path)
    j.record(RECEIVED, uid="1")
    j.flush()
    j._drop_connection()  # as after a restart: the damage is found on the next open
    for suffix in ("-wal", "-shm"):
        Path(f"{j.path}{suffix}").unlink(missing_ok=True)
    j.path.write_bytes(b"this is not SQLite at all " * 200)
    j.record(RECEIVED, uid="2")
    assert j.flush() == 1
    assert rows(j.path, "uid") == [("2",)]
    assert len(list(tmp_path.glob("journal.sqlite.corrupt-*"))) == 1
    assert len(warnings) == 1 and "corrupt" in warnings[0]


def test_corruption_found_while_writing_is_recovered(tmp_path: Path, warnings) -> None:
    j = journal(tmp_path)
    j.record(RECEIVED, uid="1")
    j.flush()
    # Overwrite the pages under an open connection: its next write finds them malformed.
    conn = sqlite3.connect(j.path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(j.path, "r+b") as f:
        f.seek(100)
        f.write(os.urandom(8000))
    for _ in range(3):
        j.record(RECEIVED, uid="2")
        j.flush()
    assert ("2",) in rows(j.path, "uid")
    assert list(tmp_path.glob("journal.sqlite.corrupt-*"))
    assert any("corrupt" in w for w in warnings)


def test_a_locked_journal_keeps_its_events_until_it_is_free(tmp_path: Path, monkeypatch,
                                                            warnings) -> None:
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.05)
    j = journal(tmp_path)
    j.record(RECEIVED, uid="1")
    j.flush()
    holder = sqlite3.connect(j.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    j._drop_connection()  # a fresh connection, with the short busy timeout
    for uid in ("2", "3"):
        j.record(RECEIVED, uid=uid)
        assert j.flush() == 0
    assert len(warnings) == 1 and "cannot" in warnings[0]
    holder.execute("ROLLBACK")
    holder.close()
    assert j.flush() == 2
    assert rows(j.path, "uid") == [("1",), ("2",), ("3",)]


def test_a_full_queue_drops_new_events_and_says_so(tmp_path: Path, warnings) -> None:
    j = journal(tmp_path, max_queued=3)
    for uid in "12345":
        j.record(RECEIVED, uid=uid)
    j.flush()
    assert rows(j.path, "uid") == [("1",), ("2",), ("3",)]
    assert len(warnings) == 1 and "2 event(s) dropped" in warnings[0]


def test_the_thread_writes_batches_and_close_writes_the_rest(tmp_path: Path) -> None:
    j = journal(tmp_path, flush_interval=0.05).start()
    j.record(RECEIVED, uid="1")
    wait_for(lambda: store.size_bytes(j.path) and rows(j.path, "uid") == [("1",)], timeout=30)
    j.flush_interval = 3600  # only close() may write the next one now
    j.record(SENT, uid="1", endpoint="pacs", status=0)
    j.close()
    assert rows(j.path, "kind, uid, endpoint, status")[-1] == ("sent", "1", "pacs", 0)


def test_retention_deletes_only_old_events(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.record(RECEIVED, uid="new")
    j.flush()
    conn = sqlite3.connect(j.path)
    with conn:
        conn.executemany("INSERT INTO events (at, kind, daemon, uid) VALUES (?, 'received', 'x', ?)",
                         [(time.time() - 100 * 86400, f"old{i}") for i in range(12000)])
    conn.close()
    j.request_prune(90 * 86400)
    j._prune()
    assert rows(j.path, "uid") == [("new",)]


def test_no_journal_records_nothing(tmp_path: Path) -> None:
    off = for_daemon(tmp_path, "filter", enabled=False, phi=False)
    assert isinstance(off, NoJournal)
    off.record(RECEIVED, uid="1")
    off.about(RECEIVED, "x.dcm")
    off.close()
    assert not store.journal_path(tmp_path).exists()


def test_about_reads_the_uid_from_a_spool_name(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.about(SENT, "20261203T120000.000001-000001-1.2.840.99.dcm", endpoint="pacs")
    j.about(SENT, "hand-dropped.dcm", endpoint="pacs")
    j.flush()
    assert rows(j.path, "uid, file") == [
        ("1.2.840.99", "20261203T120000.000001-000001-1.2.840.99.dcm"), (None, "hand-dropped.dcm")]


WRITER = """
import sys, time
from pathlib import Path
from pipeline.journal.writer import Journal
j = Journal(Path(sys.argv[1]), "child", flush_interval=0.01).start()
n = 0
while True:
    j.record("received", uid=f"1.{n}", file=f"{n}.dcm", size=n)
    n += 1
    if n % 200 == 0:
        time.sleep(0.001)
"""


def test_a_kill_9_never_corrupts_the_journal(tmp_path: Path) -> None:
    path = store.journal_path(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        wait_for(lambda: path.exists() and _count(path) > 5000, timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert count > 5000
    # what was committed is whole: consecutive from the first
    assert conn.execute("SELECT max(json_extract(detail, '$.size')) FROM events").fetchone()[0] == count - 1


def _count(path: Path) -> int:
    try:
        conn = sqlite3.connect(path, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize(("error", "wait"), [
    (sqlite3.OperationalError("database is locked"), 0.0),
    (sqlite3.OperationalError("disk I/O error"), writer.RETRY_SOON),
    (sqlite3.OperationalError("unable to open database file"), writer.RETRY_OPEN),
    (PermissionError(13, "Permission denied"), writer.RETRY_OPEN),
])
def test_a_journal_that_cannot_be_opened_is_tried_again_after(error: BaseException, wait: float) -> None:
    assert writer._retry_after(error) == wait
