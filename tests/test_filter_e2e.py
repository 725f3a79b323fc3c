"""End to end: ``dicomflow filter`` (and ``receive``) as real subprocesses.

Files arrive by rename (receiver, ``mv``), by a slow copy (``cp``), as a malformed
corpus, through kill -9 of the filter, and over DICOM from DCMTK's storescu.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.header import read_header
from pipeline.spool import Spool
from tests import corpus
from tests.helpers import (
    Daemon,
    dicom_files,
    make_dataset,
    router_port,
    tmp_leftovers,
    wait_for,
    write_conf,
    write_dataset,
)
from tests.peers import storescu
from tests.test_filter import ENDPOINTS, uids_in

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e

PDF = "1.2.840.10008.5.1.4.1.1.104.1"
MR = "1.2.840.10008.5.1.4.1.1.4"


def start_filter(conf: Path, name: str = "filter") -> Daemon:
    daemon = Daemon(conf, "filter", log_name=name).start()
    daemon.wait_log("filter ready")
    return daemon


@pytest.fixture
def pipeline(tmp_path):
    conf = write_conf(tmp_path, filter_={"sop_blacklist": "EncapsulatedPDFStorage"}, endpoints=ENDPOINTS)
    spool = Spool(tmp_path / "spool")
    daemon = start_filter(conf)
    yield conf, spool, daemon
    if daemon.alive():
        assert daemon.stop() == 0


def mv(path: Path, spool: Spool) -> Path:
    target = spool.incoming / path.name
    os.rename(path, target)  # the operator's `mv`
    return target


def test_mv_and_slow_cp_land_in_the_right_outboxes(pipeline, tmp_path):
    conf, spool, daemon = pipeline
    mr = make_dataset(MR, modality="MR")
    mv(write_dataset(mr, tmp_path / "drop" / "mr.dcm"), spool)
    big = make_dataset(modality="CT", rows=5000, cols=5000)  # 50 MB of pixel data
    source = write_dataset(big, tmp_path / "drop" / "big.dcm")
    target = spool.incoming / "big copy.dcm"
    with open(source, "rb") as src, open(target, "wb") as dst:  # what cp does, slowly
        while chunk := src.read(2 * 1024 * 1024):
            dst.write(chunk)
            dst.flush()
            threading.Event().wait(0.02)  # pace the writer (not a wait for the daemon)
            assert target.exists(), "a half-written copy was routed"
    wait_for(lambda: uids_in(spool.outbox("ct_only")) == [big.SOPInstanceUID], message="big copy routed")
    wait_for(lambda: uids_in(spool.outbox("mr_research")) == [mr.SOPInstanceUID], message="mv routed")
    # fan-out links one outbox after the other: wait for the last one too
    wait_for(lambda: sorted(uids_in(spool.outbox("pacs"))) == sorted([mr.SOPInstanceUID, big.SOPInstanceUID]),
             message="both in pacs")
    [routed] = dicom_files(spool.outbox("ct_only"))
    assert routed.stat().st_size == source.stat().st_size
    assert stat.S_IMODE(routed.stat().st_mode) == 0o600
    for directory in (spool.incoming, spool.accepted, spool.outbox("pacs"), spool.quarantine):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    subprocess.run(["cp", str(source), str(spool.incoming / "again.dcm")], check=True)  # a real cp
    wait_for(lambda: len(dicom_files(spool.outbox("ct_only"))) == 2, message="cp routed")
    assert dicom_files(spool.rejected) == [] and dicom_files(spool.quarantine) == []


def test_malformed_corpus_is_quarantined_and_the_daemon_stays_up(pipeline, tmp_path):
    conf, spool, daemon = pipeline
    cases = corpus.build(tmp_path / "corpus")
    for case in cases:
        os.rename(tmp_path / "corpus" / case.name, spool.incoming / case.name)
    wait_for(lambda: len(quarantined(spool)) == len(cases), message="the corpus in quarantine")
    assert os.listdir(spool.incoming) == [".tmp"]
    reasons = "".join(p.read_text() for p in spool.quarantine.glob("*.reason"))
    for case in cases:
        assert f"original name: {case.name}\n" in reasons
    good = make_dataset()
    mv(write_dataset(good, tmp_path / "good.dcm"), spool)
    wait_for(lambda: uids_in(spool.outbox("pacs")) == [good.SOPInstanceUID], message="good file routed")
    assert daemon.alive()
    assert daemon.log().count("quarantined as") == len(cases)


def quarantined(spool: Spool) -> list[str]:
    """Every entry of quarantine/ (symlinks, FIFOs and directories included), no sidecars."""
    return [n for n in os.listdir(spool.quarantine) if not n.startswith(".") and not n.endswith(".reason")]


def test_a_second_filter_exits_1(pipeline):
    conf, spool, daemon = pipeline
    second = Daemon(conf, "filter", log_name="second").start()
    wait_for(lambda: not second.alive(), message="the second filter to exit")
    assert second.proc.returncode == 1
    assert "already running" in second.log()


@pytest.mark.slow
def test_kill_9_at_random_points_loses_and_doubles_nothing(tmp_path):
    conf = write_conf(tmp_path, filter_={"sop_blacklist": "EncapsulatedPDFStorage"}, endpoints=ENDPOINTS)
    spool = Spool(tmp_path / "spool")
    staging = tmp_path / "staging"
    rng = random.Random(1234)
    kinds = {}
    for index in range(500):
        kind = rng.choice(["CT", "MR", "PDF"])
        sop = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": MR, "PDF": PDF}[kind]
        ds = make_dataset(sop, modality=kind, rows=4, cols=4)
        write_dataset(ds, staging / f"{index:04d}-{ds.SOPInstanceUID}.dcm")
        kinds[ds.SOPInstanceUID] = kind
    files = sorted(staging.iterdir())
    dropped = threading.Event()

    def dropper() -> None:
        for path in files:
            os.rename(path, spool.incoming / path.name)
            if rng.random() < 0.05:
                threading.Event().wait(0.01)
        dropped.set()

    daemon = start_filter(conf, "filter-0")
    threading.Thread(target=dropper, daemon=True).start()
    for round_ in range(1, 11):
        threading.Event().wait(rng.uniform(0.02, 0.3))  # kill at a random instant
        daemon.kill()
        daemon = start_filter(conf, f"filter-{round_}")
    wait_for(dropped.is_set, message="all files dropped")
    expected_pacs = sorted(u for u, k in kinds.items() if k != "PDF")
    wait_for(lambda: not dicom_files(spool.incoming) and not dicom_files(spool.accepted)
             and len(dicom_files(spool.outbox("pacs"))) >= len(expected_pacs),
             timeout=120, message="everything filtered")
    assert daemon.stop() == 0
    assert uids_in(spool.outbox("pacs")) == expected_pacs
    assert uids_in(spool.outbox("ct_only")) == sorted(u for u, k in kinds.items() if k == "CT")
    assert uids_in(spool.outbox("mr_research")) == sorted(u for u, k in kinds.items() if k == "MR")
    assert uids_in(spool.rejected) == sorted(u for u, k in kinds.items() if k == "PDF")
    assert dicom_files(spool.quarantine) == []
    assert os.listdir(spool.incoming) == [".tmp"] and tmp_leftovers(spool.root) == []
    for path in dicom_files(spool.outbox("pacs")):  # every copy is complete
        read_header(path)


def encapsulated_pdf() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = PDF
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = PDF
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TEST^PDF", "PID0002", "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "report"
    ds.BurnedInAnnotation = "YES"
    pdf = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    return ds


@pytest.mark.slow
def test_receive_and_filter_route_a_mixed_set_from_storescu(tmp_path):
    endpoints = {
        "pacs": {"endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"},
                 "filter": {"sop_whitelist": "CTImageStorage, MRImageStorage, BasicTextSRStorage"}},
        "ct_modality": {"endpoint": {"host": "127.0.0.1", "port": 1105, "ae_title": "CTARCH"},
                        "filter": {"conditions": "Modality=CT\nCallingAETitle=MODALITY\n"
                                                 "CalledAETitle=DICOMFLOW"}},
        "documents": {"endpoint": {"host": "127.0.0.1", "port": 1106, "ae_title": "DOCS"},
                      "filter": {"sop_whitelist": "EncapsulatedPDFStorage"}},
    }
    conf = write_conf(tmp_path, filter_={"sop_blacklist": "TwelveLeadECGWaveformStorage"},
                      endpoints=endpoints)
    spool = Spool(tmp_path / "spool")
    files = tmp_path / "send"
    files.mkdir()
    paths = {name: Path(shutil.copy(get_testdata_file(f"{name}.dcm"), files / f"{name}.dcm"))
             for name in ("CT_small", "MR_small", "reportsi", "waveform_ecg")}
    paths["pdf"] = write_dataset(encapsulated_pdf(), files / "pdf.dcm")
    uid = {name: read_header(path).sop_instance_uid for name, path in paths.items()}
    receiver = Daemon(conf, "receive").start()
    filter_ = start_filter(conf)
    try:
        receiver.wait_log("listening as")
        result = storescu(router_port(conf), list(paths.values()), calling="MODALITY")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: len(uids_in(spool.outbox("pacs"))) == 3 and dicom_files(spool.rejected)
                 and dicom_files(spool.outbox("documents")) and dicom_files(spool.outbox("ct_modality")),
                 message="the mixed set routed")
        assert uids_in(spool.outbox("pacs")) == sorted([uid["CT_small"], uid["MR_small"], uid["reportsi"]])
        assert uids_in(spool.outbox("ct_modality")) == [uid["CT_small"]]
        assert uids_in(spool.outbox("documents")) == [uid["pdf"]]
        assert uids_in(spool.rejected) == [uid["waveform_ecg"]]
        assert "global rule: sop_blacklist" in next(spool.rejected.glob("*.reason")).read_text()
        assert dicom_files(spool.quarantine) == [] and dicom_files(spool.incoming) == []
    finally:
        assert filter_.stop() == 0
        receiver.stop()


def info_lines(log: str) -> list[str]:
    """The lines of a daemon's log at INFO or above (DEBUG/TRACE left out)."""
    return [line for line in log.splitlines() if not re.search(r" (DEBUG|TRACE)\s", line[:40])]


