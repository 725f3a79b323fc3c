"""The filter with series/study-level endpoints, in process, on a fake monotonic clock.

Waiting in ``accepted/``, release after ``stable_time``, ordered study lists, late
instances, operators' requests, restarts and a release cut short, bad UIDs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from loguru import logger
from pydicom.uid import generate_uid

from pipeline.config import load
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from pipeline.studies import queue
from pipeline.studies.desk import request_path
from services.filter import FilterDaemon
from tests.helpers import dicom_files, make_dataset, write_conf, write_dataset


class Clock:
    """The desk's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _endpoint(port: int, **filter_: str) -> dict:
    return {"endpoint": {"host": "127.0.0.1", "port": port, "ae_title": "X"}, "filter": filter_}


def conf_for(tmp_path: Path, **ai_filter: str) -> Path:
    ai = {"level": "study", "conditions": "SeriesDescription=AXIAL.*", "stable_time": "60s",
          **ai_filter}
    return write_conf(tmp_path, endpoints={
        "pacs": _endpoint(1104),
        "ai": _endpoint(1105, **ai),
        "bySeries": _endpoint(1106, level="series", stable_time="30s"),
    })


def daemon_for(conf: Path, clock: Clock) -> FilterDaemon:
    daemon = FilterDaemon(load(conf), settle=0.0, rescan_interval=0.2, retry_interval=0.1)
    daemon.desk.monotonic = clock
    return daemon


def drop(spool: Spool, ds) -> Path:
    staging = spool.root.parent / "staging"
    path = write_dataset(ds, staging / f"{ds.SOPInstanceUID}.dcm")
    target = spool.incoming / path.name
    os.rename(path, target)
    return target


def study(series: dict[str, int], patient_id: str = "P1") -> list:
    """One study: per series description, that many instances (fresh UIDs, numbered)."""
    uid = generate_uid()
    datasets = []
    for number, (description, count) in enumerate(series.items(), start=1):
        series_uid = generate_uid()
        for instance in range(count, 0, -1):  # sent backwards: order comes from the numbers
            datasets.append(make_dataset(study_uid=uid, SeriesInstanceUID=series_uid,
                                         SeriesNumber=number, InstanceNumber=instance,
                                         SeriesDescription=description, patient_id=patient_id))
    return datasets


def uids(directory: Path) -> set[str]:
    return {SpoolName.parse(p.name).uid for p in dicom_files(directory)}  # type: ignore[union-attr]


def state(spool: Spool) -> dict:
    return json.loads((spool.run_dir / "studies" / "state.json").read_text())


@pytest.fixture
def clock():
    return Clock()


