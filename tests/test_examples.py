"""The example scripts run as a user would run them, and assert their own outcome."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, require_binary

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory of /tmp for an example's work, not ``tmp_path``: under xdist
    that path is long enough (``.../popen-gw1/test_example_04_study_routing0/``) that
    the spool's supervisor socket would pass the 107 bytes a unix socket's path may
    have, which ``dicomflow`` refuses at start."""
    path = Path(tempfile.mkdtemp(prefix="dfx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_example(script: str, work: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    require_binary("/usr/bin/storescp")
    require_binary("/usr/sbin/Orthanc")
    environment = {**os.environ, "WORK": str(work / "work"), **env}
    result = subprocess.run(["bash", str(REPO / "examples" / script)], capture_output=True, text=True,
                            timeout=timeout, env=environment, cwd=REPO)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_example_01_simple_send_with_retry(short_dir: Path) -> None:
    ports = {name: str(free_port()) for name in
             ("ROUTER_PORT", "SENDER_HTTP", "SENDER_DICOM", "RECEIVER_HTTP", "RECEIVER_DICOM")}
    result = run_example("01-simple-send-with-retry/run.sh", short_dir, 600, **ports)
    assert "waiting in outbox/receiver" in result.stdout
    assert "down" in result.stdout
    assert "OK: 10 instances at the receiver" in result.stdout


@pytest.mark.slow
def test_example_02_scheduled_routing(short_dir: Path) -> None:
    ports = {name: str(free_port()) for name in ("ROUTER_PORT", "LOCAL_PORT", "REMOTE_PORT")}
    result = run_example("02-scheduled-routing/run.sh", short_dir, 600, EXAMPLE_FAST="1", WAIT_LIMIT="300",
                         **ports)
    assert "outside window" in result.stdout
    assert "OK: local got 5 at once" in result.stdout


@pytest.mark.slow
def test_demo_on_a_copy_of_the_shipped_conf(short_dir: Path) -> None:
    """The README's run command, on the shipped conf with only the spool redirected."""
    conf = short_dir / "conf"
    (conf / "endpoints").mkdir(parents=True)
    router = (REPO / "conf" / "router.ini").read_text()
    router = router.replace("spool = /var/spool/dicomflow", f"spool = {short_dir / 'spool'}")
    (conf / "router.ini").write_text(router)
    (conf / "endpoints" / "pacs.ini").write_text((REPO / "conf" / "endpoints" / "pacs.ini").read_text())
    try:
        result = run_example("00-demo/run.sh", short_dir, 300, DICOMFLOW_CONF=str(conf),
                             DEMO_DIR=str(short_dir / "demo"))
        assert "DEMOPACS" in result.stdout
        assert len(list((short_dir / "demo" / "pacs").iterdir())) == 5
    finally:
        subprocess.run(["bash", str(REPO / "examples/00-demo/stop.sh")], capture_output=True, timeout=400,
                       env={**os.environ, "DICOMFLOW_CONF": str(conf), "DEMO_DIR": str(short_dir / "demo")})


@pytest.mark.slow
def test_example_04_study_routing(short_dir: Path) -> None:
    ports = {name: str(free_port()) for name in
             ("ROUTER_PORT", "SENDER_HTTP", "SENDER_DICOM", "PACS_HTTP", "PACS_DICOM",
              "AI_HTTP", "AI_DICOM", "ARCHIVE_HTTP", "ARCHIVE_DICOM")}
    # This checkout's code and the interpreter running the tests (a worktree has no .venv).
    env = {"VENV": sys.prefix, "PYTHONPATH": str(REPO), **ports}
    result = run_example("04-study-routing/run.sh", short_dir, 600, **env)
    out = result.stdout
    assert "no — condition 'SeriesDescription=.*AXIAL.*' does not hold" in out  # route --study
    assert "waiting for completion" in out and "release in 60m" in out           # studies / status
    assert "AI Orthanc has study A only, 8 instances, in this order: 1/1 1/2 2/1 2/2 2/3 2/4 2/5 2/6" in out
    assert "released to archive (4 files; released by an operator)" in out
    assert "OK: pacs got all 15 at once; ai got study A whole" in out
