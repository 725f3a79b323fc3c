"""Security (issue 6, scenario 4): who may send, TLS, file modes, no patient data in
the logs at INFO."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.helpers import make_dataset, make_files, wait_for, write_dataset
from tests.reliability import Pipeline, record, storescu_acked
from tests.tls import make_certificates

PATIENT_NAME = "ZQXWV^JOBLOGGSPHI"
PATIENT_ID = "PHI-7734-ZQX"


def test_unknown_calling_and_wrong_called_ae_are_refused(tmp_path: Path) -> None:
    pipeline = Pipeline(tmp_path, router={"allowed_calling_aets": "CT1, MR1"}).start()
    try:
        files = make_files(tmp_path / "src", 2)
        intruder, result = storescu_acked(pipeline.port, files, calling="INTRUDER")
        assert intruder == [] and "Association Rejected" in result.stdout + result.stderr
        wrong, result = storescu_acked(pipeline.port, files, calling="CT1", called="NOT_US")
        assert wrong == [] and "Association Rejected" in result.stdout + result.stderr
        allowed, result = storescu_acked(pipeline.port, files, calling="CT1")
        assert allowed == files, result.stdout + result.stderr
        wait_for(lambda: len(pipeline.delivered()) == 2 and pipeline.drained(), message="delivered")
        record("security: AE titles", sent=6, acknowledged=2, delivered=2, refused=4)
        pipeline.assert_alive()
    finally:
        pipeline.stop()


def test_tls_required_refuses_plain_and_accepts_tls(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    pipeline = Pipeline(tmp_path, tls={"tls": "true", "tls_cert": certs.server_cert,
                                       "tls_key": certs.server_key}).start()
    try:
        files = make_files(tmp_path / "src", 3)
        plain, result = storescu_acked(pipeline.port, files)
        assert plain == [] and result.returncode != 0
        secure, result = storescu_acked(pipeline.port, files, extra=("+tla", "+cf", str(certs.ca)))
        assert secure == files, result.stdout + result.stderr
        wait_for(lambda: len(pipeline.delivered()) == 3 and pipeline.drained(), message="TLS delivered")
        record("security: TLS", sent=6, acknowledged=3, delivered=3, refused=3)
        pipeline.assert_alive()
    finally:
        pipeline.stop()


def test_modes_and_no_patient_data_in_logs(tmp_path: Path) -> None:
    """A run with a distinctive patient through delivered, rejected, quarantined and
    hand-dropped files. Stage folders are 0700, files 0600, and no log says who."""
    pipeline = Pipeline(tmp_path, filter_={"sop_blacklist": "MRImageStorage"}).start()
    try:
        phi = {"patient_name": PATIENT_NAME, "patient_id": PATIENT_ID}
        src = tmp_path / "src"
        ct = [write_dataset(make_dataset(**phi), src / f"ct{i}.dcm") for i in range(3)]
        mr = write_dataset(make_dataset("1.2.840.10008.5.1.4.1.1.4", modality="MR", **phi), src / "mr.dcm")
        acked, result = storescu_acked(pipeline.port, [*ct, mr])
        assert len(acked) == 4, result.stdout + result.stderr
        # a hand-dropped, world-readable copy and a truncated one (quarantined)
        dropped = write_dataset(make_dataset(**phi), src / "dropped.dcm")
        os.chmod(dropped, 0o644)
        os.rename(dropped, pipeline.spool / "incoming" / "dropped.dcm")
        broken = src / "broken.dcm"
        broken.write_bytes(write_dataset(make_dataset(**phi), src / "whole.dcm").read_bytes()[:700])
        os.rename(broken, pipeline.spool / "incoming" / "broken.dcm")
        wait_for(lambda: len(pipeline.delivered()) == 4 and pipeline.drained()
                 and pipeline.stage("rejected") and pipeline.stage("quarantine"), message="all routed")
        for root, dirs, files in os.walk(pipeline.spool):
            for name in dirs:
                mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
                assert mode == 0o700, f"{os.path.join(root, name)} has mode {oct(mode)}"
            if Path(root).relative_to(pipeline.spool).parts[:1] in (("run",), ("log",)):
                continue
            for name in files:
                mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
                assert mode == 0o600, f"{os.path.join(root, name)} has mode {oct(mode)}"
        pipeline.stop()
        logs = pipeline.logs()
        assert "stored from" in logs and "delivered" in logs and "quarantined" in logs
        for secret in (PATIENT_NAME, PATIENT_ID, "JOBLOGGS", "ZQXWV"):
            assert secret not in logs, f"{secret!r} appears in a log at INFO"
        record("security: PHI and modes", sent=6, acknowledged=4, delivered=4, quarantined=1)
    finally:
        pipeline.stop()
