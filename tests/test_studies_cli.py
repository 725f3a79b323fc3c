"""``dicomflow studies`` and ``dicomflow release`` over spools built by hand (issue 17).

The filter's state file, the study lists and the release requests are written here as
the filter and the queue module write them; no daemon runs, except a stand-in filter
thread where a release must be acted on.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from services.studies import release_main
from tests.helpers import make_dataset, run_cli, wait_for, write_dataset
from tests.test_status import (  # noqa: F401 - fake_filter is a fixture
    STUDY,
    fake_filter,
    make_studies,
    waiting_entry,
    write_study_list,
    write_study_state,
)

PATIENT, PATIENT_ID, ACCESSION = "DOE^JANE", "PID-SECRET-77", "ACC-31337"


def requests(spool: Spool) -> Path:
    return spool.run_dir / "studies" / "requests"


def sample_file(spool: Spool, directory: Path | None = None) -> Path:
    """A real DICOM file of the study, with patient data, where the filter keeps it."""
    ds = make_dataset(patient_name=PATIENT, patient_id=PATIENT_ID, study_uid=STUDY,
                      AccessionNumber=ACCESSION)
    return write_dataset(ds, (directory or spool.accepted) / str(SpoolName.new(ds.SOPInstanceUID)))


def test_studies_lists_waiting_and_queued(tmp_path: Path) -> None:
    conf, _, spool = make_studies(tmp_path)
    now = time.time()
    write_study_state(spool, [waiting_entry(now=now, mpps="in progress", release_in=600)], written=now)
    write_study_list(spool, "ai", "1.2.4", now - 120, ["20261203T050000.000000-000001"] * 3)
    result = run_cli(conf, "studies")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["endpoint", "state", "level", "files", "age"]
    waiting = next(line for line in lines if STUDY in line)  # the full UID: release needs it
    assert waiting.split()[:5] == ["ai", "waiting", "study", "42", "15m"]
    assert "MPPS in progress, release in 10m" in waiting
    queued = next(line for line in lines if "1.2.4" in line)
    assert queued.split()[:5] == ["ai", "queued", "study", "3", "2m"]

    report = json.loads(run_cli(conf, "studies", "--json").stdout)
    assert report["studies_state"] == "ok"
    assert [(s["state"], s["study"], s["instances"]) for s in report["studies"]] == [
        ("waiting", STUDY, 42), ("queued", "1.2.4", 3)]
    first = report["studies"][0]
    assert first["mpps"] == "in progress" and first["completion"] == "mpps"
    assert 590 <= first["release_in_s"] <= 600 and first["idle_s"] >= 40

    only_waiting = json.loads(run_cli(conf, "studies", "--waiting", "--json").stdout)
    assert [s["state"] for s in only_waiting["studies"]] == ["waiting"]
    pacs = json.loads(run_cli(conf, "studies", "--endpoint", "pacs", "--json").stdout)
    assert pacs["studies"] == []
    assert run_cli(conf, "studies", "--endpoint", "pacs").stdout.strip() == "no studies waiting or queued"


def test_studies_refuses_an_unknown_endpoint_and_both_filters(tmp_path: Path) -> None:
    conf, _, _ = make_studies(tmp_path)
    for name in ("nope", "../x"):
        result = run_cli(conf, "studies", "--endpoint", name)
        assert result.returncode == 1 and "no endpoint" in result.stderr
    assert run_cli(conf, "studies", "--waiting", "--endpoint", "ai").returncode == 2  # argparse


def test_studies_without_state_says_so(tmp_path: Path) -> None:
    conf, _, spool = make_studies(tmp_path)
    write_study_list(spool, "ai", "1.2.4", time.time() - 5, [])
    result = run_cli(conf, "studies", "--json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["studies_state"] == "unavailable" and len(report["studies"]) == 1
    assert "state.json is missing" in result.stderr


def test_patient_data_only_with_show_phi(tmp_path: Path) -> None:
    conf, _, spool = make_studies(tmp_path)
    sample = sample_file(spool)
    queued = sample_file(spool, spool.outbox("ai"))
    write_study_state(spool, [waiting_entry(sample=sample.name)])
    parsed = SpoolName.parse(queued.name)
    assert parsed is not None
    write_study_list(spool, "ai", "1.2.4", time.time() - 5, [parsed.prefix])
    secrets = (PATIENT, "DOE", PATIENT_ID, ACCESSION)
    for args in (("studies",), ("studies", "--json"), ("status",), ("status", "--json")):
        result = run_cli(conf, *args)
        assert result.returncode == (3 if args[0] == "status" else 0), result.stderr  # nothing runs
        assert not any(secret in result.stdout + result.stderr for secret in secrets), args
    shown = run_cli(conf, "studies", "--show-phi")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count(f"patient: {PATIENT}") == 2  # the waiting and the queued study
    assert f"patient id: {PATIENT_ID}" in shown.stdout and f"accession: {ACCESSION}" in shown.stdout
    report = json.loads(run_cli(conf, "studies", "--show-phi", "--json").stdout)
    assert report["studies"][0]["phi"] == {"PatientName": PATIENT, "PatientID": PATIENT_ID,
                                           "StudyDate": "20261128", "AccessionNumber": ACCESSION}


def test_show_phi_survives_bad_samples(tmp_path: Path) -> None:
    """A sample that is a FIFO, garbage, gone, or a path out of accepted/: said, not read."""
    conf, _, spool = make_studies(tmp_path)
    fifo = spool.accepted / str(SpoolName.new("1.2.3.4"))
    os.mkfifo(fifo, 0o600)
    garbage = spool.accepted / str(SpoolName.new("1.2.3.5"))
    garbage.write_bytes(b"not DICOM at all")
    outside = tmp_path / "outside.dcm"
    write_dataset(make_dataset(patient_name=PATIENT), outside)
    samples = [fifo.name, garbage.name, "gone.dcm", "../../outside.dcm", str(outside)]
    write_study_state(spool, [waiting_entry(f"1.2.3.{i}", sample=name) for i, name in enumerate(samples)])
    result = run_cli(conf, "studies", "--show-phi", "--json")
    assert result.returncode == 0, result.stderr
    errors = [s["phi"]["phi_error"] for s in json.loads(result.stdout)["studies"]]
    assert "not a regular file (a FIFO)" in errors[0]
    assert errors[1].startswith("unreadable") and errors[2] == "its file has moved on"
    assert errors[3:] == ["no file of the study at hand"] * 2
    assert PATIENT not in result.stdout


# -- release -----------------------------------------------------------------------------

def test_release_writes_a_request(tmp_path: Path) -> None:
    conf, _, spool = make_studies(tmp_path)
    write_study_state(spool, [waiting_entry()])
    result = run_cli(conf, "release", STUDY, "--no-wait")
    assert result.returncode == 0, result.stderr
    assert f"release of study {STUDY} requested (waiting for ai)" in result.stdout
    request = requests(spool) / f"{STUDY}.release"
    assert request.read_bytes() == b""
    assert stat.S_IMODE(request.stat().st_mode) == 0o600
    assert stat.S_IMODE(requests(spool).stat().st_mode) == 0o700
    again = run_cli(conf, "release", STUDY, "--no-wait")
    assert again.returncode == 0 and "already requested" in again.stdout
    assert [p.name for p in requests(spool).iterdir() if p.name != ".tmp"] == [request.name]


@pytest.mark.parametrize("uid", ["../x", "1" * 200, "1.2.3/../../x", "1.2.x", "", "1..2", "-1.2"])
def test_release_refuses_a_hostile_uid(tmp_path: Path, uid: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, loaded, spool = make_studies(tmp_path)
    write_study_state(spool, [waiting_entry()])
    assert release_main(loaded, uid, force=True, wait=False) == 1
    assert "is not a Study Instance UID" in capsys.readouterr().err
    assert not requests(spool).exists()


def test_release_command_refuses_a_path(tmp_path: Path) -> None:
    conf, _, spool = make_studies(tmp_path)
    result = run_cli(conf, "release", "../../x", "--force")
    assert result.returncode == 1 and "'../../x' is not a Study Instance UID" in result.stderr
    assert not requests(spool).exists()


def test_release_refuses_what_is_not_waiting(tmp_path: Path) -> None:
    conf, _, spool = make_studies(tmp_path)
    decided = {"endpoint": "ai", "level": "study", "study": "1.2.5", "series": None, "send": False,
               "instances": 7, "at": time.time() - 60, "why": "no instance matches Modality=CT"}
    write_study_state(spool, [waiting_entry()], released=[decided])
    write_study_list(spool, "ai", "1.2.4", time.time() - 5, [])
    cases = {"1.2.9": "study 1.2.9 is unknown", "1.2.4": "released and is queued for ai",
             "1.2.5": "already released (not for ai: no instance matches Modality=CT)"}
    for uid, message in cases.items():
        result = run_cli(conf, "release", uid)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "--force" in result.stderr
    assert not requests(spool).exists()
    forced = run_cli(conf, "release", "1.2.9", "--force", "--no-wait")
    assert forced.returncode == 0 and (requests(spool) / "1.2.9.release").exists()


def test_release_without_state_needs_force(tmp_path: Path) -> None:
    conf, _, spool = make_studies(tmp_path)
    result = run_cli(conf, "release", STUDY)
    assert result.returncode == 1 and "state.json is missing" in result.stderr
    assert not requests(spool).exists()


def stand_in_filter(spool: Spool, uid: str) -> threading.Thread:
    """What the filter does with a request: release the study, write its state, consume it."""
    def act() -> None:
        request = requests(spool) / f"{uid}.release"
        wait_for(request.exists, message="the release request")
        decided = {"endpoint": "ai", "level": "study", "study": uid, "series": None, "send": True,
                   "instances": 42, "at": time.time(), "why": "released by request"}
        write_study_state(spool, [], released=[decided])
        spool.unlink(request)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def test_release_waits_for_the_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, loaded, spool = make_studies(tmp_path)
    write_study_state(spool, [waiting_entry()])
    thread = stand_in_filter(spool, STUDY)
    assert release_main(loaded, STUDY, force=False, wait=True) == 0
    thread.join()
    out = capsys.readouterr().out
    assert f"study {STUDY}: released to ai (42 files; released by request)" in out


def test_release_times_out_when_no_filter_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, loaded, spool = make_studies(tmp_path)
    write_study_state(spool, [waiting_entry()])
    assert release_main(loaded, STUDY, force=False, wait=True, timeout=0.3) == 1
    err = capsys.readouterr().err
    assert "the filter is not running" in err and "request stays" in err
    assert (requests(spool) / f"{STUDY}.release").exists()  # acted on when the filter starts


def test_release_times_out_when_the_filter_hangs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 fake_filter) -> None:  # noqa: F811 - the fixture
    _, loaded, spool = make_studies(tmp_path)
    write_study_state(spool, [waiting_entry()])
    fake_filter(spool)
    assert release_main(loaded, STUDY, force=False, wait=True, timeout=0.3) == 1
    assert "the filter has not taken the request within" in capsys.readouterr().err