def test_study_and_series_endpoints_wait_then_get_whole_groups_in_order(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL CHEST": 3, "SCOUT": 2})
    b = study({"SCOUT": 2, "LOCALIZER": 1}, patient_id="P2")
    for pair in zip(a, b + [None, None], strict=True):  # interleaved
        for ds in pair:
            if ds is not None:
                drop(spool, ds)
    assert daemon.run(once=True) == 0
    everything = {ds.SOPInstanceUID for ds in a + b}
    assert uids(spool.outbox("pacs")) == everything           # instance level: at once
    assert not dicom_files(spool.outbox("ai")) and not dicom_files(spool.outbox("bySeries"))
    assert len(dicom_files(spool.accepted)) == len(everything)
    waiting = state(spool)["waiting"]
    assert sorted((w["endpoint"], w["level"]) for w in waiting) == sorted(
        [("ai", "study")] * 2 + [("bySeries", "series")] * 4)
    assert {w["instances"] for w in waiting if w["endpoint"] == "ai"} == {5, 3}

    clock.now += 31                                            # the series' stable time
    daemon.run(once=True)
    assert uids(spool.outbox("bySeries")) == everything
    assert not dicom_files(spool.outbox("ai"))
    clock.now += 30                                            # the study's
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    assert dicom_files(spool.accepted) == []
    assert dicom_files(spool.rejected) == []
    (released,) = queue.load(spool, "ai")
    order = [(ds.SeriesNumber, ds.InstanceNumber) for ds in a]
    by_prefix = {SpoolName.parse(p.name).prefix: p for p in dicom_files(spool.outbox("ai"))}  # type: ignore[union-attr]
    assert len(released.prefixes) == 5 and set(released.prefixes) == set(by_prefix)
    sent_order = []
    for prefix in released.prefixes:
        uid = SpoolName.parse(by_prefix[prefix].name).uid  # type: ignore[union-attr]
        ds = next(d for d in a if d.SOPInstanceUID == uid)
        sent_order.append((ds.SeriesNumber, ds.InstanceNumber))
    assert sent_order == sorted(order)
    assert len(queue.load(spool, "bySeries")) == 4
    decisions = state(spool)["released"]
    assert {(d["endpoint"], d["send"]) for d in decisions} == {("ai", True), ("ai", False),
                                                              ("bySeries", True)}
    assert state(spool)["waiting"] == []


def test_late_instances_follow_the_decision(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    b = study({"SCOUT": 1})
    for ds in a + b:
        drop(spool, ds)
    daemon.run(once=True)
    clock.now += 61
    daemon.run(once=True)
    late_a = make_dataset(study_uid=a[0].StudyInstanceUID, SeriesDescription="SR")
    late_b = make_dataset(study_uid=b[0].StudyInstanceUID, SeriesDescription="AXIAL")
    drop(spool, late_a), drop(spool, late_b)
    daemon.close()
    restarted = daemon_for(conf, clock)                      # decisions persist across restarts
    restarted.run(once=True)
    assert late_a.SOPInstanceUID in uids(spool.outbox("ai"))   # the study went: so does it
    assert late_b.SOPInstanceUID not in uids(spool.outbox("ai"))
    assert late_b.SOPInstanceUID in uids(spool.outbox("pacs"))


def test_late_reevaluate_decides_again_over_released_and_late(tmp_path, clock):
    conf = conf_for(tmp_path, late="reevaluate")
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    b = study({"SCOUT": 1})
    drop(spool, b[0])
    daemon.run(once=True)
    clock.now += 61
    daemon.run(once=True)
    assert not dicom_files(spool.outbox("ai"))
    late = make_dataset(study_uid=b[0].StudyInstanceUID, SeriesDescription="AXIAL")
    drop(spool, late)
    daemon.run(once=True)
    assert not dicom_files(spool.outbox("ai"))                 # waits again
    clock.now += 61
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == {late.SOPInstanceUID}   # only what is still here


def test_an_operator_releases_a_study_now(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    uid = a[0].StudyInstanceUID
    spool.write_bytes(request_path(spool, uid).parent, request_path(spool, uid).name, b"")
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    assert not request_path(spool, uid).exists()
    assert any(d["why"] == "released by an operator" for d in state(spool)["released"])


def test_nobody_wants_a_study_then_its_files_are_rejected(tmp_path, clock):
    conf = write_conf(tmp_path, endpoints={"ai": _endpoint(1105, level="study",
                                                           conditions="Modality=MR")})
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    assert len(dicom_files(spool.accepted)) == 2
    clock.now += 61
    daemon.run(once=True)
    rejected = dicom_files(spool.rejected)
    assert len(rejected) == 2 and dicom_files(spool.accepted) == []
    reason = Path(f"{rejected[0]}.reason").read_text()
    assert "decided against its series/study" in reason


def test_restart_rebuilds_the_index_from_headers(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 3, "SCOUT": 2})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    pacs_before = sorted(p.name for p in dicom_files(spool.outbox("pacs")))
    for path in dicom_files(spool.outbox("pacs")):            # delivered and pruned already
        path.unlink()
    restarted = daemon_for(conf, clock)
    restarted.run(once=True)
    assert dicom_files(spool.outbox("pacs")) == []             # the record, not the inode, says so
    assert len(pacs_before) == 5
    assert {w["instances"] for w in state(spool)["waiting"] if w["endpoint"] == "ai"} == {5}
    clock.now += 61
    restarted.run(once=True)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}


def test_a_release_cut_short_is_finished_once_after_a_restart(tmp_path, clock, monkeypatch):
    conf = conf_for(tmp_path)
    ai = conf / "endpoints" / "ai.ini"   # shaped copies: a second one would get a fresh name
    ai.write_text(ai.read_text() + "\n[coerce]\noperations = InstitutionName = ROUTED\n")
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 4})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    clock.now += 61
    made = []
    real_copy = daemon._copy

    def dying_copy(path, endpoint, uid, recovering):
        if endpoint == "ai":
            if len(made) == 2:
                raise KeyboardInterrupt("killed mid-release")  # not caught by the filter
            made.append(path.name)
        return real_copy(path, endpoint, uid, recovering)

    monkeypatch.setattr(daemon, "_copy", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        daemon.run(once=True)
    assert len(dicom_files(spool.outbox("ai"))) == 2
    restarted = daemon_for(conf, clock)
    restarted.run(once=True)
    names = [p.name for p in dicom_files(spool.outbox("ai"))]
    assert len(names) == 4 and uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    assert dicom_files(spool.accepted) == []


@pytest.mark.parametrize(("change", "why"), [
    ({"StudyInstanceUID": None}, "no StudyInstanceUID"),
    ({"SeriesInstanceUID": "1.2.abc"}, "is not a valid UID"),
    ({"StudyInstanceUID": "../../etc"}, "is not a valid UID"),
])
def test_instances_without_valid_study_uids_are_quarantined(tmp_path, clock, change, why):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    drop(spool, ds)
    daemon.run(once=True)
    (quarantined,) = dicom_files(spool.quarantine)
    assert why in Path(f"{quarantined}.reason").read_text()
    assert dicom_files(spool.outbox("pacs")) == []


def test_a_study_split_across_patients_is_routed_as_one_with_a_warning(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    a[1].PatientID = "OTHER-PATIENT"
    for ds in a:
        drop(spool, ds)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    try:
        daemon.run(once=True)
        clock.now += 61
        daemon.run(once=True)
    finally:
        logger.remove(sink)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    warnings = [line for line in lines if "different patients" in line]
    assert len(warnings) == 1 and "OTHER-PATIENT" not in warnings[0] and "P1" not in warnings[0]


def test_mpps_in_the_spool_releases_at_once_and_a_late_mpps_changes_nothing(tmp_path, clock):
    from pipeline.studies.mpps import COMPLETED, MppsStore
    from tests.test_mpps import n_create_ds, n_set_ds, series_item

    conf = conf_for(tmp_path, completion="mpps", stable_time="1h", max_wait="2h")
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 3})
    uid = a[0].StudyInstanceUID
    store = MppsStore(spool)
    step = generate_uid()
    assert store.create(step, n_create_ds(uid)) == 0
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    assert not dicom_files(spool.outbox("ai"))
    assert [w["mpps"] for w in state(spool)["waiting"] if w["endpoint"] == "ai"] == ["in progress"]
    refs = [str(ds.SOPInstanceUID) for ds in a]
    assert store.update(step, n_set_ds(COMPLETED, [series_item(a[0].SeriesInstanceUID, refs)])) == 0
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == set(refs)                # no clock moved: the MPPS did
    other = generate_uid()                                      # an MPPS for a released study
    assert store.create(other, n_create_ds(uid)) == 0
    assert store.update(other, n_set_ds(COMPLETED, [series_item(a[0].SeriesInstanceUID, refs)])) == 0
    clock.now += 31                                             # bySeries' stable time
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == set(refs) and dicom_files(spool.accepted) == []