def test_defect09_non_utf8_name_is_quarantined_once_without_traceback(pipeline, tmp_path):
    conf, spool, daemon = pipeline
    incoming = os.fsencode(spool.incoming)
    garbage = incoming + b"/scan \xff\xfe\x1b[31m.dcm"  # not UTF-8, with an escape sequence
    with open(tmp_path / "garbage", "wb") as out:
        out.write(b"not DICOM at all" * 20)
    os.rename(tmp_path / "garbage", garbage)
    wait_for(lambda: len(quarantined(spool)) == 1, message="the non-UTF-8 name in quarantine")
    [reason] = list(spool.quarantine.glob("*.reason"))
    text = reason.read_bytes().decode("utf-8")  # readable: valid UTF-8, escaped
    assert "original name: scan \\xff\\xfe\\x1b[31m.dcm\n" in text
    good = make_dataset()
    good_path = write_dataset(good, tmp_path / "good.dcm")
    os.rename(good_path, incoming + b"/ok \xe9\xff.dcm")  # a valid file with a bad name is routed
    wait_for(lambda: uids_in(spool.outbox("pacs")) == [good.SOPInstanceUID], message="good file routed")
    assert os.listdir(spool.incoming) == [".tmp"]
    assert daemon.alive()
    log = daemon.log()
    assert "Traceback" not in log and "UnicodeEncodeError" not in log
    assert log.count("quarantined as") == 1
    assert "\x1b" not in log and "\udcff" not in log


