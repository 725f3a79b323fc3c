"""Foreign DICOM senders through a real DicomFlow pipeline, delivering to DCMTK.

Each foreign stack (tests/foreign.py: DCMTK, GDCM, CTN, odil, PixelMed) sends a small
mixed corpus — pydicom's complete CT, MR, RT Plan and SR test files and a JPEG
baseline variant made by DCMTK's ``dcmcjpeg`` — into ``dicomflow receive`` + ``filter``
+ ``send``, which delivers to DCMTK ``storescp``. The same sender first sends the same
corpus straight to a ``storescp``, and that is the reference:

* a file ``storescp`` takes from that sender must be acknowledged by DicomFlow and
  delivered with its data set unchanged (every element outside group 0002) — equal to
  what ``storescp`` got directly (some stacks re-encode what they send);
* a file ``storescp`` refuses from that sender is that peer's limit: listed in the run's
  summary (tests/conftest.py), not counted against us — DicomFlow must refuse it too (a
  failure status or abort), or deliver it unchanged; it must never acknowledge it and then quarantine it;
* nothing ends in ``quarantine/``, ``failed/`` or ``rejected/``.

``DICOMFLOW_TEST_SCALE`` (default 1) repeats the corpus that many times per sender.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.foreign import Ctn, Dcmtk, Gdcm, Odil, Outcome, PixelMed
from tests.helpers import (
    HANG_TIMEOUT,
    Pipeline,
    dcmtk,
    make_dataset,
    wait_for,
    write_dataset,
)
from tests.interop_corpus import record
from tests.peers import StoreSCP

SCALE = max(1, int(os.environ.get("DICOMFLOW_TEST_SCALE", "1")))
CORPUS = ("CT_small", "MR_small", "rtplan", "reportsi")
SENDERS = {
    # storescu proposes only uncompressed syntaxes by default; -xs adds JPEG lossless SV1
    "dcmtk": lambda workdir: Dcmtk(("-xs",)),
    "gdcm": lambda workdir: Gdcm(),
    "ctn": lambda workdir: Ctn(),
    "odil": lambda workdir: Odil(),
    "pixelmed": lambda workdir: PixelMed(workdir),
}
FASTPATH = pytest.mark.parametrize("fastpath", ["1", "0"], ids=["fastpath", "pynetdicom"])
SCP_OPTIONS = ("+xa",)
TRAILING_PADDING = 0xFFFCFFFC  # accept every transfer syntax DCMTK knows: nothing is converted


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("corpus")
    files = [Path(shutil.copy(get_testdata_file(f"{name}.dcm"), directory / f"{name}.dcm"))
             for name in CORPUS]
    jpeg = directory / "CT_small_jpeg.dcm"
    subprocess.run([dcmtk("dcmcjpeg"), "+ua", str(files[0]), str(jpeg)], check=True, capture_output=True,
                   timeout=60)
    return files + [jpeg]


def pipeline_to(base: Path, destination: StoreSCP, fastpath: str) -> Pipeline:
    return Pipeline(base, destination, retry={"probe_backoff_cap": "2s"},
                    env={"DICOMFLOW_FASTPATH": fastpath})


def by_instance(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    """Received files by SOP Instance UID (storescp names them its own way)."""
    datasets = (pydicom.dcmread(path) for path in paths)
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def data_set_differences(got: pydicom.Dataset, expected: pydicom.Dataset) -> list[str]:
    """Elements outside group 0002 that differ (the file meta is the receiver's own).

    (FFFC,FFFC) Data Set Trailing Padding has no meaning (PS3.10 §7.2): a parsing
    storescp drops it, DicomFlow passes it on as sent.
    """
    tags = {t for t in got.keys() | expected.keys() if t.group != 0x0002 and t != TRAILING_PADDING}
    return [str(t) for t in sorted(tags)
            if t not in got or t not in expected or got[t] != expected[t]]


def instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def send_direct(sender, files: list[Path], base: Path) -> tuple[list[Outcome], dict]:
    """The reference: the same sender straight to DCMTK storescp."""
    scp = StoreSCP(base / "direct", "DIRECT", extra=SCP_OPTIONS, bit_preserving=False).start()
    try:
        outcomes = sender.send(scp.port, files, "DIRECT")
        expected = sum(o.ok for o in outcomes)
        wait_for(lambda: len(scp.files()) >= expected, message="storescp's files")
        return outcomes, by_instance(scp.files())
    finally:
        scp.stop()


@FASTPATH
@pytest.mark.parametrize("name", list(SENDERS))
def test_foreign_sender_through_dicomflow(name: str, fastpath: str, corpus: list[Path],
                                          tmp_path: Path) -> None:
    sender = SENDERS[name](tmp_path / "work")
    files = corpus * SCALE
    direct, reference = send_direct(sender, corpus, tmp_path)
    limits = {o.path for o in direct if not o.ok}
    for outcome in direct:
        if not outcome.ok:
            record(f"{name} → DicomFlow [{fastpath}]: peer limit (storescp refuses it too): "
                   f"{outcome.path.name}: status {outcome.status} {outcome.detail}")

    destination = StoreSCP(tmp_path / "dest", "DEST", extra=SCP_OPTIONS).start()
    pipeline = pipeline_to(tmp_path, destination, fastpath).start()
    try:
        outcomes = sender.send(pipeline.port, files, "DICOMFLOW")
        acknowledged = [o.path for o in outcomes if o.ok]
        against_us = [o for o in outcomes if not o.ok and o.path not in limits]
        assert not against_us, f"{name}: refused by DicomFlow, taken by storescp: {against_us}"
        wait_for(lambda: len(destination.files()) >= len(acknowledged) and pipeline.settled(),
                 timeout=HANG_TIMEOUT * 2, message=f"{len(acknowledged)} deliveries")
        assert pipeline.dead_end_paths() == [], pipeline.logs()
        assert len(destination.files()) == len(acknowledged)
        delivered = by_instance(destination.files())
        for path in set(acknowledged):
            uid = instance_uid(path)
            expected = reference.get(uid)
            if expected is None:  # refused by storescp directly, acknowledged by us
                expected = pydicom.dcmread(path)
            assert uid in delivered, f"{name}: {path.name} acknowledged, not delivered"
            differences = data_set_differences(delivered[uid], expected)
            assert not differences, f"{name}: {path.name} changed in {differences}"
    finally:
        pipeline.stop()
        destination.stop()


def odd_length_file(path: Path) -> Path:
    """A complete image whose data set has an odd length: 9 bytes of 8-bit pixel data
    with no pad byte (pydicom would add one), the last element of the file."""
    ds = make_dataset(rows=3, cols=3)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(range(1, 10))
    write_dataset(ds, path)
    raw = path.read_bytes()
    header = b"\xe0\x7f\x10\x00OB\x00\x00"
    at = raw.rfind(header + struct.pack("<L", 10))
    assert at > 0 and len(raw) == at + 12 + 10
    path.write_bytes(raw[:at] + header + struct.pack("<L", 9) + raw[at + 12:at + 21])
    assert path.stat().st_size % 2 == 1
    return path


@FASTPATH
def test_defect18_pixelmed_odd_length_data_set_is_delivered_equal_to_source(
        fastpath: str, tmp_path: Path) -> None:
    """PixelMed pads an odd-length data set with one 0x00 after its last element;
    storescp stores it equal to the source, and so must DicomFlow deliver it."""
    source = odd_length_file(tmp_path / "odd.dcm")
    sender = PixelMed(tmp_path / "work")
    (direct,), reference = send_direct(sender, [source], tmp_path)
    assert direct.ok, direct
    destination = StoreSCP(tmp_path / "dest", "DEST", extra=SCP_OPTIONS).start()
    pipeline = pipeline_to(tmp_path, destination, fastpath).start()
    try:
        (outcome,) = sender.send(pipeline.port, [source], "DICOMFLOW")
        assert outcome.ok, pipeline.logs()
        (delivered,) = wait_for(destination.files, message="the odd-length file delivered")
        wait_for(pipeline.settled, message="the pipeline settled")
        assert pipeline.dead_end_paths() == [], pipeline.logs()
        got = pydicom.dcmread(delivered)
        expected = pydicom.dcmread(source)
        assert data_set_differences(got, expected) == []
        assert got.PixelData == expected.PixelData == bytes(range(1, 10))
        # storescp itself re-encodes the odd value with a pad byte (10 bytes): it takes it
        assert reference[str(expected.SOPInstanceUID)].PixelData[:9] == bytes(range(1, 10))
    finally:
        pipeline.stop()
        destination.stop()


@FASTPATH
def test_defect19_gdcm_odd_length_deflated_data_set_is_delivered(fastpath: str, tmp_path: Path) -> None:
    """pydicom's image_dfl.dcm has an odd-length deflated data set (PS3.5 A.5 wants a pad
    byte); GDCM sends it as it is and storescp refuses it ("Odd Fragment Length"). The
    receiver pads it, so the file it acknowledges can be delivered to DCMTK unchanged."""
    source = Path(shutil.copy(get_testdata_file("image_dfl.dcm"), tmp_path / "image_dfl.dcm"))
    assert source.stat().st_size % 2 == 1
    sender = Gdcm()
    (direct,), _ = send_direct(sender, [source], tmp_path)
    record(f"gdcm → DicomFlow [{fastpath}]: peer limit (storescp refuses it too): {source.name}: "
           f"{direct.detail}")
    destination = StoreSCP(tmp_path / "dest", "DEST", extra=SCP_OPTIONS).start()
    pipeline = pipeline_to(tmp_path, destination, fastpath).start()
    try:
        (outcome,) = sender.send(pipeline.port, [source], "DICOMFLOW")
        assert outcome.ok, outcome
        (delivered,) = wait_for(destination.files, message="the deflated file delivered")
        wait_for(pipeline.settled, message="the pipeline settled")
        assert pipeline.dead_end_paths() == [], pipeline.logs()
        assert data_set_differences(pydicom.dcmread(delivered), pydicom.dcmread(source)) == []
    finally:
        pipeline.stop()
        destination.stop()
