"""The journal end to end over DICOM (issue 18, "Done when"): real daemons, DCMTK
storescu as the modality, DCMTK storescp as the two destinations — one of them down
for a while — then ``dicomflow trace`` and ``dicomflow reconcile`` as an operator runs
them; and a journal deleted, then corrupted, under the running router."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.journal.store import journal_path
from tests.helpers import dicom_files, run_cli, wait_for
from tests.peers import StoreSCP
from tests.reliability import destination_uids, storescu_acked
from tests.test_studies_e2e import Router, header, write_study

pytestmark = pytest.mark.e2e  # run a second time in CI on pynetdicom's own code paths


def trace(conf: Path, *args: str) -> dict:
    result = run_cli(conf, "trace", *args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def journal_rows(spool: Path) -> int:
    import sqlite3

    try:
        conn = sqlite3.connect(journal_path(spool / "run"), timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def start_router(tmp_path: Path) -> tuple[Router, dict[str, StoreSCP]]:
    peers = {name: StoreSCP(tmp_path / name, ae_title=name.upper()) for name in ("pacs", "ai")}
    router = Router(tmp_path, peers, {})
    for peer in peers.values():
        peer.start()
    router.start_daemon("receive")
    router.start_daemon("filter")
    return router, peers


def test_trace_and_reconcile_tell_the_whole_story(tmp_path: Path) -> None:
    router, peers = start_router(tmp_path)
    peers["ai"].stop()  # the AI destination is down at first
    try:
        for name in peers:
            router.start_daemon(f"send-{name}")
        files = write_study(tmp_path / "study", {"AXIAL": 4})
        study = str(header(files[0]).StudyInstanceUID)
        uids = [str(header(f).SOPInstanceUID) for f in files]
        done, result = storescu_acked(router.port, files)
        assert len(done) == len(files), result.stdout + result.stderr
        wait_for(lambda: set(uids) <= set(destination_uids(peers["pacs"].directory)),
                 message="the study at pacs")
        # ai is down: its copies are queued, and that accounts for them
        wait_for(lambda: dicom_files(router.spool / "outbox" / "pacs") == [], message="pacs done")
        early = run_cli(router.conf, "reconcile", "--json")
        assert early.returncode == 0, early.stdout + early.stderr
        early_report = json.loads(early.stdout)
        assert early_report["endpoints"]["ai"]["queued"] == len(uids), early_report
        peers["ai"].start()
        wait_for(lambda: set(uids) <= set(destination_uids(peers["ai"].directory)), timeout=180,
                 message="the study at ai once it is up")
        wait_for(lambda: journal_rows(router.spool) >= 4 * len(uids), message="the sent events")

        one = trace(router.conf, uids[0])
        whole = trace(router.conf, study)
        reconcile = run_cli(router.conf, "reconcile", "--since", "1h", "--json")
    finally:
        router.stop()
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    check_instance_trace(one, uids[0], study)
    check_study_trace(whole, study, uids)
    check_reconcile(json.loads(reconcile.stdout), len(uids))
    assert "TEST^PATIENT" not in json.dumps([one, whole])


def check_instance_trace(report: dict, uid: str, study: str) -> None:
    [instance] = report["instances"]
    assert (instance["uid"], instance["study"]) == (uid, study)
    kinds = [event["kind"] for event in instance["events"]]
    assert kinds[:2] == ["received", "routed"], kinds
    received, routed = instance["events"][:2]
    assert received["detail"]["calling"] == "STORESCU" and received["detail"]["called"] == "DICOMFLOW"
    assert received["detail"]["size"] > 0 and received["detail"]["peer"].startswith("127.0.0.1:")
    assert sorted(routed["detail"]["endpoints"]) == ["ai", "pacs"]
    sent = {event["endpoint"]: event for event in instance["events"] if event["kind"] == "sent"}
    assert set(sent) == {"ai", "pacs"} and all(event["status"] == 0 for event in sent.values())
    assert sent["ai"]["at"] > sent["pacs"]["at"]  # ai was down a while
    now = {row["endpoint"]: row for row in instance["now"]}
    assert {ep: row["state"] for ep, row in now.items()} == {"ai": "delivered", "pacs": "delivered"}
    assert now["pacs"]["where"].startswith("sent/pacs/") and now["ai"]["where"].startswith("sent/ai/")


def check_study_trace(report: dict, study: str, uids: list[str]) -> None:
    assert report["query"]["by"] == "study"
    assert sorted(instance["uid"] for instance in report["instances"]) == sorted(uids)
    for instance in report["instances"]:
        assert instance["study"] == study
        assert {row["endpoint"]: row["state"] for row in instance["now"]} == {
            "ai": "delivered", "pacs": "delivered"}


def check_reconcile(report: dict, count: int, state: str = "delivered") -> None:
    assert report["instances"] == count
    assert report["unaccounted"] == [] and report["states"]["unaccounted"] == 0
    assert {ep: counts[state] for ep, counts in report["endpoints"].items()} == {
        "ai": count, "pacs": count}


def test_a_deleted_then_corrupted_journal_is_recreated_while_routing_goes_on(tmp_path: Path) -> None:
    router, peers = start_router(tmp_path)
    try:
        for name in peers:
            router.start_daemon(f"send-{name}")
        path = journal_path(router.spool / "run")
        sent: list[str] = []

        def send_study(label: str) -> None:
            files = write_study(tmp_path / label, {label: 3})
            done, result = storescu_acked(router.port, files)
            assert len(done) == len(files), result.stdout + result.stderr
            sent.extend(str(header(f).SOPInstanceUID) for f in files)
            wait_for(lambda: all(set(sent) <= set(destination_uids(p.directory))
                                 for p in peers.values()), message=f"{label} delivered")

        send_study("FIRST")
        wait_for(lambda: journal_rows(router.spool) >= 3, message="the first events")
        path.unlink()  # an operator's rm, with every daemon's connection open on it
        send_study("SECOND")
        wait_for(lambda: path.exists() and journal_rows(router.spool) >= 3,
                 message="a new journal with the second study's events")
        deleted = "was deleted while in use: a new one is started"
        assert router.logs().count(deleted) == 1, router.logs()[-4000:]

        garbage = path.with_name("garbage")
        garbage.write_bytes(os.urandom(64 * 1024))
        os.replace(garbage, path)  # what a damaged disk block looks like to SQLite: not a database
        send_study("THIRD")
        wait_for(lambda: list(path.parent.glob("journal.sqlite.corrupt-*"))
                 and journal_rows(router.spool) >= 3, message="the corrupt journal moved aside")
        assert router.logs().count("the journal was corrupt") == 1, router.logs()[-4000:]
        assert all(d.alive() for d in router.daemons.values())
    finally:
        router.stop()
