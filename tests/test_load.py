"""Load (issue 6, scenario 5): 8 concurrent DCMTK senders × 250 images through the
whole pipeline; all delivered, none lost, each daemon's memory flat."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.helpers import make_files, wait_for
from tests.reliability import Pipeline, RssSampler, record, scaled, storescu_acked, uid_of

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e

SENDERS = 8
GROWTH_LIMIT_KIB = 48 * 1024  # generous: a leak of one 8 KiB image per file would exceed it


@pytest.mark.slow
def test_eight_concurrent_senders(tmp_path: Path) -> None:
    per_sender = scaled(250, minimum=60)
    total = SENDERS * per_sender
    pipeline = Pipeline(tmp_path, router={"max_associations": str(SENDERS + 2)}).start()
    sent_dir = pipeline.spool / "sent" / "pacs"
    try:
        batches = [make_files(tmp_path / "src" / f"s{i}", per_sender, rows=64, cols=64)
                   for i in range(SENDERS)]
        uids = {uid_of(p) for batch in batches for p in batch}
        pids = {name: daemon.pid for name, daemon in pipeline.daemons.items()}
        results: dict[int, list[Path]] = {}

        def send(index: int) -> None:
            results[index], _ = storescu_acked(pipeline.port, batches[index], calling=f"MOD{index}")

        def progress() -> float:
            return len(os.listdir(sent_dir)) / total

        with RssSampler(pids, progress) as sampler:
            threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(900)
            acked = sum(len(r) for r in results.values())
            assert acked == total, f"{total - acked} images not acknowledged"
            wait_for(lambda: pipeline.drained() and len(os.listdir(sent_dir)) >= total, timeout=600,
                     interval=0.5, message="all images delivered")
        delivered = pipeline.delivered()
        assert set(delivered) == uids, f"{len(uids - set(delivered))} lost"
        assert sum(delivered.values()) == total, "duplicates without any crash"
        pipeline.assert_alive()
        for name, samples in sampler.samples.items():
            warm = [rss for p, rss in samples if 0.1 <= p <= 0.3]
            late = [rss for p, rss in samples if p > 0.3]
            assert warm and late, f"too few memory samples for {name}"
            growth = max(late) - max(warm)
            print(f"{name}: RSS {max(warm) // 1024} MiB at 10-30 %, peak {max(late) // 1024} MiB after")
            assert growth < GROWTH_LIMIT_KIB, f"{name} grew by {growth // 1024} MiB over the run"
        record(f"load ({SENDERS} x {per_sender})", sent=total, acknowledged=acked,
               delivered=len(delivered), duplicated=sum(delivered.values()) - len(delivered),
               lost=len(uids - set(delivered)))
    finally:
        codes = pipeline.stop()
    assert codes == {"receive": 0, "filter": 0, "send": 0}, codes