def test_a_reload_that_changes_an_endpoints_rules_releases_its_waiting_studies(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    ai = conf / "endpoints" / "ai.ini"
    ai.write_text(ai.read_text().replace("level = study", "level = instance")
                  .replace("stable_time = 60s", ""))
    daemon.request_reload()
    daemon.run(once=True)                                   # decided by the rules it began with
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    clock.now += 31
    daemon.run(once=True)
    assert dicom_files(spool.accepted) == []
    later = make_dataset(SeriesDescription="AXIAL")
    drop(spool, later)
    daemon.run(once=True)                                   # per instance now: at once
    assert later.SOPInstanceUID in uids(spool.outbox("ai"))


def test_a_disk_error_during_a_release_is_retried(tmp_path, clock, monkeypatch):
    import errno

    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 3})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    real_link = daemon.spool.link
    calls = []

    def full_disk(src, directory, name=None):
        if directory == spool.outbox("ai") and not calls:
            calls.append(src)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_link(src, directory, name)

    monkeypatch.setattr(daemon.spool, "link", full_disk)
    clock.now += 61
    daemon.run(once=True)
    assert calls and not dicom_files(spool.outbox("ai"))
    assert len(dicom_files(spool.accepted)) == 3           # nothing lost, nothing left early
    clock.now += 1
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    assert dicom_files(spool.accepted) == []


