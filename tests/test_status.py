"""``dicomflow status``: counts, ages, endpoint states, orphans — without parsing DICOM."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline import config as config_module
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from services.status import collect, count_stage, format_age, render
from tests.helpers import run_cli, write_conf

ENDPOINT = {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "PACS"}}


def make(tmp_path: Path, endpoints: dict | None = None):
    conf = write_conf(tmp_path, endpoints=endpoints if endpoints is not None else {"pacs": ENDPOINT})
    loaded = config_module.load(conf)
    spool = Spool(loaded.spool).create(loaded.endpoints)
    return conf, loaded, spool


def test_counts_and_oldest_age_from_names(tmp_path: Path) -> None:
    _, loaded, spool = make(tmp_path)
    now = time.time()
    for age in (30, 600, 5):
        spool.write_bytes(spool.outbox("pacs"), str(SpoolName.new("1.2.3", now=now - age)), b"x")
    spool.write_bytes(spool.failed("pacs"), str(SpoolName.new("1.2.4", now=now - 100)), b"x")
    spool.write_sidecar(spool.failed("pacs") / "whatever.dcm", ".error", "0xC000 cannot understand")
    report = collect(loaded, now=now)
    pacs = report["endpoints"]["pacs"]
    assert pacs["outbox"]["count"] == 3
    assert 599 <= pacs["outbox"]["oldest_age_s"] <= 601
    assert pacs["failed"]["count"] == 1
    assert pacs["last_error"] == "0xC000 cannot understand"
    assert pacs["state"] == "not running"
    assert report["stages"]["incoming"] == {"count": 0, "oldest_age_s": None}
    assert report["processes"]["receive"]["running"] is False


def test_hand_dropped_names_use_mtime(tmp_path: Path) -> None:
    _, _, spool = make(tmp_path)
    dropped = spool.incoming / "scan.dcm"
    dropped.write_bytes(b"x")
    os.utime(dropped, (time.time() - 3600, time.time() - 3600))
    info = count_stage(spool.incoming, time.time())
    assert info.count == 1 and 3590 < info.oldest_age_s < 3610


def test_sender_state_file_and_orphans(tmp_path: Path) -> None:
    _, loaded, spool = make(tmp_path)
    spool.create_endpoint("old")
    spool.write_bytes(spool.outbox("old"), str(SpoolName.new("1.2.5")), b"x")
    state = {"endpoint": "pacs", "pid": os.getpid(), "state": "down", "since": "2026-11-28T06:00:00+00:00",
             "down_since": "2026-11-28T06:00:00+00:00", "last_error": "connection refused",
             "last_error_at": "2026-11-28T06:00:00+00:00", "next_open": None, "sent": 0, "failed": 0}
    spool.write_bytes(spool.run_dir, "send-pacs.json", json.dumps(state).encode(), replace=True)
    report = collect(loaded)
    assert report["endpoints"]["old"]["state"] == "orphaned"
    assert report["endpoints"]["old"]["outbox"]["count"] == 1
    assert report["endpoints"]["pacs"]["last_error"] == "connection refused"
    text = render(report)
    assert "orphaned" in text and "connection refused" in text


def test_status_json_command_and_check_warns_orphans(tmp_path: Path) -> None:
    conf, _, spool = make(tmp_path)
    spool.create_endpoint("gone")
    result = run_cli(conf, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"spool", "conf", "time", "processes", "stages", "endpoints"}
    assert set(report["endpoints"]) == {"pacs", "gone"}
    assert set(report["endpoints"]["pacs"]) == {
        "configured", "destination", "sender_running", "state", "since", "down_since", "next_open",
        "last_error", "last_error_at", "outbox", "sent", "failed", "handed_back"}
    check = run_cli(conf, "check")
    assert check.returncode == 0 and "gone" in check.stdout and "orphaned" in check.stdout


def test_status_on_100000_queued_files(tmp_path: Path) -> None:
    """Works on a large queue without opening files (the benchmark measures its speed)."""
    _, loaded, spool = make(tmp_path)
    outbox = spool.outbox("pacs")
    base = time.time() - 50
    for index in range(100_000):
        (outbox / str(SpoolName.new("1.2.3", now=base + index * 0.0001))).touch()
    report = collect(loaded)
    assert report["endpoints"]["pacs"]["outbox"]["count"] == 100_000
    assert report["endpoints"]["pacs"]["outbox"]["oldest_age_s"] >= 49


def test_format_age() -> None:
    assert [format_age(v) for v in (None, 5, 90, 7200, 172800)] == ["-", "5s", "2m", "2h", "2d"]
