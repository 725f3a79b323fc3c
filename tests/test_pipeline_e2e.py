"""The whole pipeline: receive + filter + two senders, a study from DCMTK to two destinations."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.helpers import dicom_files, make_files, router_port, run_cli, wait_for, write_conf
from tests.peers import StoreSCP, storescu

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e


def endpoint(scp: StoreSCP) -> dict:
    return {"endpoint": {"host": "127.0.0.1", "port": scp.port, "ae_title": scp.ae_title},
            "retry": {"probe_backoff_cap": "2s"}}


def uids(paths: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


@pytest.mark.slow
def test_study_reaches_both_destinations_and_a_down_one_delays_only_itself(tmp_path: Path) -> None:
    east = StoreSCP(tmp_path / "east", "EAST").start()
    west = StoreSCP(tmp_path / "west", "WEST").start()
    conf = write_conf(tmp_path, router={"log_level": "INFO"},
                      endpoints={"east": endpoint(east), "west": endpoint(west)})
    spool = tmp_path / "spool"
    try:
        up = run_cli(conf, "up", timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        port = router_port(conf)

        first = make_files(tmp_path / "study1", 20)
        assert storescu(port, first).returncode == 0
        wait_for(lambda: uids(east.files()) == uids(first) and uids(west.files()) == uids(first),
                 message="study 1 at both destinations")

        west.stop()
        second = make_files(tmp_path / "study2", 20)
        assert storescu(port, second).returncode == 0
        wait_for(lambda: uids(east.files()) == uids(first) | uids(second), message="study 2 at east")
        wait_for(lambda: len(dicom_files(spool / "outbox" / "west")) == 20,
                 message="study 2 waiting for west")
        assert uids(west.files()) == uids(first)

        west.start()  # same port: the destination comes back
        wait_for(lambda: uids(west.files()) == uids(first) | uids(second), message="west drained")
        wait_for(lambda: dicom_files(spool / "outbox" / "west") == [], message="west outbox empty")
        assert len(east.files()) == 40 and len(west.files()) == 40  # no duplicates
        assert dicom_files(spool / "sent" / "east") and len(dicom_files(spool / "sent" / "west")) == 40
        for stage in ("incoming", "accepted", "rejected", "quarantine"):
            assert dicom_files(spool / stage) == [], stage
    finally:
        run_cli(conf, "down", timeout=400)
        east.stop()
        west.stop()
