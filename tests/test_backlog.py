"""Restart with a backlog (issue 6, scenario 6): 20,000 small files wait in an outbox
when the sender starts; it begins delivering promptly and delivers them all."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pipeline.spool import FILE_MODE, Spool
from pipeline.spool_names import SpoolName
from tests.helpers import make_dataset, wait_for, write_dataset
from tests.reliability import Pipeline, record, scaled

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e


def fill_outbox(spool: Spool, endpoint: str, count: int, workdir: Path) -> set[str]:
    """``count`` small, distinct DICOM files straight into the outbox (standard names),
    made from one template by replacing its fixed-length SOP Instance UID."""
    template_uid = "2.25." + "1" * 39
    ds = make_dataset(rows=4, cols=4)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = template_uid
    data = write_dataset(ds, workdir / "template.dcm").read_bytes()
    assert data.count(template_uid.encode()) == 2
    outbox = spool.outbox(endpoint)
    rng = random.Random()
    uids = set()
    while len(uids) < count:
        uid = "2.25." + str(rng.randrange(10**38, 10**39))
        if uid in uids:
            continue
        uids.add(uid)
        fd = os.open(outbox / str(SpoolName.new(uid)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            out.write(data.replace(template_uid.encode(), uid.encode()))
    return uids


@pytest.mark.slow
def test_sender_starts_on_a_20000_file_backlog(tmp_path: Path) -> None:
    count = scaled(20000, minimum=2000)
    pipeline = Pipeline(tmp_path)
    spool = Spool(pipeline.spool).create(["pacs"])
    uids = fill_outbox(spool, "pacs", count, tmp_path)
    sent_dir = spool.sent("pacs")
    try:
        pipeline.start("send")
        wait_for(lambda: os.listdir(sent_dir) != [".tmp"], timeout=120, message="the first delivery")
        wait_for(lambda: len(os.listdir(sent_dir)) - 1 >= count, timeout=1800, interval=1,
                 message=f"{count} files delivered")
        assert os.listdir(spool.outbox("pacs")) == [".tmp"]
        delivered = pipeline.delivered()
        assert set(delivered) == uids, f"{len(uids - set(delivered))} lost"
        pipeline.assert_alive()
        record(f"backlog ({count})", sent=count, delivered=len(delivered),
               duplicated=sum(delivered.values()) - len(delivered), lost=len(uids - set(delivered)))
    finally:
        codes = pipeline.stop()
    assert codes.get("send") == 0, codes
