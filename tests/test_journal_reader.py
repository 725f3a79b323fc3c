"""pipeline.journal.reader and .whereabouts: read-only look-ups, linking an instance's
events and files, and the one scan of the spool (issue 18)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.journal import reader, store
from pipeline.journal.whereabouts import scan, split_name
from pipeline.spool_names import SpoolName
from tests.journal_kit import Arrival, journal, make_spool, put


def test_split_name_agrees_with_the_spool_names() -> None:
    for uid in ("1.2.3", None):
        name = SpoolName.new(uid)
        assert split_name(str(name)) == (name.prefix, uid)
    for foreign in ("IMG0001", "x-1.2.dcm", "20261203T000000.000000-000001-1.2.dcm.error"):
        assert split_name(foreign) is None


def test_a_missing_journal_is_said_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "run" / "journal.sqlite"
    path.parent.mkdir()
    with pytest.raises(reader.JournalMissing, match="no journal"):
        reader.open_read(path)
    assert not path.exists()
    path.write_bytes(b"")  # created by a daemon that has not written yet
    with pytest.raises(reader.JournalMissing, match="no events yet"):
        reader.open_read(path)


def test_whereabouts_one_scan_of_every_stage(tmp_path: Path) -> None:
    _, spool = make_spool(tmp_path)
    arrival = Arrival.new("1.2.4.1")
    put(spool, "incoming", arrival.file)
    put(spool, "accepted/pacs", arrival.file)
    put(spool, "outbox/research", arrival.copy("2.25.5"))
    put(spool, "failed/ai", arrival.file, reason="refused")
    put(spool, "incoming", "IMG0001")  # a hand-dropped name: counted, not indexed
    where = scan(spool)
    assert where.count == 5
    states = {(p.relative, p.state) for p in where.by_prefix[arrival.name.prefix]}
    assert states == {(f"incoming/{arrival.file}", "queued"),
                      (f"accepted/pacs/{arrival.file}", "queued"),
                      (f"outbox/research/{arrival.copy('2.25.5')}", "queued"),
                      (f"failed/ai/{arrival.file}", "failed")}
    failed = next(p for p in where.by_uid[arrival.uid] if p.stage == "failed")
    assert failed.reason() == "refused"
    assert [p.relative for p in where.by_uid["2.25.5"]] == [f"outbox/research/{arrival.copy('2.25.5')}"]


def test_link_follows_copy_uids_and_prefixes_and_keeps_arrivals_apart(tmp_path: Path) -> None:
    _, spool = make_spool(tmp_path)
    j = journal(spool)
    first, again = Arrival.new("1.2.4.7"), Arrival.new("1.2.4.7")  # the same image sent twice
    for arrival in (first, again):
        arrival.received(j)
        arrival.routed(j, ["research"])
    j.record("shaped", uid=first.uid, file=first.copy("2.25.8"), endpoint="research",
             copy_uid="2.25.8", shaping=["deidentify"])
    first.sent(j, "research", uid="2.25.8")
    j.record("received", uid="1.2.4.99", file=str(SpoolName.new("1.2.4.99")))  # someone else
    j.flush()
    j.close()
    put(spool, "outbox/research", again.copy("2.25.9"))  # its shaped event lost
    conn = reader.open_read(store.journal_path(spool.run_dir))
    try:
        instances = reader.link(conn, {"1.2.4.7"}, scan(spool))
    finally:
        conn.close()
    assert [i.prefixes for i in instances] == [{first.name.prefix}, {again.name.prefix}]
    assert [i.uid for i in instances] == ["1.2.4.7", "1.2.4.7"]
    assert instances[0].uids == {"1.2.4.7", "2.25.8"}
    assert [e.kind for e in instances[0].events] == ["received", "routed", "shaped", "sent"]
    assert instances[1].uids == {"1.2.4.7", "2.25.9"} and len(instances[1].places) == 1


def test_events_by_prefix_are_exactly_that_arrivals_and_use_the_file_index(tmp_path: Path) -> None:
    _, spool = make_spool(tmp_path)
    j = journal(spool)
    one, other = Arrival.new("1.2.4.1"), Arrival.new("1.2.4.2")
    for arrival in (one, other):
        arrival.received(j)
        arrival.sent(j, "pacs", uid="2.25.1" if arrival is one else None)
    j.flush()
    j.close()
    conn = reader.open_read(store.journal_path(spool.run_dir))
    try:
        found = reader.events_with_prefixes(conn, {one.name.prefix})
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT id FROM events WHERE file >= ? AND file < ?",
                            ("a-", "a.")).fetchall()
    finally:
        conn.close()
    assert [(e.kind, e.uid) for e in found] == [("received", "1.2.4.1"), ("sent", "2.25.1")]
    assert "events_file" in " ".join(str(row[-1]) for row in plan)


def test_stream_and_counts_read_a_window_in_time_order(tmp_path: Path) -> None:
    _, spool = make_spool(tmp_path)
    j = journal(spool)
    for n in range(3):
        j.record("received", uid=f"1.2.4.{n}")
    j.flush()
    j.close()
    conn = reader.open_read(store.journal_path(spool.run_dir))
    try:
        since = time.time() - 60
        assert reader.count_since(conn, since) == 3
        assert [row[4] for row in reader.stream(conn, since)] == ["1.2.4.0", "1.2.4.1", "1.2.4.2"]
        assert reader.count_since(conn, time.time() + 60) == 0
        assert reader.earliest(conn, {"1.2.4.1", "9.9"}) is not None
        assert reader.earliest(conn, {"9.9"}) is None
    finally:
        conn.close()
