"""``dicomflow status``: counts, ages, endpoint states, orphans — without parsing DICOM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import config as config_module
from pipeline.lock import DaemonLock
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from services.status import collect, count_stage, format_age, process_info, render
from tests.helpers import HANG_TIMEOUT, run_cli, wait_for, write_conf

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
    assert set(report) == {"spool", "conf", "time", "processes", "stages", "endpoints", "journal"}
    assert report["journal"] == {"enabled": True, "path": str(spool.run_dir / "journal.sqlite"),
                                 "bytes": None, "retention_s": 90 * 86400.0, "phi": False}
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


# -- studies (issue 17): the filter's state file and the study lists ---------------------

AI = {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "AI"}}
STUDY = "1.2.826.0.1.3680043.8.498.10000000000000000001"


def write_study_state(spool: Spool, waiting: list[dict], released: list[dict] | None = None,
                      written: float | None = None, raw: bytes | None = None) -> Path:
    """``run/studies/state.json`` as the filter writes it (atomically, through the spool)."""
    directory = spool.run_dir / "studies"
    directory.mkdir(mode=0o700, exist_ok=True)
    state = {"version": 1, "written": time.time() if written is None else written, "pid": 1,
             "waiting": waiting, "released": released or []}
    return spool.write_bytes(directory, "state.json", raw if raw is not None else json.dumps(state).encode(),
                             replace=True)


def waiting_entry(study: str = STUDY, endpoint: str = "ai", now: float | None = None, *,
                  level: str = "study", series: str | None = None, instances: int = 42,
                  sample: str | None = None, release_in: float | None = 20.0,
                  mpps: str | None = None) -> dict:
    now = time.time() if now is None else now
    return {"endpoint": endpoint, "level": level, "study": study, "series": series,
            "instances": instances, "first_arrival": now - 900, "last_arrival": now - 40,
            "completion": "mpps" if mpps else "stable", "mpps": mpps,
            "release_at": None if release_in is None else now + release_in,
            "sample": sample or str(SpoolName.new("1.2.3.4", now=now - 900))}


def write_study_list(spool: Spool, endpoint: str, study: str, released: float,
                     prefixes: list[str], series: str | None = None) -> Path:
    """A study list in ``run/studies/queue/<endpoint>/`` (the queue module's format)."""
    directory = spool.run_dir / "studies" / "queue" / endpoint
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{SpoolName.new(None, now=released).prefix}.study"
    data = {"version": 1, "endpoint": endpoint, "study": study, "series": series,
            "level": "series" if series else "study", "released": released, "prefixes": prefixes}
    return spool.write_bytes(directory, name, json.dumps(data).encode())


@pytest.fixture
def fake_filter():
    """A live process that looks like ``dicomflow filter`` to status (its pid in
    ``run/filter.lock``, ``services.cli`` in its command line) but does nothing: a filter
    that hangs. It ends when its stdin closes."""
    procs: list[subprocess.Popen] = []

    def start(spool: Spool) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "services.cli",
                                 "filter"], stdin=subprocess.PIPE)
        procs.append(proc)
        DaemonLock(spool.run_dir, "filter").path.write_text(f"{proc.pid}\n")
        wait_for(lambda: process_info(spool.run_dir, "filter")["running"], message="the fake filter")
        return proc

    yield start
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(HANG_TIMEOUT)


def make_studies(tmp_path: Path):
    return make(tmp_path, {"pacs": ENDPOINT, "ai": AI})


def test_studies_waiting_and_queued_per_endpoint(tmp_path: Path) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    series = "1.2.826.0.1.3680043.8.498.2"
    write_study_state(spool, [waiting_entry(now=now),
                              waiting_entry("1.2.3", now=now, level="series", series=series, instances=3,
                                            release_in=None, mpps="in progress")], written=now)
    write_study_list(spool, "ai", "1.2.4", now - 120, ["20261203T050000.000000-000001"])
    write_study_list(spool, "ai", "1.2.5", now - 30, [])
    report = collect(loaded, now=now)
    assert report["studies_state"] == "ok"
    assert "studies" not in report["endpoints"]["pacs"]  # instance-level: as before
    block = report["endpoints"]["ai"]["studies"]
    assert block["queued"] == {"count": 2, "oldest_age_s": 120.0}
    assert block["waiting"] == [  # oldest first, then by UID
        {"study": "1.2.3", "series": series, "level": "series", "instances": 3, "age_s": 900.0,
         "idle_s": 40.0, "mpps": "in progress", "release_in_s": None},
        {"study": STUDY, "series": None, "level": "study", "instances": 42, "age_s": 900.0,
         "idle_s": 40.0, "mpps": None, "release_in_s": 20.0}]
    text = render(report)
    assert "studies: 2 queued (oldest 2m), 2 waiting" in text
    assert "studies waiting      2" in text
    assert "…" + STUDY[-20:] in text and "on MPPS" in text and STUDY not in text