def test_a_reload_that_makes_an_endpoint_study_level_groups_from_then_on(tmp_path, clock):
    conf = write_conf(tmp_path, endpoints={"ai": _endpoint(1105)})
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    drop(spool, make_dataset())
    daemon.run(once=True)
    assert len(dicom_files(spool.outbox("ai"))) == 1
    (conf / "endpoints" / "ai.ini").write_text(
        (conf / "endpoints" / "ai.ini").read_text() + "level = study\nstable_time = 60s\n")
    daemon.request_reload()
    a = study({"AXIAL": 2})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    assert len(dicom_files(spool.outbox("ai"))) == 1 and len(dicom_files(spool.accepted)) == 2
    assert [w["instances"] for w in state(spool)["waiting"]] == [2]
    clock.now += 61
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) >= {ds.SOPInstanceUID for ds in a}


def test_a_state_write_put_off_by_the_rate_limit_is_scheduled(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    daemon.start()
    try:
        drop(spool, a[0])
        daemon.step()
        drop(spool, a[1])
        daemon.step()                               # within the second: not written yet
        rows = [w["instances"] for w in state(spool)["waiting"] if w["endpoint"] == "ai"]
        assert rows == [1]
        wait = daemon.desk.next_due()
        assert wait is not None and wait <= 1.0     # the loop wakes for it…
        clock.now += 1.0
        daemon.step()                               # …and writes it
        rows = [w["instances"] for w in state(spool)["waiting"] if w["endpoint"] == "ai"]
        assert rows == [2]
    finally:
        daemon.close()


# -- what the review of the first version found (each failed before its fix) --------------

def test_a_disk_error_on_an_instance_copy_of_a_waiting_file_is_retried(tmp_path, clock,
                                                                        monkeypatch):
    import errno

    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 3})
    real_link, failures = daemon.spool.link, []

    def full_once(src, directory, name=None):
        if directory == spool.outbox("pacs") and not failures:
            failures.append(src)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_link(src, directory, name)

    monkeypatch.setattr(daemon.spool, "link", full_once)
    for ds in a:
        drop(spool, ds)
    daemon.start()
    try:
        for _ in range(20):
            daemon.step()
            if len(dicom_files(spool.outbox("pacs"))) == 3:
                break
            daemon.wait(0.2)
        assert failures and uids(spool.outbox("pacs")) == {ds.SOPInstanceUID for ds in a}
        clock.now += 61
        daemon.step()
    finally:
        daemon.close()
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    assert len(dicom_files(spool.outbox("pacs"))) == 3 and dicom_files(spool.accepted) == []


def test_a_restart_cut_short_keeps_the_records_of_every_file_in_accepted(tmp_path, clock,
                                                                          monkeypatch):
    from pipeline.errors import DiskTrouble

    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    for ds in study({"AXIAL": 3}):
        drop(spool, ds)
    daemon.run(once=True)
    for path in dicom_files(spool.outbox("pacs")):       # delivered and pruned
        path.unlink()
    troubled = daemon_for(conf, clock)

    def disk_trouble(path):
        raise DiskTrouble()

    monkeypatch.setattr(troubled, "process", disk_trouble)
    troubled.start()                                      # its recovery pass is cut short
    troubled.close()
    daemon_for(conf, clock).run(once=True)
    assert dicom_files(spool.outbox("pacs")) == []        # never linked again


