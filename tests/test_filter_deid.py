"""The filter and sender of a de-identifying endpoint, in-process; its configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from pipeline.config import load
from pipeline.errors import ConfigError
from services.filter import FilterDaemon
from services.send import Sender
from tests.helpers import dicom_files, make_dataset, write_conf
from tests.test_filter_shaping import PLAIN, drop, only

KEY = b"0123456789abcdef0123456789abcdef\n"


def research(**deidentify: str) -> dict:
    return {"endpoint": {"host": "127.0.0.1", "port": 1106, "ae_title": "RESEARCH"},
            "deidentify": {"profile": "basic", "key_file": "keys/research.key", **deidentify}}


def conf_with_key(tmp_path: Path, mode: int = 0o600, key: bytes = KEY, **deidentify: str) -> Path:
    conf = write_conf(tmp_path, endpoints={"plain": PLAIN, "research": research(**deidentify)})
    (conf / "keys").mkdir(exist_ok=True)
    key_file = conf / "keys" / "research.key"
    key_file.write_bytes(key)
    key_file.chmod(mode)
    return conf


def make(tmp_path: Path) -> FilterDaemon:
    daemon = FilterDaemon(load(conf_with_key(tmp_path)), settle=0.0, rescan_interval=0.2,
                          retry_interval=0.1)
    daemon.spool.create(daemon.config.endpoints)
    return daemon


def test_the_research_endpoint_gets_a_de_identified_copy_and_the_plain_one_the_original(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    ds = make_dataset(patient_id="PID-ZZ1", patient_name="ZZDOE^ZZJOHN")
    drop(spool, ds)
    assert daemon.run(once=True) == 0
    plain, copy = only(spool.outbox("plain")), only(spool.outbox("research"))
    assert pydicom.dcmread(plain).PatientID == "PID-ZZ1"
    shaped = pydicom.dcmread(copy)
    assert shaped.PatientIdentityRemoved == "YES" and shaped.PatientID.startswith("DF")
    assert ds.SOPInstanceUID not in copy.name and shaped.SOPInstanceUID in copy.name
    assert copy.name.split("-")[:2] == plain.name.split("-")[:2]  # the received file's prefix
    assert b"ZZDOE" not in copy.read_bytes() and oct(copy.stat().st_mode & 0o777) == "0o600"


def test_a_burned_in_file_goes_to_failed_for_the_research_endpoint_only(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    drop(spool, make_dataset(sop_class="1.2.840.10008.5.1.4.1.1.7"))  # secondary capture
    assert daemon.run(once=True) == 0
    assert only(spool.outbox("plain"))
    failed = only(spool.failed("research"))
    reason = (failed.parent / (failed.name + ".error")).read_text()
    assert "Secondary Capture" in reason and "allow_burned_in" in reason
    assert "([deidentify] and [coerce] of endpoint research)" in reason
    assert dicom_files(spool.outbox("research")) == []


def test_the_sender_hands_back_a_marked_copy_that_does_not_say_identity_removed(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    drop(spool, make_dataset())
    daemon.run(once=True)
    copy = only(spool.outbox("research"))
    sender = Sender(daemon.config, "research", install_signals=False)
    assert sender._meta(copy) is not None
    forged = pydicom.dcmread(copy)
    forged.PatientIdentityRemoved = "NO"  # a marked file edited by hand
    moved = spool.outbox("research") / ("x" + copy.name)
    forged.save_as(moved)
    os.chmod(moved, 0o600)
    sender.metas.clear()
    assert sender._meta(moved) is None
    assert not moved.exists() and (spool.handback("research") / moved.name).exists()
    original = only(spool.outbox("plain"))
    hand_moved = spool.outbox("research") / ("y" + original.name)
    os.link(original, hand_moved)
    assert sender._meta(hand_moved) is None and not hand_moved.exists()


def test_the_key_file_must_be_private(tmp_path):
    with pytest.raises(ConfigError, match="readable by group or others.*chmod 600"):
        load(conf_with_key(tmp_path, mode=0o640))


@pytest.mark.parametrize("deidentify, message", [
    ({"options": "retain_everything"}, "is not an option"),
    ({"options": "clean_graphics"}, "not offered"),
    ({"options": "retain_full_dates, retain_modified_dates"}, "exclude each other"),
    ({"safe_private": "GEMS_PARM_01 (0043,xx39)"}, "needs the option retain_safe_private"),
    ({"options": "retain_safe_private", "safe_private": "GEMS (0043,1039)"}, "CREATOR"),
    ({"profile": "strict"}, "the profile is basic"),
    ({"key_file": "keys/missing.key"}, "No such file"),
])
def test_bad_de_identification_settings_name_the_key(tmp_path, deidentify, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load(conf_with_key(tmp_path, **deidentify))
    assert "[deidentify]" in str(caught.value) or "deidentify" in str(caught.value)


def test_a_short_key_and_keys_without_a_profile_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="16 to 4096 bytes"):
        load(conf_with_key(tmp_path / "a", key=b"short"))
    conf = write_conf(tmp_path / "b", endpoints={"r": {
        "endpoint": {"host": "127.0.0.1", "port": 1106, "ae_title": "R"},
        "deidentify": {"options": "retain_uids"}}})
    with pytest.raises(ConfigError, match="needs profile = basic"):
        load(conf)


def test_options_are_read_in_any_case_and_spelling(tmp_path):
    config = load(conf_with_key(tmp_path, options="Retain-Full-Dates, retain_uids"))
    deid = config.endpoints["research"].deidentify
    assert deid is not None and deid.options == {"retain_full_dates", "retain_uids"}
    assert config.endpoints["research"].shapes and not config.endpoints["plain"].shapes


def test_route_prints_why_an_undecodable_file_cannot_be_shaped(tmp_path):
    from tests.helpers import run_cli
    from tests.test_deidentify import binary_name_file

    conf = conf_with_key(tmp_path)
    src = binary_name_file(tmp_path / "files")
    result = run_cli(conf, "route", "--diff", str(src))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "ZZDOE" not in result.stdout + result.stderr
    assert "cannot be shaped, its copy would go to failed/research/" in result.stdout
    assert "BytesLengthException" in result.stdout


@pytest.mark.parametrize("operations", [
    "delete PatientIdentityRemoved",
    "PatientIdentityRemoved = NO",
    "if Modality=CT then DeidentificationMethod = mine",
    "replace LongitudinalTemporalInformationModified /REMOVED/UNMODIFIED/",
    "DeidentificationMethodCodeSequence[0].CodeValue = 1",
])
def test_a_coercion_that_undoes_the_de_identification_marks_is_refused(tmp_path, operations):
    conf = conf_with_key(tmp_path)
    endpoint = conf / "endpoints" / "research.ini"
    endpoint.write_text(endpoint.read_text() + f"\n[coerce]\noperations = {operations}\n")
    with pytest.raises(ConfigError, match=r"line 1 changes \w+, which \[deidentify\] sets") as caught:
        load(conf)
    assert "research.ini" in str(caught.value) and "operations" in str(caught.value)
    assert "[coerce]" in str(caught.value) or "coerce" in str(caught.value)


def test_other_coercions_of_a_de_identifying_endpoint_pass(tmp_path):
    conf = conf_with_key(tmp_path)
    endpoint = conf / "endpoints" / "research.ini"
    endpoint.write_text(endpoint.read_text() + "\n[coerce]\noperations = PatientComments = ok\n")
    assert load(conf).endpoints["research"].coerce


def test_a_key_file_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    conf = conf_with_key(tmp_path)
    key_file = conf / "keys" / "research.key"
    key_file.unlink()
    os.mkfifo(key_file, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(conf)