def test_defect15_hand_dropped_names_never_logged_at_info(tmp_path):
    conf = write_conf(tmp_path, router={"log_level": "INFO"},
                      filter_={"sop_blacklist": "EncapsulatedPDFStorage"}, endpoints=ENDPOINTS)
    spool = Spool(tmp_path / "spool")
    daemon = start_filter(conf)
    try:
        routed, rejected = make_dataset(), make_dataset(PDF, modality="DOC")
        mv(write_dataset(routed, tmp_path / "DOE^JOHN_12345.dcm"), spool)
        mv(write_dataset(rejected, tmp_path / "DOE^JANE_67890.dcm"), spool)
        (tmp_path / "DOE^JIM_24680.dcm").write_bytes(b"not DICOM" * 30)
        mv(tmp_path / "DOE^JIM_24680.dcm", spool)
        with open(spool.incoming / "DOE^JOAN_13579.dcm", "wb") as copy:  # a cp, closed at once
            copy.write(write_dataset(make_dataset(), tmp_path / "x" / "y.dcm").read_bytes())
        wait_for(lambda: len(dicom_files(spool.outbox("pacs"))) == 2, message="two routed")
        wait_for(lambda: len(dicom_files(spool.rejected)) == 1 and len(quarantined(spool)) == 1,
                 message="one rejected, one quarantined")
        wait_for(lambda: daemon.log().count("\n") >= 5, message="the decisions logged")
    finally:
        assert daemon.stop() == 0
    log = daemon.log()
    assert "rejected" in log and "quarantined as" in log
    for line in info_lines(log):
        assert "DOE" not in line and "12345" not in line, line
    # the sidecars keep the original name for the operator
    reasons = "".join(p.read_text() for p in spool.quarantine.glob("*.reason"))
    assert "original name: DOE^JIM_24680.dcm" in reasons