def test_a_copy_moved_back_into_incoming_is_routed_again_despite_old_records(tmp_path, clock,
                                                                              monkeypatch):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    clock.now += 61
    daemon.run(once=True)
    back = dicom_files(spool.outbox("pacs"))[0]
    os.rename(back, spool.incoming / back.name)            # an operator's mv, same name
    crashing = daemon_for(conf, clock)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("kill -9 after the move into accepted/")

    monkeypatch.setattr(crashing, "_fan_out", killed)
    with pytest.raises(KeyboardInterrupt):
        crashing.run(once=True)
    assert (spool.accepted / back.name).exists()
    daemon_for(conf, clock).run(once=True)
    assert (spool.outbox("pacs") / back.name).exists()     # routed again, not dropped


def test_corrupt_records_never_stop_the_filter(tmp_path, clock):
    from pipeline.studies.mpps import MppsStore

    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    records = spool.run_dir / "studies"
    records.mkdir(parents=True, exist_ok=True)
    huge = "1" + "0" * 400
    (records / "decisions.log").write_text(
        "[" * 30000 + "\n" + f'{{"endpoint":"ai","study":"1.2","series":null,"send":true,'
        f'"at":{huge},"count":1,"why":"x","conditions":[],"aggregate":null}}\n')
    (records / "reached.log").write_text("\t\n" + "x" * 70000 + "\n")
    mpps = spool.run_dir / "mpps"
    mpps.mkdir(parents=True, exist_ok=True)
    (mpps / "1.2.3.json").write_text(f'{{"format":1,"uid":"1.2.3","status":"COMPLETED",'
                                     f'"studies":[],"series":{{}},"updated":{huge}}}')
    (mpps / "1.2.4.json").write_text("[" * 100000)
    assert MppsStore(spool).load_all() == {}
    a = study({"AXIAL": 2})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    clock.now += 61
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}


def test_a_reload_that_changes_the_rules_decides_the_whole_study_by_the_new_ones(tmp_path,
                                                                                clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"SCOUT": 1, "AXIAL": 2})
    drop(spool, a[0])                                       # the scout first
    daemon.run(once=True)
    ai = conf / "endpoints" / "ai.ini"
    ai.write_text(ai.read_text().replace("conditions = SeriesDescription=AXIAL.*",
                                         "conditions = SeriesDescription=AXIAL.*\n    Modality=CT"))
    daemon.request_reload()
    daemon.run(once=True)
    assert not dicom_files(spool.outbox("ai"))             # not released incomplete
    for ds in a[1:]:
        drop(spool, ds)
    daemon.run(once=True)
    clock.now += 61
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}
    assert len(dicom_files(spool.outbox("pacs"))) == 3     # pacs: each once


def test_reevaluate_with_a_shaping_endpoint_cut_short_makes_no_second_copy(tmp_path, clock,
                                                                          monkeypatch):
    conf = write_conf(tmp_path, endpoints={
        "pacs": _endpoint(1104),
        "ai": {**_endpoint(1105, level="study", stable_time="60s", late="reevaluate"),
               "coerce": {"operations": "InstitutionName = ROUTED"}},
    })
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 3})
    for ds in a:
        drop(spool, ds)
    daemon.run(once=True)
    clock.now += 61
    real_add, added = daemon.desk.reached.add, []

    def dying_add(name, endpoint):
        real_add(name, endpoint)
        if endpoint == "ai":
            added.append(name)
            if len(added) == 1:
                raise KeyboardInterrupt("kill -9 after the first shaped copy")

    monkeypatch.setattr(daemon.desk.reached, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        daemon.run(once=True)
    restarted = daemon_for(conf, clock)
    restarted.run(once=True)
    clock.now += 61
    restarted.run(once=True)
    assert len(dicom_files(spool.outbox("ai"))) == 3
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}


