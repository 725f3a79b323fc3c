"""``dicomflow reconcile``: synthetic journals crossed with real spool folders (issue 18).

Each state an instance can be in on an endpoint, the events a crash can lose (recovered
from the files), de-identified copies (another UID, the same prefix), the window, the
``--acknowledged`` list, and the exit codes through the real command.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from pipeline.journal import store
from pipeline.spool import fresh_name_like
from services import reconcile, trace
from tests.helpers import run_cli
from tests.journal_kit import Arrival, damage, journal, make_spool, put

DAY = 86400.0


def age(spool, uid: str, seconds: float) -> None:
    """Make the events of ``uid`` older (as if written ``seconds`` ago)."""
    with sqlite3.connect(store.journal_path(spool.run_dir)) as conn:
        conn.execute("UPDATE events SET at = at - ? WHERE uid = ?", (seconds, uid))


def outcome_map(result: dict) -> dict:
    return {(row["uid"], row["endpoint"]): row for row in result["failed"] + result["unaccounted"]}


@pytest.fixture
def scene(tmp_path: Path):
    """A spool where every state occurs once; returns (conf, spool, arrivals by letter)."""
    conf, spool = make_spool(tmp_path)
    j = journal(spool)
    a = {k: Arrival.new(f"1.2.9.{n}") for n, k in enumerate("ABCDEHIKW", 1)}
    # A: delivered to pacs (event), failed on ai (file + .error)
    a["A"].received(j)
    a["A"].routed(j, ["pacs", "ai"], refused={"research": "Modality is not MR"})
    a["A"].sent(j, "pacs")
    put(spool, "sent/pacs", a["A"].file)
    put(spool, "failed/ai", a["A"].file, reason="0xA700 out of resources (5 tries)")
    # B: queued in outbox/pacs
    a["B"].received(j)
    a["B"].routed(j, ["pacs"])
    put(spool, "outbox/pacs", a["B"].file)
    # C: routed event lost in a crash, the copy delivered
    a["C"].received(j)
    put(spool, "sent/pacs", a["C"].file)
    # D: routed to pacs, then nothing: no event, no file — lost
    a["D"].received(j)
    a["D"].routed(j, ["pacs"])
    # E: quarantined, with its reason
    a["E"].received(j)
    j.record("quarantined", uid=a["E"].uid, file=a["E"].file, reason="truncated file")
    put(spool, "quarantine", a["E"].file, reason="truncated file")
    # H: de-identified for research: the sent event carries the copy's UID only
    a["H"].received(j)
    a["H"].routed(j, ["research"])
    j.record("shaped", uid=a["H"].uid, file=a["H"].copy("2.25.1"), endpoint="research",
             copy_uid="2.25.1", shaping=["deidentify"])
    a["H"].sent(j, "research", uid="2.25.1")
    # I: de-identified, its shaped AND sent events lost: the copy in sent/ is linked by prefix
    a["I"].received(j)
    a["I"].routed(j, ["research"])
    put(spool, "sent/research", a["I"].copy("2.25.2"))
    # K: delivered, then deleted from sent/ by retention
    a["K"].received(j)
    a["K"].routed(j, ["pacs"])
    a["K"].sent(j, "pacs")
    j.record("deleted", uid=a["K"].uid, file=a["K"].file, endpoint="pacs", why="retention")
    # W: pacs now, ai waits for its study (the original stays in accepted/)
    a["W"].received(j)
    a["W"].routed(j, ["pacs"], waiting=["ai"])
    a["W"].sent(j, "pacs")
    put(spool, "accepted", a["W"].file)
    j.flush()
    j.close()
    return conf, spool, a


def test_every_state_is_told_apart(scene) -> None:
    _, spool, a = scene
    books, warning = reconcile.collect(spool, time.time() - DAY, set())
    assert warning == ""
    result = reconcile.report(books, "24h", time.time())
    assert result["instances"] == 9
    assert result["states"] == {"delivered": 6, "queued": 2, "failed": 1, "rejected": 0,
                                "quarantined": 1, "unaccounted": 1}
    assert result["endpoints"]["pacs"] == {"delivered": 4, "queued": 1, "failed": 0,
                                           "unaccounted": 1}
    assert result["endpoints"]["ai"] == {"delivered": 0, "queued": 1, "failed": 1,
                                         "unaccounted": 0}
    assert result["endpoints"]["research"]["delivered"] == 2  # refused for A: not owed
    rows = outcome_map(result)
    assert rows[(a["A"].uid, "ai")]["reason"] == "0xA700 out of resources (5 tries)"
    lost = rows[(a["D"].uid, "pacs")]
    assert lost["last_event"]["kind"] == "routed"
    assert result["recovered"] == {"no_received_event": 0, "no_routed_event": 1}
    text = reconcile.render(result)
    assert "1 unaccounted" in text and a["D"].uid in text and "last known: routed" in text


def test_lost_received_event_and_file_outside_the_journal(tmp_path: Path) -> None:
    """A file in incoming/ the journal never heard of (its events lost): queued,
    counted as recovered; one from before the window is not counted."""
    _, spool = make_spool(tmp_path)
    fresh = Arrival.new("1.2.8.1")
    put(spool, "incoming", fresh.file)
    old = Arrival.new("1.2.8.2", now=time.time() - 3 * DAY)
    put(spool, "incoming", old.file)
    books, warning = reconcile.collect(spool, time.time() - DAY, set())
    assert "no journal" in warning
    result = reconcile.report(books, "24h", time.time())
    assert result["instances"] == 1
    assert result["states"]["queued"] == 1
    assert result["recovered"]["no_received_event"] == 1
    assert not (spool.run_dir / "journal.sqlite").exists()  # reconcile never creates one


def test_the_window_and_an_acknowledged_list(tmp_path: Path) -> None:
    _, spool = make_spool(tmp_path)
    j = journal(spool)
    old = Arrival.new("1.2.7.1", now=time.time() - 3 * DAY)
    old.received(j)
    old.routed(j, ["pacs"])
    j.flush()
    age(spool, old.uid, 3 * DAY)
    j.close()
    window = time.time() - DAY
    assert reconcile.report(reconcile.collect(spool, window, set())[0], "24h", 0)["instances"] == 0
    # listed by the sender: counted although old — and found unaccounted (nothing delivered it)
    result = reconcile.report(reconcile.collect(spool, window, {old.uid, "1.2.7.99"})[0], "24h", 0)
    assert result["instances"] == 2
    unaccounted = {(r["uid"], r["endpoint"]) for r in result["unaccounted"]}
    assert unaccounted == {(old.uid, "pacs"), ("1.2.7.99", None)}
    put(spool, "sent/pacs", old.file)
    result = reconcile.report(reconcile.collect(spool, window, {old.uid})[0], "24h", 0)
    assert result["states"]["delivered"] == 1 and result["unaccounted"] == []


def test_a_retried_failure_back_in_the_outbox_is_queued(tmp_path: Path) -> None:
    _, spool = make_spool(tmp_path)
    j = journal(spool)
    arrival = Arrival.new("1.2.6.1")
    arrival.received(j)
    arrival.routed(j, ["pacs"])
    j.record("failed", uid=arrival.uid, file=arrival.file, endpoint="pacs", reason="refused")
    j.flush()
    j.close()
    put(spool, "outbox/pacs", arrival.file)  # the retried event was lost; the file says
    result = reconcile.report(reconcile.collect(spool, time.time() - DAY, set())[0], "24h", 0)
    assert result["states"]["queued"] == 1 and result["states"]["failed"] == 0


def test_acknowledged_file_parsing(tmp_path: Path) -> None:
    listed = tmp_path / "acked.txt"
    listed.write_text("# from storescu\n1.2.3\n\n  1.2.4  \n1.2.3\n")
    assert reconcile.read_acknowledged(listed) == {"1.2.3", "1.2.4"}
    listed.write_text("1.2.3\nnot-a-uid\n")
    with pytest.raises(reconcile.UsageError, match=r"line 2: 'not-a-uid' is not a UID"):
        reconcile.read_acknowledged(listed)
    with pytest.raises(reconcile.UsageError, match="cannot read"):
        reconcile.read_acknowledged(tmp_path / "missing.txt")


def test_the_command_exit_codes_and_json(scene, tmp_path: Path) -> None:
    conf, spool, a = scene
    result = run_cli(conf, "reconcile")
    assert result.returncode == 1, result.stderr
    assert "9 instance(s)" in result.stdout and a["D"].uid in result.stdout
    assert "PID-SECRET" not in result.stdout + result.stderr
    report = json.loads(run_cli(conf, "reconcile", "--json", "--since", "7d").stdout)
    assert [r["uid"] for r in report["unaccounted"]] == [a["D"].uid]
    put(spool, "sent/pacs", a["D"].file)  # it was delivered after all
    ok = run_cli(conf, "reconcile", "--since", "90m")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 unaccounted" in ok.stdout
    bad = run_cli(conf, "reconcile", "--since", "yesterday")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    listed = tmp_path / "acked.txt"
    listed.write_text("1.2.3\n1.2..3\n")
    bad_list = run_cli(conf, "reconcile", "--acknowledged", str(listed))
    assert bad_list.returncode == 2 and "line 2" in bad_list.stderr


def test_the_same_image_sent_twice_is_two_arrivals(tmp_path: Path) -> None:
    _, spool = make_spool(tmp_path)
    j = journal(spool)
    first, again = Arrival.new("1.2.5.9"), Arrival.new("1.2.5.9")
    for arrival in (first, again):
        arrival.received(j)
        arrival.routed(j, ["pacs"])
    first.sent(j, "pacs")
    j.flush()
    j.close()
    result = reconcile.report(reconcile.collect(spool, time.time() - DAY, set())[0], "24h", 0)
    assert result["instances"] == 2
    assert result["states"]["delivered"] == 1 and len(result["unaccounted"]) == 1


def test_a_copy_renamed_on_a_clash_stays_with_its_arrival(tmp_path: Path) -> None:
    """A copy moved where its name was taken gets a fresh name (a new prefix): it is the
    same arrival's copy, found through its UID — not a new arrival, nor the arrival's
    copy missing."""
    conf, spool = make_spool(tmp_path)
    j = journal(spool)
    arrival = Arrival.new("1.2.5.11")
    arrival.received(j)
    arrival.routed(j, ["pacs", "ai"])
    arrival.sent(j, "pacs")
    renamed = fresh_name_like(arrival.file)
    assert renamed.split("-")[:2] != arrival.file.split("-")[:2]
    j.about("failed", renamed, endpoint="ai", reason="refused: 0xA900")
    j.flush()
    j.close()
    put(spool, "failed/ai", renamed, reason="refused: 0xA900")
    result = reconcile.report(reconcile.collect(spool, time.time() - DAY, set())[0], "24h", 0)
    assert result["instances"] == 1 and result["unaccounted"] == []
    assert result["endpoints"]["ai"]["failed"] == 1 and result["endpoints"]["pacs"]["delivered"] == 1
    [inst] = trace.trace(spool, arrival.uid)[1]
    assert [p.relative for p in inst.places] == [f"failed/ai/{renamed}"]


def test_a_damaged_journal_is_said_and_the_spool_still_accounts(tmp_path: Path) -> None:
    conf, spool = make_spool(tmp_path)
    j = journal(spool)
    arrivals = [Arrival.new(f"1.2.7.{n}") for n in range(1500)]
    for arrival in arrivals:
        arrival.received(j)
    j.flush()
    j.close()
    put(spool, "sent/pacs", arrivals[0].file)
    damage(spool)
    books, warning = reconcile.collect(spool, time.time() - DAY, set())
    assert "the journal cannot be read to the end" in warning
    assert any(p.relative == f"sent/pacs/{arrivals[0].file}" for ledger in books.ledgers
               for p in ledger.places)
    result = run_cli(conf, "reconcile")
    assert result.returncode in (0, 1) and "cannot be read to the end" in result.stderr, result.stderr
