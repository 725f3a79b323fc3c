"""Shaping streams (issue 15): a 1 GiB object is coerced by the real filter daemon with
its RSS under 150 MB, and the shaped copy's pixel data is the original's, byte for byte.

The object is written by streaming (pydicom writes the header, then a raw (7FE0,0010)
OB element header and 1 GiB of bytes go out in chunks): neither this test nor the
daemon ever holds it whole. The daemon's peak RSS is its VmHWM, read from /proc while it
is still running, and VmRSS is sampled while it works.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import threading
from pathlib import Path

import pydicom
import pytest

from pipeline.spool import Spool
from tests.helpers import Daemon, dicom_files, make_dataset, wait_for, write_conf, write_dataset

# slow, not e2e: only the filter runs, which has no pynetdicom path to run a second time
pytestmark = pytest.mark.slow

GIB = 1024 ** 3
CHUNK = 4 * 1024 * 1024
RSS_LIMIT_MB = 150
PIXEL_HEADER = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, GIB)
OPERATIONS = "PatientID = SITEA-{PatientID}\nIssuerOfPatientID = SITEA"


def write_big_object(path: Path) -> None:
    """A CT header by pydicom, then Pixel Data of 1 GiB written in chunks."""
    ds = make_dataset(patient_id="BIG-0001")
    del ds.PixelData
    ds.Rows = ds.Columns = 16384  # 16384² × 16 bit × 2 frames = 1 GiB
    ds.NumberOfFrames = 2
    write_dataset(ds, path)
    block = os.urandom(CHUNK)
    with open(path, "ab") as fp:
        fp.write(PIXEL_HEADER)
        for _ in range(GIB // CHUNK):
            fp.write(block)
            block = block[1:] + block[:1]  # not one block repeated: a shifted copy each time


def pixel_digest(path: Path) -> tuple[int, str]:
    """Where the pixel data element starts, and the SHA-256 of it and all that follows
    (its header with the length included), read in chunks."""
    with open(path, "rb") as fp:
        head = fp.read(1024 * 1024)
        at = head.find(PIXEL_HEADER)
        assert at > 0, f"no 1 GiB pixel data element in {path.name}"
        fp.seek(at)
        digest = hashlib.sha256()
        while chunk := fp.read(CHUNK):
            digest.update(chunk)
    return at, digest.hexdigest()


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fp:
        for line in fp:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def big_dir(tmp_path: Path):
    """``tmp_path``, emptied after the test: pytest keeps the last runs' folders, and
    2 GiB each is too much to keep."""
    yield tmp_path
    for child in tmp_path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        elif child.suffix == ".dcm":
            child.unlink()


def test_1_gib_object_is_coerced_by_the_filter_under_150_mb_rss(big_dir: Path) -> None:
    tmp_path = big_dir
    free = shutil.disk_usage(tmp_path).free
    if free < 2.5 * GIB:
        pytest.fail(f"this test needs 2.5 GiB free in {tmp_path} (the object and its shaped "
                    f"copy); {free / GIB:.1f} GiB free")
    conf = write_conf(tmp_path, router={"log_level": "INFO"}, endpoints={
        "coerced": {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "COERCED"},
                    "coerce": {"operations": OPERATIONS}}})  # no sender: the copy stays
    spool = Spool(tmp_path / "spool")
    source = tmp_path / "big.dcm"
    write_big_object(source)
    original_at, original_digest = pixel_digest(source)
    daemon = Daemon(conf, "filter").start()
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(status_kib(daemon.pid, "VmRSS"))
            except (OSError, AssertionError):
                return
            stop.wait(0.02)

    try:
        daemon.wait_log("filter ready")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        os.rename(source, spool.incoming / "big.dcm")  # the operator's `mv`
        wait_for(lambda: dicom_files(spool.outbox("coerced")) and not dicom_files(spool.accepted)
                 and not dicom_files(spool.incoming), timeout=600, interval=0.1,
                 message="the 1 GiB object shaped into the outbox")
        peak_kib = status_kib(daemon.pid, "VmHWM")
    finally:
        stop.set()
        assert daemon.stop() == 0, daemon.log()[-3000:]
    peak_mb = peak_kib / 1024
    print(f"filter shaping 1 GiB: VmHWM {peak_mb:.1f} MB, max sampled VmRSS "
          f"{max(samples, default=0) / 1024:.1f} MB ({len(samples)} samples)")
    assert samples, "VmRSS never sampled"
    assert peak_mb < RSS_LIMIT_MB, f"the filter's peak RSS was {peak_mb:.0f} MB"

    [copy] = dicom_files(spool.outbox("coerced"))
    shaped = pydicom.dcmread(copy, stop_before_pixels=True)
    assert shaped.PatientID == "SITEA-BIG-0001" and shaped.IssuerOfPatientID == "SITEA"
    assert len(shaped.OriginalAttributesSequence) == 1
    copy_at, copy_digest = pixel_digest(copy)
    assert copy_at > original_at  # the header grew by the coerced values and their item
    assert copy_digest == original_digest, "the pixel data changed"
    assert copy.stat().st_size - copy_at == len(PIXEL_HEADER) + GIB  # nothing lost, nothing added
