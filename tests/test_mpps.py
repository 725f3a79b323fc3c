"""MPPS (issue 17, item 2): the record store, and N-CREATE / N-SET over loopback from a
pynetdicom MPPS SCU to the real receive daemon, with and without the fast path."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep

from pipeline.spool import Spool
from pipeline.studies import mpps
from pipeline.studies.mpps import COMPLETED, DISCONTINUED, IN_PROGRESS, MppsRecord, MppsStore
from tests.helpers import Daemon, dicom_files, make_dataset, router_port, write_conf

# -- data sets an MPPS SCU sends -----------------------------------------------------------


def n_create_ds(study: str, status: str = IN_PROGRESS) -> Dataset:
    """An N-CREATE attribute list (the attributes completion needs, plus patient data
    that must never reach the record)."""
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PHI-12345"
    item = Dataset()
    item.StudyInstanceUID = study
    item.AccessionNumber = "A1"
    ds.ScheduledStepAttributesSequence = Sequence([item])
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = Sequence()
    return ds


def series_item(series: str, instances: list[str], non_image: list[str] = ()) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = series
    refs = []
    for uid in instances:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    item.ReferencedImageSequence = Sequence(refs)
    others = []
    for uid in non_image:
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
        ref.ReferencedSOPInstanceUID = uid
        others.append(ref)
    item.ReferencedNonImageCompositeSOPInstanceSequence = Sequence(others)
    return item


def n_set_ds(status: str | None, series: list[Dataset] | None = None) -> Dataset:
    ds = Dataset()
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    if series is not None:
        ds.PerformedSeriesSequence = Sequence(series)
    return ds


# -- the store -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> MppsStore:
    return MppsStore(Spool(tmp_path / "spool").create())


def test_create_then_complete_records_studies_series_and_instances(store: MppsStore) -> None:
    uid, study, series = generate_uid(), generate_uid(), generate_uid()
    images, sr = [generate_uid() for _ in range(3)], [generate_uid()]
    assert not store.directory.exists()  # created on demand
    assert store.create(uid, n_create_ds(study)) == 0
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    record = store.load_all()[uid]
    assert (record.status, record.studies, record.finished) == (IN_PROGRESS, {study}, False)
    assert store.update(uid, n_set_ds(COMPLETED, [series_item(series, images, sr)])) == 0
    record = store.load_all()[uid]
    assert record.status == COMPLETED and record.finished
    assert record.studies == {study}
    assert record.series == {series: frozenset(images + sr)}
    assert record.instances == frozenset(images + sr)
    path = store.directory / f"{uid}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "Doe" not in text and "PHI-12345" not in text
    assert [p.name for p in store.directory.iterdir() if not p.name.startswith(".")] == [path.name]


def test_n_set_without_series_keeps_them_and_a_new_sequence_replaces_them(store: MppsStore) -> None:
    uid, a, b = generate_uid(), generate_uid(), generate_uid()
    first, second = generate_uid(), generate_uid()
    assert store.create(uid, n_create_ds(generate_uid())) == 0
    assert store.update(uid, n_set_ds(None, [series_item(a, [first])])) == 0
    assert store.update(uid, n_set_ds(IN_PROGRESS)) == 0
    assert store.load_all()[uid].instances == {first}
    assert store.update(uid, n_set_ds(None, [series_item(a, [first]), series_item(b, [second])])) == 0
    assert store.load_all()[uid].series == {a: {first}, b: {second}}


def test_statuses_of_refusals(store: MppsStore) -> None:
    uid = generate_uid()
    assert store.update(uid, n_set_ds(COMPLETED)) == 0x0112  # unknown step
    assert store.create(uid, n_create_ds(generate_uid(), status=COMPLETED)) == 0x0106
    no_status = n_create_ds(generate_uid())
    del no_status.PerformedProcedureStepStatus
    assert store.create(uid, no_status) == 0x0120
    assert store.create(uid, n_create_ds(generate_uid())) == 0
    assert store.create(uid, n_create_ds(generate_uid())) == 0x0111  # duplicate
    assert store.update(uid, n_set_ds("PAUSED")) == 0x0106
    assert store.update(uid, n_set_ds(DISCONTINUED)) == 0
    assert store.load_all()[uid].status == DISCONTINUED
    assert store.update(uid, n_set_ds(COMPLETED)) == 0xA710  # may no longer be updated
    assert store.create("", n_create_ds(generate_uid())) == 0x0120
    for hostile in ("../../evil", "1.2/../../3", "1" * 200, "1.2.3\n4"):
        assert store.create(hostile, n_create_ds(generate_uid())) == 0x0106
        assert store.update(hostile, n_set_ds(COMPLETED)) == 0x0106
    assert sorted(p.name for p in store.directory.glob("*.json")) == [f"{uid}.json"]


def test_invalid_references_are_ignored(store: MppsStore) -> None:
    uid, good = generate_uid(), generate_uid()
    ds = n_create_ds("not/a/uid")
    ds.PerformedSeriesSequence = Sequence([series_item("x" * 70, [generate_uid()]),
                                           series_item(generate_uid(), [good, "../x"])])
    assert store.create(uid, ds) == 0
    record = store.load_all()[uid]
    assert record.studies == frozenset() and record.instances == {good}


def test_too_many_references_is_a_processing_failure(store: MppsStore, monkeypatch) -> None:
    monkeypatch.setattr(mpps, "MAX_INSTANCES", 5)
    uid = generate_uid()
    assert store.create(uid, n_create_ds(generate_uid())) == 0
    many = [generate_uid() for _ in range(6)]
    assert store.update(uid, n_set_ds(COMPLETED, [series_item(generate_uid(), many)])) == 0x0110
    assert store.load_all()[uid].status == IN_PROGRESS


def test_disk_error_is_a_processing_failure(store: MppsStore, monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.spool, "write_bytes", broken)
    assert store.create(generate_uid(), n_create_ds(generate_uid())) == 0x0110


def test_corrupt_record_is_skipped_with_one_warning(store: MppsStore, caplog_loguru) -> None:
    uid = generate_uid()
    assert store.create(uid, n_create_ds(generate_uid())) == 0
    bad = store.directory / f"{generate_uid()}.json"
    bad.write_text("{not json")
    renamed = store.directory / f"{generate_uid()}.json"
    renamed.write_bytes((store.directory / f"{uid}.json").read_bytes())  # uid is not its name
    assert set(store.load_all()) == {uid}
    assert set(store.load_all()) == {uid}
    warnings = [m for m in caplog_loguru if "skipping MPPS record" in m]
    assert len(warnings) == 2, warnings


def test_load_all_reparses_only_changed_files(store: MppsStore, monkeypatch) -> None:
    uids = [generate_uid() for _ in range(3)]
    for uid in uids:
        assert store.create(uid, n_create_ds(generate_uid())) == 0
    assert set(store.load_all()) == set(uids)
    parsed: list[str] = []
    original = MppsRecord.from_json

    def counting(data: bytes) -> MppsRecord:
        record = original(data)
        parsed.append(record.uid)
        return record

    monkeypatch.setattr(MppsRecord, "from_json", staticmethod(counting))
    assert set(store.load_all()) == set(uids)
    assert parsed == []
    assert store.update(uids[1], n_set_ds(COMPLETED)) == 0
    parsed.clear()
    assert store.load_all()[uids[1]].status == COMPLETED
    assert parsed == [uids[1]]
    (store.directory / f"{uids[0]}.json").unlink()
    assert set(store.load_all()) == set(uids[1:])


def test_prune_removes_records_not_updated_for_long(store: MppsStore) -> None:
    old, new = generate_uid(), generate_uid()
    assert store.create(old, n_create_ds(generate_uid())) == 0
    assert store.create(new, n_create_ds(generate_uid())) == 0
    path = store.directory / f"{old}.json"
    raw = json.loads(path.read_text())
    raw["updated"] -= 7200
    path.write_text(json.dumps(raw))
    assert store.prune(older_than=3600) == 1
    assert set(store.load_all()) == {new}


@pytest.fixture
def caplog_loguru():
    """The log lines loguru emits during the test."""
    from pipeline.log import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    yield lines
    logger.remove(sink)


# -- over loopback: a pynetdicom MPPS SCU against the real receive daemon --------------------

FASTPATH = pytest.mark.parametrize("fastpath", ["1", "0"], ids=["fastpath", "pynetdicom"])


class Receiver:
    def __init__(self, tmp_path: Path, fastpath: str) -> None:
        self.conf = write_conf(tmp_path, router={"log_level": "INFO"})
        self.port = router_port(self.conf)
        self.spool = tmp_path / "spool"
        self.mpps = self.spool / "run" / "mpps"
        self.daemon = Daemon(self.conf, "receive", env={"DICOMFLOW_FASTPATH": fastpath})
        #: pynetdicom logs a traceback for a message it cannot decode (a UID > 64 chars)
        self.undecodable_sent = False

    def records(self) -> dict[str, MppsRecord]:
        return MppsStore(Spool(self.spool)).load_all()

    def associate(self, storage: bool = False, handlers: list | None = None,
                  dimse_timeout: float = 30.0):
        ae = AE(ae_title="CT1")
        ae.dimse_timeout = dimse_timeout
        ae.add_requested_context(ModalityPerformedProcedureStep)
        if storage:
            ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMFLOW",
                             evt_handlers=handlers or [])
        assert assoc.is_established, self.daemon.log()[-2000:]
        return assoc


@pytest.fixture
def receiver(tmp_path: Path, fastpath: str):
    running = Receiver(tmp_path, fastpath)
    running.daemon.start()
    running.daemon.wait_log("listening as")
    yield running
    assert running.daemon.stop() == 0, running.daemon.log()[-2000:]
    log = running.daemon.log()
    if running.undecodable_sent:
        log = "\n".join(line for line in log.splitlines() if "must not exceed 64" not in line)
    assert "Traceback" not in log, log[-3000:]
    assert "Doe" not in log and "PHI-12345" not in log


def _status(result: tuple) -> int:
    status, _ = result
    assert "Status" in status, "no answer (aborted?)"
    return int(status.Status)


@FASTPATH
def test_n_create_images_then_n_set_completed(receiver: Receiver) -> None:
    """One association with MPPS and storage contexts: N-CREATE, two C-STOREs, N-SET
    COMPLETED referencing them; the record says so, the images are in incoming/."""
    uid, study, series = generate_uid(), generate_uid(), generate_uid()
    images = [make_dataset(study_uid=study, SeriesInstanceUID=series) for _ in range(2)]
    assoc = receiver.associate(storage=True)
    try:
        assert _status(assoc.send_n_create(n_create_ds(study), ModalityPerformedProcedureStep, uid)) == 0
        assert receiver.records()[uid].status == IN_PROGRESS  # durable before the answer
        assert [assoc.send_c_store(ds).Status for ds in images] == [0, 0]
        refs = [str(ds.SOPInstanceUID) for ds in images]
        modification = n_set_ds(COMPLETED, [series_item(series, refs)])
        assert _status(assoc.send_n_set(modification, ModalityPerformedProcedureStep, uid)) == 0
        assert _status(assoc.send_n_set(n_set_ds(COMPLETED), ModalityPerformedProcedureStep,
                                        uid)) == 0xA710
    finally:
        assoc.release()
    record = receiver.records()[uid]
    assert record.status == COMPLETED and record.studies == {study}
    assert record.series == {series: frozenset(refs)}
    assert len(dicom_files(receiver.spool / "incoming")) == 2
    receiver.daemon.wait_log(f"MPPS {uid} COMPLETED (study {study}, 2 instances) from 'CT1'")


@FASTPATH
def test_unknown_duplicate_discontinued_and_generated_uid(receiver: Receiver) -> None:
    uid = generate_uid()
    answered: list[str] = []  # the Affected SOP Instance UIDs of the N-CREATE-RSPs

    def on_dimse(event: evt.Event) -> None:
        command = event.message.command_set
        if command.CommandField == 0x8140:
            answered.append(str(command.get("AffectedSOPInstanceUID", "")))

    assoc = receiver.associate(handlers=[(evt.EVT_DIMSE_RECV, on_dimse)])
    try:
        assert _status(assoc.send_n_set(n_set_ds(COMPLETED), ModalityPerformedProcedureStep,
                                        generate_uid())) == 0x0112
        assert _status(assoc.send_n_create(n_create_ds(generate_uid()),
                                           ModalityPerformedProcedureStep, uid)) == 0
        assert _status(assoc.send_n_create(n_create_ds(generate_uid()),
                                           ModalityPerformedProcedureStep, uid)) == 0x0111
        assert _status(assoc.send_n_create(n_create_ds(generate_uid(), status=COMPLETED),
                                           ModalityPerformedProcedureStep, generate_uid())) == 0x0106
        assert _status(assoc.send_n_set(n_set_ds(DISCONTINUED), ModalityPerformedProcedureStep,
                                        uid)) == 0
        # no uid in the N-CREATE: the receiver makes one and answers it
        assert _status(assoc.send_n_create(n_create_ds(generate_uid()),
                                           ModalityPerformedProcedureStep)) == 0
    finally:
        assoc.release()
    generated = answered[-1]
    assert answered[0] == uid and generated not in ("", uid)
    records = receiver.records()
    assert records[uid].status == DISCONTINUED and records[uid].finished
    assert records[generated].status == IN_PROGRESS
    assert set(records) == {uid, generated}


@FASTPATH
def test_hostile_uids_are_refused_and_nothing_is_written_outside(receiver: Receiver,
                                                                  monkeypatch) -> None:
    """Path characters and a 200-character uid (our SCU's own check is switched off to
    send it): refused, no record, nothing anywhere in the spool but run/mpps (and the
    journal, which its writer thread may open at any moment).

    The 200-character one never reaches our handler: pynetdicom cannot decode the
    command (its UID setter refuses > 64 characters), logs it and drops the message
    unanswered, so our SCU gives up after its DIMSE timeout and aborts."""
    from pynetdicom import _config

    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    before = _spool_files(receiver.spool)
    receiver.undecodable_sent = True
    for hostile in ("../../../evil", "1.2/../../../x", "1" * 200):
        assoc = receiver.associate(dimse_timeout=5.0)
        try:
            status, _ = assoc.send_n_create(n_create_ds(generate_uid()),
                                            ModalityPerformedProcedureStep, hostile)
            assert status.get("Status", None) != 0  # refused, or the association aborted
            if assoc.is_established:
                status, _ = assoc.send_n_set(n_set_ds(COMPLETED), ModalityPerformedProcedureStep,
                                             hostile)
                assert status.get("Status", None) != 0
        finally:
            if assoc.is_established:
                assoc.release()
    assert receiver.daemon.alive()
    assert receiver.records() == {}
    after = _spool_files(receiver.spool)
    # the journal's -wal/-shm appear whenever its writer thread opens it, which may be
    # after `before` was taken: router state, not something the requests wrote
    assert [p for p in after - before
            if "run/mpps" not in p and not p.startswith("run/journal.sqlite")] == []
    assert not (receiver.spool.parent / "evil").exists()
    # still serving
    assoc = receiver.associate()
    try:
        assert _status(assoc.send_n_create(n_create_ds(generate_uid()),
                                           ModalityPerformedProcedureStep, generate_uid())) == 0
    finally:
        assoc.release()


def _spool_files(spool: Path) -> set[str]:
    found = set()
    for folder, _dirs, files in os.walk(spool):
        for name in files:
            found.add(os.path.relpath(os.path.join(folder, name), spool))
    return found


def test_fast_path_is_left_only_by_associations_that_propose_mpps(tmp_path: Path) -> None:
    """The receive data path serves C-STORE and C-ECHO only: an association proposing
    MPPS stays on pynetdicom's path (its stores too); storage-only ones keep the fast path."""
    running = Receiver(tmp_path, "1")
    (running.conf / "router.ini").write_text(
        (running.conf / "router.ini").read_text().replace("log_level = INFO", "log_level = DEBUG"))
    running.daemon.start()
    try:
        running.daemon.wait_log("listening as")
        marker = "on the receive data path"
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="DICOMFLOW")
        assert assoc.is_established
        assert assoc.send_c_store(make_dataset()).Status == 0
        assoc.release()
        assert running.daemon.log().count(marker) == 1
        assoc = running.associate(storage=True)
        assert assoc.send_c_store(make_dataset()).Status == 0
        assert _status(assoc.send_n_create(n_create_ds(generate_uid()),
                                           ModalityPerformedProcedureStep, generate_uid())) == 0
        assoc.release()
        assert running.daemon.log().count(marker) == 1
        assert len(dicom_files(running.spool / "incoming")) == 2
    finally:
        assert running.daemon.stop() == 0
