"""Disk full (issue 6, scenario 2): the spool on a small tmpfs mounted by the test.

At the floor, the receiver prunes ``sent/`` oldest-first, then answers 0xA700; with the
floor set too low, an ENOSPC in the middle of a transfer aborts that association
without an acknowledgement and leaves nothing visible; when space returns, intake
resumes; nothing acknowledged is lost or corrupted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.helpers import dicom_files, make_dataset, make_files, wait_for, write_dataset
from tests.reliability import (
    CT,
    Pipeline,
    c_store_rq,
    encode_dataset,
    established,
    free_bytes,
    record,
    storescu_acked,
    tmpfs,
    uid_of,
)

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
FLOOR = 12 * MiB


def ballast(mount: Path, leave_free: int) -> None:
    """(Re)size a filler file so that about ``leave_free`` bytes stay free."""
    path = mount / "ballast"
    if path.exists():
        path.unlink()
    size = free_bytes(mount) - leave_free
    assert size > 0, "the tmpfs is too small for this test"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def raw_store_status(port: int, ds) -> int | str:
    conn = established(port)
    try:
        return conn.store(c_store_rq(CT, str(ds.SOPInstanceUID)), encode_dataset(ds))
    finally:
        conn.release()


@pytest.mark.slow
def test_disk_full_prunes_refuses_aborts_and_resumes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", 64) as mount:
        pipeline = Pipeline(tmp_path, router={"disk_floor": f"{FLOOR}"}, spool=mount / "spool").start()
        spool = pipeline.spool
        acked: list[Path] = []
        sent_attempts = refused = 0
        try:
            # 1. Ten 1 MiB images go all the way: sent/pacs holds ten delivered copies.
            first = make_files(tmp_path / "src" / "first", 10, rows=512, cols=1024)
            done, result = storescu_acked(pipeline.port, first)
            sent_attempts += len(first)
            assert done == first, result.stdout + result.stderr
            acked += done
            wait_for(lambda: len(dicom_files(spool / "sent" / "pacs")) == 10, message="10 in sent/")
            delivered_names = sorted(p.name for p in dicom_files(spool / "sent" / "pacs"))

            # 2. At the floor: sent/ is pruned oldest-first and the image is taken.
            ballast(mount, FLOOR - int(2.5 * MiB))
            (small,) = make_files(tmp_path / "src" / "small", 1)
            done, result = storescu_acked(pipeline.port, [small])
            sent_attempts += 1
            assert done == [small], result.stdout + result.stderr
            acked += done
            left = sorted(p.name for p in dicom_files(spool / "sent" / "pacs")
                          if p.name in delivered_names)
            pruned = len(delivered_names) - len(left)
            assert 1 <= pruned < 10, f"{pruned} pruned"
            assert left == delivered_names[pruned:], "sent/ was not pruned oldest-first"
            wait_for(pipeline.drained, message="the small image delivered")

            # 3. Below the floor with nothing left to prune: 0xA700, nothing kept.
            ballast(mount, 1 * MiB)  # even with sent/ emptied, free space stays under the floor
            before = set(os.listdir(spool / "incoming"))
            refused_ds = make_dataset()
            status = raw_store_status(pipeline.port, refused_ds)
            sent_attempts += 1
            refused += 1
            assert status == 0xA700, f"status {status!r}"
            assert dicom_files(spool / "sent" / "pacs") == [], "sent/ not pruned before refusing"
            assert set(os.listdir(spool / "incoming")) == before
            assert os.listdir(spool / "incoming" / ".tmp") == []

            # 4. Floor too low: ENOSPC mid-transfer is refused (0xA700: the receive data
            # path reads the rest and answers) or aborted (pynetdicom's path), never
            # acknowledged.
            pipeline.daemons["receive"].stop()
            ini = pipeline.conf / "router.ini"
            ini.write_text(ini.read_text().replace(f"disk_floor = {FLOOR}", "disk_floor = 0"))
            pipeline.restart("receive")
            ballast(mount, 4 * MiB)
            big = make_dataset(rows=2048, cols=2048, NumberOfFrames=2)
            big.PixelData = os.urandom(2048 * 2048 * 2 * 2)  # 16 MiB: more than is free
            big_path = write_dataset(big, tmp_path / "src" / "big.dcm")
            done, result = storescu_acked(pipeline.port, [big_path])
            sent_attempts += 1
            refused += 1
            assert done == [], "a store that could not be written was acknowledged"
            output = result.stdout + result.stderr
            assert result.returncode != 0 or "Refused: OutOfResources" in output, output
            assert dicom_files(spool / "incoming") == []
            # The partial transfer may stay under incoming/.tmp (hidden, never routed) until
            # the receiver's periodic sweep or its next start: nothing visible.
            assert [n for n in os.listdir(spool / "incoming") if not n.startswith(".")] == []
            pipeline.assert_alive()

            # 5. Space returns: intake resumes, the same image goes through.
            (mount / "ballast").unlink()
            done, result = storescu_acked(pipeline.port, [big_path])
            sent_attempts += 1
            assert done == [big_path], result.stdout + result.stderr
            acked += done

            # Nothing acknowledged is lost or corrupted.
            wait_for(lambda: pipeline.drained() and len(pipeline.delivered()) >= len(acked),
                     timeout=120, message="every acknowledged image delivered")
            received = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, pipeline.peer.files())}
            for path in acked:
                source = dcmread(path)
                assert str(source.SOPInstanceUID) in received, f"{path.name} lost"
                assert received[str(source.SOPInstanceUID)].PixelData == source.PixelData
            assert str(refused_ds.SOPInstanceUID) not in received
            assert uid_of(big_path) in received
            pipeline.assert_alive()
            record("disk full", sent=sent_attempts, acknowledged=len(acked),
                   delivered=len(received), refused=refused,
                   lost=len({uid_of(p) for p in acked} - received.keys()))
        finally:
            codes = pipeline.stop()
        assert codes == {"receive": 0, "filter": 0, "send": 0}, codes
