"""The filter's shaping, driven in-process with ``run(once=True)``: global and endpoint
``[coerce]``, own copies beside hard links, recovery by name prefix, failures per
endpoint, hand-backs from a shaping endpoint's sender."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from pipeline.config import load
from pipeline.shaping import provenance
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from services.filter import FilterDaemon
from services.send import Sender
from tests.helpers import dicom_files, make_dataset, write_conf, write_dataset

SITE_A = "PatientID = SITEA-{PatientID}\nIssuerOfPatientID = SITEA"
PLAIN = {"endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"}}
COERCED = {"endpoint": {"host": "127.0.0.1", "port": 1105, "ae_title": "REMOTE"},
           "coerce": {"operations": SITE_A}}


def make(tmp_path: Path, router_ops: str | None = None, endpoints: dict | None = None) -> FilterDaemon:
    conf = write_conf(tmp_path, endpoints=endpoints or {"plain": PLAIN, "coerced": COERCED})
    if router_ops:
        with open(conf / "router.ini", "a") as ini:
            ini.write("[coerce]\noperations =\n    " + "\n    ".join(router_ops.splitlines()) + "\n")
    daemon = FilterDaemon(load(conf), settle=0.0, rescan_interval=0.2, retry_interval=0.1)
    daemon.spool.create(daemon.config.endpoints)
    return daemon


def drop(spool: Spool, ds) -> Path:
    path = write_dataset(ds, spool.root.parent / "staging" / f"{ds.SOPInstanceUID}.dcm")
    target = spool.incoming / str(SpoolName.new(ds.SOPInstanceUID))
    os.rename(path, target)  # the test's own drop, as the receiver's rename
    return target


def only(directory: Path) -> Path:
    files = dicom_files(directory)
    assert len(files) == 1, files
    return files[0]


def items_of(ds) -> list:
    return list(ds.get("OriginalAttributesSequence", []))


def test_a_coerced_endpoint_gets_its_own_file_and_a_plain_one_a_link(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    ds = make_dataset(patient_id="PID7")
    drop(spool, ds)
    assert daemon.run(once=True) == 0
    plain, coerced = only(spool.outbox("plain")), only(spool.outbox("coerced"))
    assert plain.stat().st_nlink == 1 and coerced.stat().st_nlink == 1
    assert plain.name == coerced.name  # same prefix, same SOP Instance UID
    original, shaped = pydicom.dcmread(plain), pydicom.dcmread(coerced)
    assert original.PatientID == "PID7" and "OriginalAttributesSequence" not in original
    assert shaped.PatientID == "SITEA-PID7" and shaped.IssuerOfPatientID == "SITEA"
    assert shaped.PixelData == original.PixelData
    [item] = items_of(shaped)
    assert item.ModifyingSystem == "DICOMFLOW:coerced" and item.ReasonForTheAttributeModification == "COERCE"
    modified = item.ModifiedAttributesSequence[0]
    assert modified.PatientID == "PID7"
    assert "IssuerOfPatientID" in modified and not modified.IssuerOfPatientID  # added: empty
    assert shaped.file_meta.PrivateInformationCreatorUID == provenance.SHAPED_MARK_UID
    assert provenance.shaped_for({0x00020100: provenance.SHAPED_MARK_UID.encode(),
                                  0x00020102: shaped.file_meta.PrivateInformation}) == "coerced"
    untouched = {e.tag for e in original} - {0x00100020}
    assert all(shaped[tag] == original[tag] for tag in untouched)
    assert dicom_files(spool.accepted) == []


def test_the_global_coercion_replaces_the_accepted_file_and_endpoints_decide_on_it(tmp_path):
    endpoints = {"plain": PLAIN,
                 "hospital_a": {"endpoint": {"host": "127.0.0.1", "port": 1106, "ae_title": "A"},
                                "filter": {"conditions": "InstitutionName=Hospital A"}}}
    daemon = make(tmp_path, "InstitutionName = Hospital A", endpoints)
    spool = daemon.spool
    drop(spool, make_dataset(InstitutionName="HOSP-A"))
    assert daemon.run(once=True) == 0
    plain, other = only(spool.outbox("plain")), only(spool.outbox("hospital_a"))
    assert os.path.samefile(plain, other)  # one coerced file, hard-linked to both
    shaped = pydicom.dcmread(plain)
    assert shaped.InstitutionName == "Hospital A"
    [item] = items_of(shaped)
    assert item.ModifyingSystem == "DICOMFLOW"
    assert item.ModifiedAttributesSequence[0].InstitutionName == "HOSP-A"
    assert shaped.file_meta.PrivateInformation.rstrip(b"\0") == (
        b"coerced by " + spool.instance_id().encode())  # this spool's: never again here


def test_a_file_already_coerced_globally_is_never_coerced_again(tmp_path):
    daemon = make(tmp_path, "PatientID = SITEA-{PatientID}", {"plain": PLAIN})
    spool = daemon.spool
    drop(spool, make_dataset(patient_id="PID1"))
    daemon.run(once=True)
    once = only(spool.outbox("plain"))
    os.rename(once, spool.incoming / once.name)  # dropped back in, as after a crash and redo
    daemon.run(once=True)
    again = pydicom.dcmread(only(spool.outbox("plain")))
    assert again.PatientID == "SITEA-PID1" and len(items_of(again)) == 1


def test_an_endpoint_copy_already_made_is_not_made_again_after_a_crash(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    ds = make_dataset()
    drop(spool, ds)
    daemon.run(once=True)
    made = only(spool.outbox("coerced"))
    sent = spool.sent("coerced") / made.name
    os.rename(made, sent)  # delivered meanwhile
    # the crash: the received file is still in accepted/, the plain link is missing
    os.rename(only(spool.outbox("plain")), spool.accepted / made.name)
    daemon.run(once=True)
    assert dicom_files(spool.outbox("coerced")) == [] and dicom_files(spool.sent("coerced")) == [sent]
    assert only(spool.outbox("plain")).name == made.name
    assert dicom_files(spool.accepted) == []


def test_a_copy_with_a_changed_uid_is_recognised_by_its_prefix(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    received = spool.accepted / str(SpoolName.new(make_dataset().SOPInstanceUID))
    write_dataset(make_dataset(), received)
    parsed = SpoolName.parse(received.name)
    assert parsed is not None
    other = SpoolName(parsed.time, parsed.counter, "1.2.3.4")  # the copy's own UID
    write_dataset(make_dataset(), spool.failed("coerced") / str(other))
    daemon.run(once=True)
    assert dicom_files(spool.outbox("coerced")) == []
    assert only(spool.outbox("plain")).name == received.name


def test_a_file_that_cannot_be_shaped_goes_to_failed_for_that_endpoint_only(tmp_path):
    coerced = {"endpoint": COERCED["endpoint"], "coerce": {"operations": "InstitutionName = Zürich €"}}
    daemon = make(tmp_path, endpoints={"plain": PLAIN, "coerced": coerced})
    spool = daemon.spool
    drop(spool, make_dataset())  # no Specific Character Set: ASCII only
    assert daemon.run(once=True) == 0
    assert only(spool.outbox("plain"))
    failed = only(spool.failed("coerced"))
    reason = (failed.parent / (failed.name + ".error")).read_text()
    assert "cannot be shaped" in reason and "InstitutionName" in reason
    assert dicom_files(spool.outbox("coerced")) == []
    assert "Zürich" not in reason  # values are patient data: never in a reason


def test_a_handed_back_file_is_shaped_for_that_endpoint_alone(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    ds = make_dataset(patient_id="PID9")
    back = write_dataset(ds, spool.handback("coerced") / str(SpoolName.new(ds.SOPInstanceUID)))
    daemon.start()
    try:
        daemon.recover_accepted()
    finally:
        daemon.close()
    assert not back.exists()
    assert pydicom.dcmread(only(spool.outbox("coerced"))).PatientID == "SITEA-PID9"
    assert dicom_files(spool.outbox("plain")) == []


def test_the_sender_of_a_shaping_endpoint_hands_unshaped_files_back(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    drop(spool, make_dataset())
    daemon.run(once=True)
    shaped = only(spool.outbox("coerced"))
    original = only(spool.outbox("plain"))
    moved = spool.outbox("coerced") / ("x" + original.name)
    os.link(original, moved)  # an operator's mv of an unshaped copy
    sender = Sender(daemon.config, "coerced", install_signals=False)
    assert sender._meta(shaped) is not None
    assert sender._meta(moved) is None
    assert not moved.exists() and (spool.handback("coerced") / moved.name).exists()


def test_the_filter_removes_its_own_shaping_temp_files_at_start(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    leftover = Spool.process_tmp_dir(spool.outbox("coerced"), "filter") / "123.0.cut-short"
    leftover.write_bytes(b"half a copy")
    senders = spool.tmp_dir(spool.outbox("coerced")) / "456.0.sender"
    senders.write_bytes(b"the sender's")
    daemon.run(once=True)
    assert not leftover.exists() and senders.exists()


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_every_uncompressed_syntax_is_shaped_in_its_own_encoding(tmp_path, syntax):
    daemon = make(tmp_path)
    spool = daemon.spool
    ds = make_dataset(patient_id="PID5")
    ds.file_meta.TransferSyntaxUID = syntax
    drop(spool, ds)
    daemon.run(once=True)
    shaped = pydicom.dcmread(only(spool.outbox("coerced")))
    assert shaped.file_meta.TransferSyntaxUID == syntax
    assert shaped.PatientID == "SITEA-PID5" and shaped.PixelData == ds.PixelData


def _forged(ds, system: str):
    """A data set that claims, in the data set, to be coerced already."""
    item = pydicom.Dataset()
    item.ModifyingSystem, item.ReasonForTheAttributeModification = system, "COERCE"
    ds.OriginalAttributesSequence = pydicom.Sequence([item])
    return ds


def test_an_item_from_the_network_does_not_stop_a_coercion(tmp_path):
    daemon = make(tmp_path, "InstitutionName = Hospital A")
    spool = daemon.spool
    drop(spool, _forged(_forged(make_dataset(patient_id="P1", InstitutionName="X"), "DICOMFLOW"),
                        "DICOMFLOW:coerced"))
    daemon.run(once=True)
    plain = pydicom.dcmread(only(spool.outbox("plain")))
    coerced = pydicom.dcmread(only(spool.outbox("coerced")))
    assert plain.InstitutionName == coerced.InstitutionName == "Hospital A"
    assert coerced.PatientID == "SITEA-P1"
    assert len(items_of(coerced)) == 3  # the forged one, the global stage's, the endpoint's


def test_a_recovered_coerced_file_is_decided_by_the_endpoints_alone(tmp_path):
    conf_filter = "PatientID=PID.*"  # holds for the original, not for the coerced value
    daemon = make(tmp_path, "PatientID = SITEA-{PatientID}", {"plain": PLAIN})
    with open(daemon.config.conf_dir / "router.ini", "a") as ini:
        ini.write(f"[filter]\nconditions = {conf_filter}\n")
    daemon = FilterDaemon(load(daemon.config.conf_dir), settle=0.0, rescan_interval=0.2)
    spool = daemon.spool
    drop(spool, make_dataset(patient_id="PID3"))
    daemon.run(once=True)
    copy = only(spool.outbox("plain"))
    os.rename(copy, spool.accepted / copy.name)  # as if killed before the fan-out
    daemon.run(once=True)
    assert pydicom.dcmread(only(spool.outbox("plain"))).PatientID == "SITEA-PID3"
    assert dicom_files(spool.rejected) == []


def test_a_link_or_folder_among_the_hand_backs_goes_to_quarantine(tmp_path):
    daemon = make(tmp_path)
    spool = daemon.spool
    folder = spool.handback("coerced")
    (folder / "a-link.dcm").symlink_to("/etc/passwd")
    (folder / "a-folder.dcm").mkdir()
    daemon.start()
    try:
        daemon.recover_accepted()
    finally:
        daemon.close()
    assert dicom_files(spool.failed("coerced")) == []
    assert [p for p in folder.iterdir() if not p.name.startswith(".")] == []
    reasons = [p.read_text() for p in spool.quarantine.glob("*.reason")]
    assert len(reasons) == 2 and all("not a regular file" in r for r in reasons)