def test_studies_text_is_capped_at_20_rows(tmp_path: Path) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    write_study_state(spool, [waiting_entry(f"1.2.3.{i}", now=now) for i in range(25)], written=now)
    report = collect(loaded, now=now)
    assert len(report["endpoints"]["ai"]["studies"]["waiting"]) == 25  # JSON: all of them
    text = render(report)
    assert "… and 5 more" in text
    assert sum(1 for line in text.splitlines() if line.strip().startswith("ai ") and "1.2.3." in line) == 20


def test_no_studies_no_key(tmp_path: Path) -> None:
    _, loaded, _ = make_studies(tmp_path)
    report = collect(loaded)
    assert "studies_state" not in report
    assert all("studies" not in info for info in report["endpoints"].values())
    text = render(report)
    assert "studies waiting" not in text and "studies:" not in text


def test_studies_state_unavailable(tmp_path: Path) -> None:
    """Missing (while lists exist), corrupt, wrong version, or huge: not an error, said so."""
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    write_study_list(spool, "ai", "1.2.4", now - 10, [])
    report = collect(loaded, now=now)
    assert report["studies_state"] == "unavailable"
    assert report["endpoints"]["ai"]["studies"]["queued"]["count"] == 1
    assert "state unavailable" in render(report)
    for raw in (b"{not json", b'{"version": 2, "waiting": [], "released": []}', b"[1, 2]",
                b"[" * 100_000, b'{"version": 1, "waiting": {}, "released": []}'):
        write_study_state(spool, [], raw=raw)
        assert collect(loaded, now=now)["studies_state"] == "unavailable", raw[:40]


def test_studies_state_stale_only_while_the_filter_runs(tmp_path: Path, fake_filter) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    write_study_state(spool, [waiting_entry(now=now)], written=now - 120)
    assert collect(loaded, now=now)["studies_state"] == "ok"  # filter stopped: the last word
    fake_filter(spool)
    report = collect(loaded, now=now)
    assert report["processes"]["filter"]["running"] is True
    assert report["studies_state"] == "unavailable"
    assert len(report["endpoints"]["ai"]["studies"]["waiting"]) == 1  # the last known rows


def test_hostile_state_rows_are_dropped(tmp_path: Path) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    forged = {**waiting_entry("1.2.7", now=now), "mpps": "\x1b[31mforged"}
    rows: list = [waiting_entry("../../etc", now=now), waiting_entry(now=now, endpoint="../x"),
                  waiting_entry("1.2\n3", now=now), "not a row", forged]
    write_study_state(spool, rows, written=now)
    waiting = collect(loaded, now=now)["endpoints"]["ai"]["studies"]["waiting"]
    assert [(w["study"], w["mpps"]) for w in waiting] == [("1.2.7", None)]


def test_status_reads_no_dicom_file(tmp_path: Path) -> None:
    """The sample named by the state file is never opened: a FIFO there would block any
    reader, garbage would fail a parser; status and its JSON command don't care."""
    conf, _, spool = make_studies(tmp_path)
    fifo = spool.accepted / str(SpoolName.new("1.2.3.4"))
    os.mkfifo(fifo, 0o600)
    garbage = spool.accepted / str(SpoolName.new("1.2.3.5"))
    garbage.write_bytes(b"not DICOM at all")
    write_study_state(spool, [waiting_entry(sample=fifo.name), waiting_entry("1.2.9", sample=garbage.name)])
    result = run_cli(conf, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["studies_state"] == "ok"
    assert len(report["endpoints"]["ai"]["studies"]["waiting"]) == 2
    assert fifo.name not in result.stdout  # no file names, no patient data
    text = run_cli(conf, "status")
    assert text.returncode == 0 and "studies waiting" in text.stdout
