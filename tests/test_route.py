"""``dicomflow route FILE…``: the dry run prints decisions and moves nothing."""

from __future__ import annotations

import os

from tests import corpus
from tests.helpers import make_dataset, run_cli, write_conf, write_dataset
from tests.test_filter import ENDPOINTS


def test_route_explains_without_moving(tmp_path):
    conf = write_conf(tmp_path, filter_={"sop_blacklist": "EncapsulatedPDFStorage"}, endpoints=ENDPOINTS)
    files = tmp_path / "files"
    ct = write_dataset(make_dataset(modality="CT"), files / "ct.dcm")
    mr = write_dataset(make_dataset("1.2.840.10008.5.1.4.1.1.4", modality="MR"), files / "mr.dcm")
    pdf = write_dataset(make_dataset("1.2.840.10008.5.1.4.1.1.104.1", modality="DOC"), files / "doc.dcm")
    corpus.build(tmp_path / "bad")
    shadow = tmp_path / "bad" / "shadow-link.dcm"
    fifo = tmp_path / "bad" / "fifo.dcm"
    before = sorted(os.listdir(files))

    result = run_cli(conf, "route", str(ct), str(mr), str(pdf), str(shadow), str(fifo))
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert f"{ct}: route to ct_only, pacs" in out
    assert "  mr_research: no — sop_whitelist does not contain 1.2.840.10008.5.1.4.1.1.2" in out
    assert f"{mr}: route to mr_research, pacs" in out
    assert "  ct_only: no — condition 'Modality=CT' does not hold" in out
    assert f"{pdf}: rejected: global rule: sop_blacklist contains 1.2.840.10008.5.1.4.1.1.104.1" in out
    assert f"{shadow}: quarantine: a symbolic link (-> /etc/shadow), never followed" in out
    assert f"{fifo}: quarantine: not a regular file (a FIFO)" in out
    assert sorted(os.listdir(files)) == before
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").rglob("*.dcm"))


def test_route_no_endpoint_matched(tmp_path):
    conf = write_conf(tmp_path, endpoints={"mr_only": {
        "endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"},
        "filter": {"conditions": "Modality=MR"}}})
    ct = write_dataset(make_dataset(modality="CT"), tmp_path / "ct.dcm")
    result = run_cli(conf, "route", str(ct))
    assert result.returncode == 0
    assert "rejected: no endpoint matched (mr_only: condition 'Modality=MR' does not hold)" in result.stdout


def test_route_unreadable_file_exits_1(tmp_path):
    conf = write_conf(tmp_path, endpoints=ENDPOINTS)
    ct = write_dataset(make_dataset(), tmp_path / "ct.dcm")
    result = run_cli(conf, "route", str(tmp_path / "missing.dcm"), str(ct))
    assert result.returncode == 1
    assert "missing.dcm: cannot read: No such file or directory" in result.stdout
    assert f"{ct}: route to" in result.stdout


def test_route_diff_shows_the_de_identification_with_pseudonyms_but_no_original(tmp_path):
    from tests.helpers import write_key

    conf = write_conf(tmp_path, endpoints={"research": {
        "endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "RESEARCH"},
        "deidentify": {"profile": "basic", "key_file": "keys/research.key"}}})
    write_key(conf)
    path = write_dataset(make_dataset(patient_name="ZZDOE^ZZJOHN", patient_id="PID-ZZ4711"),
                         tmp_path / "files" / "ct.dcm")
    diff = run_cli(conf, "route", str(path), "--diff")
    assert diff.returncode == 0, diff.stderr
    assert "[deidentify] then [coerce]:" in diff.stdout
    assert "changed PatientID: → 'DF" in diff.stdout
    assert "added PatientIdentityRemoved: → 'YES'" in diff.stdout
    assert "PID-ZZ4711" not in diff.stdout and "ZZDOE" not in diff.stdout
    shown = run_cli(conf, "route", str(path), "--show-values")
    assert "'PID-ZZ4711' → 'DF" in shown.stdout
    written = run_cli(conf, "route", str(path), "--write", str(tmp_path / "out"))
    assert written.returncode == 0, written.stderr
    import pydicom

    copy = tmp_path / "out" / "research" / "ct.dcm"
    assert b"PID-ZZ4711" not in copy.read_bytes() and b"ZZDOE" not in copy.read_bytes()
    assert pydicom.dcmread(copy).PatientIdentityRemoved == "YES"