def test_a_finished_mpps_naming_no_instance_does_not_release_at_the_first_image(tmp_path,
                                                                                clock):
    from pipeline.studies.mpps import COMPLETED, MppsStore
    from tests.test_mpps import n_create_ds, n_set_ds, series_item

    conf = conf_for(tmp_path, completion="mpps")
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2})
    store, step = MppsStore(spool), generate_uid()
    assert store.create(step, n_create_ds(a[0].StudyInstanceUID)) == 0
    assert store.update(step, n_set_ds(COMPLETED, [series_item(a[0].SeriesInstanceUID, [])])) == 0
    drop(spool, a[0])
    daemon.run(once=True)
    assert not dicom_files(spool.outbox("ai"))             # waits: stable_time decides
    drop(spool, a[1])
    daemon.run(once=True)
    clock.now += 61
    daemon.run(once=True)
    assert uids(spool.outbox("ai")) == {ds.SOPInstanceUID for ds in a}


# -- what the second review found -------------------------------------------------------

def _failing_link_once(daemon, spool, endpoint, monkeypatch):
    import errno

    real_link, failures = daemon.spool.link, []

    def full_once(src, directory, name=None):
        if directory == spool.outbox(endpoint) and not failures:
            failures.append(src)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_link(src, directory, name)

    monkeypatch.setattr(daemon.spool, "link", full_once)
    return failures


def test_a_release_before_the_retry_of_an_owed_copy_keeps_the_file(tmp_path, clock,
                                                                   monkeypatch):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 1})
    failures = _failing_link_once(daemon, spool, "pacs", monkeypatch)
    drop(spool, a[0])
    daemon.start()
    try:
        daemon.step()                                     # pacs' copy fails: owed
        assert failures and not dicom_files(spool.outbox("pacs"))
        uid = a[0].StudyInstanceUID
        spool.write_bytes(request_path(spool, uid).parent, request_path(spool, uid).name, b"")
        daemon.step()                                     # released before the retry
        assert uids(spool.outbox("ai")) == {a[0].SOPInstanceUID}
        assert len(dicom_files(spool.accepted)) == 1      # kept: it still owes pacs a copy
        assert daemon._accepted_due <= min(daemon._retry_at.values())  # woken for it
        for _ in range(50):
            daemon.wait(0.1)
            daemon.step()
            if dicom_files(spool.outbox("pacs")):
                break
    finally:
        daemon.close()
    assert uids(spool.outbox("pacs")) == {a[0].SOPInstanceUID}
    assert len(dicom_files(spool.outbox("ai"))) == 1 and dicom_files(spool.accepted) == []


def test_a_name_that_collides_in_accepted_keeps_the_waiting_files_records(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 1})
    drop(spool, a[0])
    daemon.run(once=True)
    (copy,) = dicom_files(spool.outbox("pacs"))
    waiting = spool.accepted / copy.name
    assert waiting.exists()
    staging = spool.root.parent / "again"
    staging.mkdir()
    (staging / copy.name).write_bytes(copy.read_bytes())  # an operator's cp of the copy
    os.rename(staging / copy.name, spool.incoming / copy.name)
    copy.unlink()                                          # and the first copy is pruned
    daemon.run(once=True)
    restarted = daemon_for(conf, clock)
    restarted.run(once=True)
    assert restarted.desk.reached.of(copy.name) >= {"pacs"}
    assert not (spool.outbox("pacs") / copy.name).exists()  # the original: not linked again


def test_a_reload_that_changes_only_the_level_reads_the_waiting_study_again(tmp_path, clock):
    conf = conf_for(tmp_path)
    daemon = daemon_for(conf, clock)
    spool = daemon.spool.create(daemon.config.endpoints)
    a = study({"AXIAL": 2, "SCOUT": 1})
    for ds in a[:2]:
        drop(spool, ds)
    daemon.run(once=True)
    ai = conf / "endpoints" / "ai.ini"
    ai.write_text(ai.read_text().replace("level = study", "level = series"))
    daemon.request_reload()
    daemon.run(once=True)
    drop(spool, a[2])
    daemon.run(once=True)
    keys = sorted((k[2] != "", len(g.members)) for k, g in daemon.desk.index.groups.items()
                  if k[0] == "ai")
    assert keys == [(True, 1), (True, 2)]                   # two series groups, none per study
