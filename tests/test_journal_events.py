"""What each daemon writes to the journal: the filter in process on real files, the
sender over DICOM to a real Storage SCP on loopback (issue 18's event list)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from pipeline.clock import FakeClock
from pipeline.config import load
from pipeline.journal.store import journal_path
from pipeline.journal.writer import Journal
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from services.filter import FilterDaemon
from services.send import Sender
from tests.helpers import dicom_files, make_dataset, write_conf
from tests.sendkit import StatusSCP, endpoint_conf, put_in_outbox
from tests.test_filter import drop


def events(spool_root: Path) -> list[dict]:
    conn = sqlite3.connect(journal_path(spool_root / "run"))
    conn.row_factory = sqlite3.Row
    try:
        found = [dict(row) for row in conn.execute("SELECT * FROM events ORDER BY id")]
    finally:
        conn.close()
    for row in found:
        row["detail"] = json.loads(row["detail"])
    return found


def run_filter(conf: Path) -> tuple[FilterDaemon, Journal]:
    config = load(conf)
    spool = Spool(config.spool).create(config.endpoints)
    journal = Journal(journal_path(spool.run_dir), "filter", phi=config.router.journal_phi)
    daemon = FilterDaemon(config, settle=0.0, rescan_interval=0.2, retry_interval=0.1,
                          journal=journal)
    return daemon, journal


ENDPOINTS = {
    "pacs": {"endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"}},
    "mr_only": {"endpoint": {"host": "127.0.0.1", "port": 1105, "ae_title": "MR"},
                "filter": {"conditions": "Modality=MR"}},
    "shaped": {"endpoint": {"host": "127.0.0.1", "port": 1106, "ae_title": "SHAPED"},
               "coerce": {"operations": "InstitutionName = Journal Hospital"}},
}


@pytest.mark.parametrize("phi", [False, True])
def test_the_filter_records_routed_shaped_rejected_and_quarantined(tmp_path: Path, phi: bool) -> None:
    conf = write_conf(tmp_path, router={"journal_phi": str(phi).lower()},
                      filter_={"sop_blacklist": "EncapsulatedPDFStorage"}, endpoints=ENDPOINTS)
    daemon, journal = run_filter(conf)
    spool = daemon.spool
    ct = make_dataset(modality="CT")
    ct.PatientID, ct.AccessionNumber = "PAT-7", "ACC-9"
    pdf = make_dataset("1.2.840.10008.5.1.4.1.1.104.1", modality="DOC")
    drop(spool, ct), drop(spool, pdf)
    (spool.incoming / "garbage.dcm").write_bytes(b"not DICOM" * 20)
    assert daemon.run(once=True) == 0
    journal.flush()
    found = events(spool.root)
    by_kind = {row["kind"]: row for row in found}
    routed = by_kind["routed"]
    assert routed["uid"] == ct.SOPInstanceUID and routed["daemon"] == "filter"
    assert (routed["study"], routed["series"]) == (ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert sorted(routed["detail"]["endpoints"]) == ["pacs", "shaped"]
    assert "Modality" in routed["detail"]["refused"]["mr_only"]
    assert (routed["patient_id"], routed["accession"]) == (("PAT-7", "ACC-9") if phi else (None, None))
    shaped = by_kind["shaped"]
    [copy] = dicom_files(spool.outbox("shaped"))
    assert (shaped["endpoint"], shaped["file"], shaped["uid"]) == ("shaped", copy.name, ct.SOPInstanceUID)
    assert shaped["detail"] == {"copy_uid": ct.SOPInstanceUID, "shaping": ["coerce"]}
    rejected = by_kind["rejected"]
    assert rejected["uid"] == pdf.SOPInstanceUID and "global rule" in rejected["detail"]["reason"]
    assert (spool.rejected / rejected["file"]).is_file()
    quarantined = by_kind["quarantined"]
    assert (spool.quarantine / quarantined["file"]).is_file() and quarantined["detail"]["reason"]
    assert len(found) == 4
    daemon.close()


def test_a_study_release_records_where_each_instance_went(tmp_path: Path) -> None:
    endpoints = {"ai": {"endpoint": {"host": "127.0.0.1", "port": 1107, "ae_title": "AI"},
                        "filter": {"level": "study", "stable_time": "1s",
                                   "conditions": "all:Modality=CT"}},
                 "nothing": {"endpoint": {"host": "127.0.0.1", "port": 1108, "ae_title": "NO"},
                             "filter": {"level": "study", "stable_time": "1s",
                                        "conditions": "Modality=MR"}}}
    conf = write_conf(tmp_path, endpoints=endpoints)
    daemon, journal = run_filter(conf)
    spool = daemon.spool
    first = make_dataset(modality="CT")
    second = make_dataset(modality="CT", study_uid=first.StudyInstanceUID)
    drop(spool, first), drop(spool, second)
    daemon.start()
    try:
        from tests.helpers import wait_for

        def released() -> bool:
            daemon.step()
            return len(dicom_files(spool.outbox("ai"))) == 2 and not dicom_files(spool.accepted)
        wait_for(released, timeout=60, interval=0.1)
    finally:
        daemon.close()
    journal.flush()
    rows = [row for row in events(spool.root) if row["kind"] == "routed"]
    arrivals = [row for row in rows if "release" not in row["detail"]]
    assert sorted(row["uid"] for row in arrivals) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert all(sorted(row["detail"]["waiting"]) == ["ai", "nothing"] for row in arrivals)
    releases = [row for row in rows if "release" in row["detail"]]
    sent = sorted(row["uid"] for row in releases if row["detail"]["endpoints"] == ["ai"])
    declined = sorted(row["uid"] for row in releases if "nothing" in row["detail"].get("declined", {}))
    assert sent == declined == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert all(row["study"] == first.StudyInstanceUID for row in releases)


def test_the_sender_records_what_was_sent_and_what_failed(tmp_path: Path) -> None:
    scp = StatusSCP(statuses=[0x0000, 0xC001], ae_title="PACS").start()
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": scp.port, "ae_title": "PACS",
                                                  "retry": {"backoff": "1s", "max_attempts": "5"}}})
        files = []
        for _ in range(3):
            path = tmp_path / "src" / f"{len(files)}.dcm"
            path.parent.mkdir(exist_ok=True)
            make_dataset().save_as(path, enforce_file_format=True)
            files.append(path)
        config = load(conf)
        journal = Journal(journal_path(config.spool / "run"), "send-pacs")
        put_in_outbox(config.spool, "pacs", files)
        sender = Sender(config, "pacs", clock=FakeClock(), install_signals=False, journal=journal)
        sender.run(once=True)
    finally:
        scp.stop()
    journal.flush()
    found = [row for row in events(config.spool) if row["endpoint"] == "pacs"]
    assert sorted(row["kind"] for row in found) == ["failed", "sent", "sent"]
    for row in found:
        assert row["daemon"] == "send-pacs"
        assert row["uid"] == SpoolName.parse(row["file"]).uid  # type: ignore[union-attr]
    sent = next(row for row in found if row["kind"] == "sent")
    assert sent["status"] == 0 and sent["detail"]["duration"] >= 0
    assert sent["detail"]["association"].endswith(f"PACS@127.0.0.1:{scp.port}")
    failed = next(row for row in found if row["kind"] == "failed")
    assert "0xC001" in failed["detail"]["reason"]
    assert (config.spool / "failed" / "pacs" / failed["file"]).is_file()


def test_a_retried_refusal_is_an_attempt_with_its_status(tmp_path: Path) -> None:
    # A stored; B refused (busy); the probe goes with C (never refused), stored; B refused
    # again after another file was stored: that refusal is B's, an attempt; then B is stored.
    scp = StatusSCP(statuses=[0x0000, 0xA700, 0x0000, 0xA700], ae_title="PACS").start()
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": scp.port, "ae_title": "PACS",
                                                  "retry": {"backoff": "1s", "max_attempts": "5"}}})
        config = load(conf)
        files = []
        for n in range(3):
            path = tmp_path / "src" / f"{n}.dcm"
            path.parent.mkdir(exist_ok=True)
            make_dataset().save_as(path, enforce_file_format=True)
            files.append(path)
        published = put_in_outbox(config.spool, "pacs", files)
        journal = Journal(journal_path(config.spool / "run"), "send-pacs")
        sender = Sender(config, "pacs", clock=FakeClock(), install_signals=False, journal=journal)
        sender.run(once=True)
    finally:
        scp.stop()
    journal.flush()
    b = published[1].name
    story = [(row["kind"], row["status"]) for row in events(config.spool) if row["file"] == b]
    assert story == [("attempt", 0xA700), ("sent", 0)], story
    attempt = next(row for row in events(config.spool) if row["kind"] == "attempt")
    assert attempt["detail"]["attempt"] == 1 and attempt["detail"]["retry_in"] > 0
    assert "other files were stored" in attempt["detail"]["reason"]
