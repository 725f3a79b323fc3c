"""Readiness of hand-copied files in ``incoming/`` (issue 10, defect 14).

A real writer process writes half a file, keeps it open and stalls far longer than the
settle time (with an mtime an hour old, as after a clock step or a ``cp -p``): the
filter must not take it until the writer closes it, must say once that it is held, and
then routes it complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load
from pipeline.errors import ConfigError
from pipeline.spool import Spool
from services.filter import FilterDaemon
from tests.helpers import Daemon, dicom_files, make_dataset, wait_for, write_conf, write_dataset
from tests.test_filter import ENDPOINTS, uids_in

SETTLE = "0.5s"

WRITER = r"""
import os, sys, time
source, target = sys.argv[1], sys.argv[2]
data = open(source, "rb").read()
with open(target, "wb") as out:
    out.write(data[: len(data) // 2])
    out.flush()
    old = time.time() - 3600
    os.utime(target, (old, old))   # an old mtime: a clock step, or a cp -p
    print("half", flush=True)
    sys.stdin.readline()            # stall until the test says go on
    out.write(data[len(data) // 2:])
print("done", flush=True)
"""


def start_writer(source: Path, target: Path) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(source), str(target)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "half"
    return writer


def quarantined(spool: Spool) -> list[str]:
    return [n for n in os.listdir(spool.quarantine) if not n.startswith(".") and not n.endswith(".reason")]


def test_defect14_a_stalled_writer_keeps_its_file_until_it_closes(tmp_path):
    conf = write_conf(tmp_path, filter_={"settle_time": SETTLE}, endpoints=ENDPOINTS)
    spool = Spool(tmp_path / "spool")
    daemon = Daemon(conf, "filter").start()
    writer = None
    try:
        daemon.wait_log("filter ready")
        ds = make_dataset(rows=64, cols=64)
        source = write_dataset(ds, tmp_path / "src" / "study.dcm")
        target = spool.incoming / "DOE^JOHN_stalled.dcm"
        writer = start_writer(source, target)
        daemon.wait_log("still open for writing")  # looked at after it was stable for settle_time
        daemon.wait_log("held open for writing")   # a stalled writer is reported …
        assert target.exists() and dicom_files(spool.outbox("pacs")) == [] and quarantined(spool) == []
        warnings = [line for line in daemon.log().splitlines() if "held open for writing" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0] and "DOE" not in warnings[0]
        assert f"pid {writer.pid}" in warnings[0]
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "done"
        assert writer.wait(60) == 0
        wait_for(lambda: uids_in(spool.outbox("pacs")) == [ds.SOPInstanceUID], message="the file routed")
        [routed] = dicom_files(spool.outbox("pacs"))
        assert routed.read_bytes() == source.read_bytes()
        assert quarantined(spool) == [] and not target.exists()
        assert daemon.log().count("held open for writing") == 1  # … once
        assert daemon.alive()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        assert daemon.stop() == 0


def test_defect14_an_old_mtime_alone_never_makes_an_open_file_ready(tmp_path):
    conf = write_conf(tmp_path, endpoints=ENDPOINTS)
    daemon = FilterDaemon(load(conf), settle=3600, rescan_interval=0.2, retry_interval=0.1)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    source = write_dataset(ds, tmp_path / "src" / "a.dcm")
    target = spool.incoming / "copying.dcm"
    writer = start_writer(source, target)
    try:
        for _ in range(3):
            assert daemon.scan_incoming() == 1
        assert dicom_files(spool.outbox("pacs")) == [] and quarantined(spool) == []
    finally:
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(60) == 0
    old = time.time() - 3600
    os.utime(target, (old, old))  # what `cp -p` does once it is done
    assert daemon.scan_incoming() == 0, "closed, with an old mtime: taken at once"
    assert uids_in(spool.outbox("pacs")) == [ds.SOPInstanceUID]


def test_defect14_unchanged_for_settle_time_then_taken(tmp_path):
    """Without a close-write event (watcher not running) a closed file waits settle_time."""
    conf = write_conf(tmp_path, filter_={"settle_time": "0.3s"}, endpoints=ENDPOINTS)
    daemon = FilterDaemon(load(conf), rescan_interval=0.2, retry_interval=0.1)
    assert daemon.settle == 0.3
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    write_dataset(ds, spool.incoming / "copied.dcm")
    started = time.monotonic()
    assert daemon.scan_incoming() == 1
    wait_for(lambda: daemon.scan_incoming() == 0, message="the settled file taken")
    assert time.monotonic() - started >= 0.3
    assert uids_in(spool.outbox("pacs")) == [ds.SOPInstanceUID]


def test_defect14_settle_time_is_validated(tmp_path):
    assert load(write_conf(tmp_path / "a")).router.settle_time == 3.0
    assert load(write_conf(tmp_path / "b", filter_={"settle_time": "2m"})).router.settle_time == 120.0
    with pytest.raises(ConfigError, match=r"\[filter\] settle_time"):
        load(write_conf(tmp_path / "c", filter_={"settle_time": "0s"}))
