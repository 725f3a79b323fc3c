"""Foreign DICOM senders through a real DicomFlow pipeline, delivering to DCMTK.

Each foreign stack (tests/foreign.py: DCMTK, GDCM, CTN, odil, PixelMed) sends the whole
interoperability corpus (tests/interop_corpus.py) into ``dicomflow receive`` + ``filter``
+ ``send``, which delivers to a bit-preserving DCMTK ``storescp +xa``. DCMTK, GDCM and
CTN send one file per invocation (several tools stop a batch at their first bad file;
``storescu`` is told to propose each file's own transfer syntax); odil and PixelMed
send many files per association (in batches where a SOP class has one transfer syntax,
each file that ends an association confirmed as the first of a new one:
tests/foreign.py). The same sender first sends the same corpus
straight to a (parsing) ``storescp``, which judges what the sender can send, and to a
bit-preserving one, whose copy (what the sender put on the wire: some stacks re-encode
what they send) is the reference:

* a file ``storescp`` takes from that sender must be acknowledged by DicomFlow and
  delivered with its data set unchanged (every element outside group 0002) — equal to
  what ``storescp`` got directly — or set aside in ``failed/``/``quarantine/``/
  ``rejected/`` with a reason, listed in the run's summary; DicomFlow may refuse it
  only when the sender put a malformed data set on the wire (storescp keeps less of it
  than the file holds: listed as the sender's limit);
* a file ``storescp`` refuses from that sender is that peer's limit: listed in the run's
  summary (tests/conftest.py), not counted against us — DicomFlow must refuse it too (a
  failure status or abort), or deliver it unchanged; it must never acknowledge it and
  then set it aside;
* nothing is lost: acknowledged == delivered + set aside with a reason;
* ``dciodvfy`` reports no error on a delivered copy that it does not report on the
  source (unless the sender put it on another file's presentation context, PixelMed's
  limit: listed).

The corpus test runs once (the module is ``e2e``: CI runs those again with
``DICOMFLOW_FASTPATH=0``); ``DICOMFLOW_TEST_SCALE`` sizes the corpus's large object.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests import interop_corpus
from tests.foreign import Ctn, Dcmtk, Gdcm, Odil, Outcome, PixelMed
from tests.helpers import (
    HANG_TIMEOUT,
    Pipeline,
    make_dataset,
    wait_for,
    write_dataset,
)
from tests.interop_corpus import dciodvfy_errors, record, source_errors
from tests.peers import StoreSCP

pytestmark = pytest.mark.e2e


class DcmtkOwnSyntax:
    """DCMTK ``storescu`` proposing each file's own transfer syntax (it proposes only
    uncompressed ones unless told), one file per association."""

    name = "dcmtk"

    def send(self, port: int, files: list[Path], called: str) -> list[Outcome]:
        return [outcome for path in files
                for outcome in Dcmtk(interop_corpus.storescu_option(path)).send(port, [path], called)]


SENDERS = {
    "dcmtk": lambda workdir: DcmtkOwnSyntax(),
    "gdcm": lambda workdir: Gdcm(),
    "ctn": lambda workdir: Ctn(),
    "odil": lambda workdir: Odil(thorough=True),
    "pixelmed": lambda workdir: PixelMed(workdir, thorough=True),
}
# senders whose one-association SCU may put a file on another file's presentation context
MISLABELS = frozenset({"pixelmed"})
FASTPATH = pytest.mark.parametrize("fastpath", ["1", "0"], ids=["fastpath", "pynetdicom"])
SCP_OPTIONS = ("+xa",)
TRAILING_PADDING = 0xFFFCFFFC  # accept every transfer syntax DCMTK knows: nothing is converted


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return interop_corpus.session_corpus(tmp_path_factory)


def pipeline_to(base: Path, destination: StoreSCP, fastpath: str) -> Pipeline:
    return Pipeline(base, destination, retry={"probe_backoff_cap": "2s"},
                    env={"DICOMFLOW_FASTPATH": fastpath})


def corpus_pipeline(base: Path, destination: StoreSCP) -> Pipeline:
    """Quick retries, two attempts: a file the destination refuses settles in failed/."""
    return Pipeline(base, destination, endpoint={"dimse_timeout": "10s"},
                    retry={"probe_backoff_cap": "1s", "backoff": "0.5s", "max_attempts": 2})


def by_instance(paths: list[Path]) -> dict[str, Path]:
    """Received files by SOP Instance UID (storescp names them its own way)."""
    return {interop_corpus.uid_or_name(path): path for path in paths}


def data_set_differences(got: pydicom.Dataset, expected: pydicom.Dataset) -> list[str]:
    """Elements outside group 0002 that differ (the file meta is the receiver's own).

    (FFFC,FFFC) Data Set Trailing Padding has no meaning (PS3.10 §7.2): a parsing
    storescp drops it, DicomFlow passes it on as sent.
    """
    tags = {t for t in got.keys() | expected.keys() if t.group != 0x0002 and t != TRAILING_PADDING}
    return [str(t) for t in sorted(tags)
            if t not in got or t not in expected or got[t] != expected[t]]


def send_direct(sender, files: list[Path], base: Path,
                bit_preserving: bool = False) -> tuple[list[Outcome], dict]:
    """The same sender straight to DCMTK storescp: parsing what it gets (the default),
    it refuses a data set it cannot read; ``bit_preserving``, it keeps what came."""
    scp = StoreSCP(base / "direct", "DIRECT", extra=SCP_OPTIONS, bit_preserving=bit_preserving).start()
    try:
        outcomes = sender.send(scp.port, files, "DIRECT")
        expected = sum(o.ok for o in outcomes)
        wait_for(lambda: len(scp.files()) >= expected, timeout=HANG_TIMEOUT * 2,
                 message="storescp's files")
        return outcomes, by_instance(scp.files())
    finally:
        scp.stop()


def sent_incomplete(name: str, refused: Outcome, reference: dict[str, Path]) -> bool:
    """Whether storescp took the file from this sender but kept less of it than the
    source holds: the sender put a malformed data set on the wire (CTN gives OF a 2-byte
    length; DCMTK stops parsing at the bad element and stores what came before).
    DicomFlow refusing it is right; the sender's limit, recorded."""
    got = reference.get(interop_corpus.instance_uid(refused.path))
    if got is None:
        return False
    source = pydicom.dcmread(refused.path)
    missing = sorted(set(source.keys()) - set(pydicom.dcmread(got).keys()) - {TRAILING_PADDING})
    if missing:
        record(f"{name} → DicomFlow: peer limit (sends it malformed; storescp keeps a copy "
               f"without {', '.join(map(str, missing[:3]))}): {refused.path.name}: DicomFlow "
               f"refuses it: {refused.detail[:120]}")
    return bool(missing)


def changes(name: str, delivered: Path, expected: Path, source: Path) -> list[str]:
    """What differs between a delivered copy and its reference, and dciodvfy errors
    on the copy that the source does not have (nor the sender's own copy). Group lengths
    (gggg,0000) are retired (PS3.5 §7.2) and not compared."""
    got, want = pydicom.dcmread(delivered), pydicom.dcmread(expected)
    sent, own = got.file_meta.TransferSyntaxUID, pydicom.dcmread(
        source, stop_before_pixels=True).file_meta.TransferSyntaxUID
    found = [t for t in data_set_differences(got, want) if not t.endswith(",0000)")]
    accepted = want.file_meta.TransferSyntaxUID
    del got, want
    if found and expected != source and sent != accepted:
        # DicomFlow accepted another transfer syntax than storescp did, and the sender
        # encodes the data set itself for the one accepted: not comparable
        record(f"{name} → DicomFlow: peer re-encodes: {source.name} sent as {sent.name} to "
               f"DicomFlow, {accepted.name} to storescp: differs in {', '.join(found[:3])}")
        return []
    if name in MISLABELS and sent != own and (sent.is_compressed or own.is_compressed):
        # sent as it is on another file's presentation context: the copy is mislabelled
        # (storescp parses the direct one its own way), so neither the comparison nor
        # dciodvfy's verdict says anything about DicomFlow (between uncompressed
        # syntaxes the sender re-encodes: compared as usual)
        record(f"{name} → DicomFlow: peer limit (sent on another file's presentation context): "
               f"{source.name} sent as {sent.name}, the file is {own.name}")
        return []
    new = dciodvfy_errors(delivered) - source_errors(source)
    if new and expected != source:
        by_sender = new & dciodvfy_errors(expected)  # on storescp's copy too: the sender's
        for line in sorted(by_sender)[:3]:
            record(f"{name} → DicomFlow: peer limit (dciodvfy, on storescp's copy too): "
                   f"{source.name}: {line[:160]}")
        new -= by_sender
    return found + sorted(new)[:5]


@pytest.mark.parametrize("name", list(SENDERS))
def test_foreign_sender_through_dicomflow(name: str, corpus: list[Path], tmp_path: Path) -> None:
    sender = SENDERS[name](tmp_path / "work")
    sources = by_instance(corpus)
    direct, parsed = send_direct(sender, corpus, tmp_path)
    limits = {o.path for o in direct if not o.ok}
    # what the sender puts on the wire (CTN's encapsulated pixel data, for one, a parsing
    # storescp re-encodes): the reference for a delivered copy
    _, reference = send_direct(sender, corpus, tmp_path / "wire", bit_preserving=True)
    for outcome in direct:
        if not outcome.ok:
            record(f"{name} → DicomFlow: peer limit (storescp refuses it too): "
                   f"{outcome.path.name}: status {outcome.status} {outcome.detail[:160]}")

    destination = StoreSCP(tmp_path / "dest", "DEST", extra=SCP_OPTIONS).start()
    pipeline = corpus_pipeline(tmp_path, destination).start()
    try:
        outcomes = sender.send(pipeline.port, corpus, "DICOMFLOW")
        acknowledged = {interop_corpus.instance_uid(o.path): o.path for o in outcomes if o.ok}
        refused = [o for o in outcomes if not o.ok and o.path not in limits]
        against_us = [o for o in refused if not sent_incomplete(name, o, parsed)]
        assert not against_us, f"{name}: refused by DicomFlow, taken by storescp: {against_us}"

        def accounted() -> bool:
            aside = interop_corpus.set_aside(pipeline.spool, pipeline.DEAD_ENDS)
            return pipeline.settled() and len(destination.files()) + len(aside) >= len(acknowledged)

        wait_for(accounted, timeout=HANG_TIMEOUT * 10, interval=0.5,
                 message=f"{len(acknowledged)} deliveries ({name})")
        delivered = by_instance(destination.files())
        aside = interop_corpus.set_aside(pipeline.spool, pipeline.DEAD_ENDS)
        logs = pipeline.logs()
    finally:
        pipeline.stop()
        destination.stop()

    assert aside.keys() <= acknowledged.keys(), f"{name}: set aside, never acknowledged: {aside}"
    lost = acknowledged.keys() - delivered.keys() - aside.keys()
    assert not lost, f"{name}: lost {[acknowledged[u].name for u in lost]}\n{logs}"
    assert len(destination.files()) == len(delivered), f"{name}: duplicate deliveries"
    for uid, (_, why) in aside.items():
        path = acknowledged[uid]
        assert path not in limits, f"{name}: {path.name} acknowledged, storescp refuses it, set aside: {why}"
        assert why.split(": ", 1)[1], f"{name}: {path.name} set aside with no reason: {why}"
        record(f"{name} → DicomFlow: set aside: {path.name}: {why.splitlines()[0][:160]}")
    # a peer limit (refused by storescp, reported failed by the sender) may be delivered
    # all the same, unchanged
    unacknowledged = delivered.keys() - acknowledged.keys()
    assert {sources[u] for u in unacknowledged} <= limits, f"{name}: delivered, never acknowledged"
    for uid in unacknowledged:
        record(f"{name} → DicomFlow: peer limit delivered all the same: {sources[uid].name}")
    changed = {sources[uid].name: found for uid, copy in delivered.items()
               if (found := changes(name, copy, reference.get(uid, sources[uid]), sources[uid]))}
    assert not changed, f"{name}: delivered changed: {changed}"
    record(f"{name} → DicomFlow: sent {len(corpus)}, acknowledged {len(acknowledged)}, "
           f"delivered {len(delivered)}, set aside {len(aside)}, peer limits {len(limits)}, lost 0")


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
        assert pydicom.dcmread(reference[str(expected.SOPInstanceUID)]).PixelData[:9] == bytes(range(1, 10))
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
