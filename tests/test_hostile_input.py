"""Hostile input over the network and through the drop folder (issue 6, scenario 3).

Every hostile case ends in a DICOM refusal (A-ASSOCIATE-RJ, A-ABORT, a closed
connection or a failure status) or in ``quarantine/`` with a reason; nothing is written
outside the spool; no log line is forged; every daemon stays up. Unusual but valid
input is accepted and delivered unchanged.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests import corpus
from tests.helpers import dcmtk, make_dataset, wait_for, write_dataset
from tests.peers import TCP_ENV
from tests.reliability import (
    CT,
    EXPLICIT_LE,
    Pipeline,
    RawAssociation,
    c_store_rq,
    encode_dataset,
    established,
    p_data,
    record,
    record_quarantine,
    rss_kib,
    storescu_acked,
    wait_closed,
)

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e

FORGED = "2001-01-01 00:00:00.000 CRITICAL receive | FORGED"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.1"
REFUSED = {0, 3, 7}  # associate(): closed, A-ASSOCIATE-RJ, A-ABORT


def entries_outside(base: Path, spool: Path) -> set[str]:
    """Every path under the test directory that is not in the spool or a peer's folder."""
    found = set()
    for root, dirs, files in os.walk(base):
        if Path(root) == base:
            dirs[:] = [d for d in dirs if d not in (spool.name, "dest", "src", "corpus")]
        found.update(os.path.join(root, f) for f in files)
    return found


def no_forged_lines(logs: str) -> None:
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")
    for line in logs.splitlines():
        if "FORGED" in line:
            assert stamp.match(line) and not line.startswith("2001-01-01"), f"forged log line: {line!r}"


def hostile_dataset(kind: str) -> tuple[str, bytes]:
    """(command SOP Instance UID, dataset bytes) of a store the receiver will take but
    the filter must quarantine."""
    ds = make_dataset()
    uid = str(ds.SOPInstanceUID)
    body = encode_dataset(ds)
    if kind == "zero-bytes":
        return uid, b""
    if kind == "not-dicom":
        return uid, b"%PDF-1.4 this is not a DICOM data set\n" * 20
    if kind == "truncated":
        return uid, body[: len(body) // 2]
    if kind == "uid-mismatch":
        return "1.2.3.4.5.6.7.8.9", body
    if kind == "no-instance-uid":
        del ds.SOPInstanceUID
        return uid, encode_dataset(ds)
    if kind == "absurd-length":
        pixel = body.rindex(b"\xe0\x7f\x10\x00")
        bad = struct.pack("<HH", 0x0009, 0x1010) + b"UN\0\0" + struct.pack("<L", 0x7FFFFFF0) + b"xx"
        return uid, body[:pixel] + bad + body[pixel:]
    if kind == "part10-with-preamble":  # a whole file (preamble, DICM, meta) sent as a data set
        path = get_testdata_file("CT_small.dcm")
        return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), Path(path).read_bytes()
    raise ValueError(kind)


NETWORK_QUARANTINE = ("zero-bytes", "not-dicom", "truncated", "uid-mismatch", "no-instance-uid",
                      "absurd-length", "part10-with-preamble")


@pytest.fixture
def pipeline(tmp_path: Path):
    running = Pipeline(tmp_path, router={"acse_timeout": "2s", "network_timeout": "5s",
                                         "max_associations": "3"}).start()
    yield running
    running.stop()


def network_refusals(pipeline: Pipeline) -> dict[str, object]:
    """Cases a normal SCU would not send, built by hand; returns case → outcome."""
    port = pipeline.port
    outcomes: dict[str, object] = {}

    def associate(case: str, **kwargs) -> None:
        conn = RawAssociation(port)
        outcomes[case] = conn.associate(**kwargs)
        conn.close()

    associate("calling AE with a newline", calling=b"EV\n" + FORGED.encode()[:12])
    associate("calling AE with NUL", calling=b"EVIL\0AE")
    associate("calling AE not ASCII", calling=b"\xff\xfe\x80")
    associate("calling AE blank", calling=b"")
    associate("called AE with a newline", called=b"DICOM\nFLOW")
    associate("called AE wrong", called=b"NOT_US")
    associate("called AE ../", called=b"../../etc")

    def store(case: str, sop_class: str | bytes, sop_instance: str | bytes) -> None:
        conn = established(port)
        outcomes[case] = conn.store(c_store_rq(sop_class, sop_instance), encode_dataset(make_dataset()))
        conn.release()

    store("SOP Instance UID with ../", CT, "1.2.3/../../../tmp/evil")
    store("SOP Instance UID of 70 characters", CT, "1." + "2" * 68)
    store("SOP Instance UID with NUL", CT, "1.2\x003")
    store("SOP Instance UID ..", CT, "..")
    store("SOP Instance UID with a newline", CT, "1.2\n" + FORGED)
    store("SOP Class UID with /", "1.2.840.10008/../x", "1.2.3.4")

    # Garbage instead of an A-ASSOCIATE-RQ, and a P-DATA before any association.
    conn = RawAssociation(port)
    conn.send(os.urandom(2000))
    answer = conn.read_pdu()
    outcomes["random bytes instead of a PDU"] = "closed" if answer is None else answer[0]
    conn.close()
    conn = RawAssociation(port)
    conn.send(p_data(1, c_store_rq(CT, "1.2.3"), command=True))
    answer = conn.read_pdu()
    outcomes["P-DATA before association"] = "closed" if answer is None else answer[0]
    conn.close()

    # An A-ASSOCIATE-RQ declaring 2 GiB; a P-DATA declaring 2 GiB on a short stream;
    # a PDV item declaring 2 GiB inside a small PDU; an unaccepted context ID.
    before = rss_kib(pipeline.daemons["receive"].pid, "VmHWM") or 0
    conn = RawAssociation(port)
    conn.send(struct.pack(">BBI", 0x01, 0, 0x7FFFFFFF) + b"\0" * 100)
    wait_closed(conn)
    outcomes["A-ASSOCIATE-RQ declaring 2 GiB"] = "closed"
    conn = established(port)
    conn.send(struct.pack(">BBI", 0x04, 0, 0x7FFFFFFF) + b"\0" * 100)
    wait_closed(conn)
    outcomes["P-DATA declaring 2 GiB on a short stream"] = "closed"
    conn = established(port)
    pdv = struct.pack(">IBB", 0x7FFFFFFF, 1, 3) + b"\0" * 100
    conn.send(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    wait_closed(conn)
    outcomes["PDV item declaring 2 GiB"] = "closed"
    after = rss_kib(pipeline.daemons["receive"].pid, "VmHWM") or 0
    outcomes["peak memory growth on 2 GiB declarations (KiB)"] = after - before
    conn = established(port)
    outcomes["unaccepted presentation context"] = conn.store(c_store_rq(CT, "1.2.3.4.99"),
                                                             encode_dataset(make_dataset()),
                                                             context_id=99)
    conn.close()
    return outcomes


def slots_and_timeouts(pipeline: Pipeline) -> dict[str, object]:
    """A client that connects and sends nothing is dropped after the ACSE timeout and
    never holds an association slot; idle associations fill the slots (one too many is
    refused, busy) until the network timeout frees them."""
    outcomes: dict[str, object] = {}
    silent = RawAssociation(pipeline.port)
    idle = [established(pipeline.port) for _ in range(3)]  # max_associations = 3
    extra = RawAssociation(pipeline.port)
    outcomes["more associations than allowed"] = extra.associate()
    extra.close()
    wait_closed(silent, timeout=60)  # acse_timeout = 2s
    outcomes["silent client (closed by timeout)"] = "closed"
    for conn in idle:
        wait_closed(conn, timeout=60)  # network_timeout = 5s frees the slots
    established(pipeline.port).release()
    return outcomes


def test_hostile_network_and_drop_folder(pipeline: Pipeline, tmp_path: Path) -> None:
    spool = pipeline.spool
    outside_before = entries_outside(tmp_path, spool)
    tmp_before = set(os.listdir("/tmp"))

    outcomes = network_refusals(pipeline)
    growth = outcomes.pop("peak memory growth on 2 GiB declarations (KiB)")
    outcomes.update(slots_and_timeouts(pipeline))
    for case, outcome in outcomes.items():
        if case.startswith(("calling AE", "called AE", "more associations")):
            assert outcome in REFUSED, f"{case}: association answered {outcome}"
        elif case in ("random bytes instead of a PDU", "P-DATA before association"):
            assert outcome in ("closed", 7), f"{case}: {outcome}"
        else:
            assert outcome in ("closed", "abort") or (isinstance(outcome, int) and outcome != 0), \
                f"{case}: store answered {outcome!r}"
    assert [p for p in pipeline.stage("incoming")] == []
    pipeline.assert_alive()

    # Stores the receiver takes (it does not parse data sets) and the filter quarantines.
    for kind in NETWORK_QUARANTINE:
        uid, data = hostile_dataset(kind)
        conn = established(pipeline.port, contexts=((1, CT, (EXPLICIT_LE,)),))
        status = conn.store(c_store_rq(CT, uid), data)
        conn.release()
        outcomes[f"network: {kind}"] = status
        assert isinstance(status, int) or status in ("closed", "abort"), kind

    # The drop folder: the shared malformed corpus (symlinks, FIFO, directory…) + more.
    cases = corpus.build(tmp_path / "corpus")
    extra = {
        "evil\n" + FORGED + ".dcm": b"not DICOM, and a newline in the name",
        "wrong-preamble.dcm": b"\0" * 128 + b"DICX" + encode_dataset(make_dataset()),
        "nul-uid.dcm": corpus._set_uid("1.2\x003"),
        "dotdot-uid.dcm": corpus._set_uid("../.."),
    }
    for name, data in extra.items():
        (tmp_path / "corpus" / name).write_bytes(data)
    names = [c.name for c in cases] + list(extra)
    for name in names:
        os.rename(tmp_path / "corpus" / name, spool / "incoming" / name)

    network_quarantined = sum(1 for k in NETWORK_QUARANTINE if outcomes[f"network: {k}"] == 0)
    expected = len(names) + network_quarantined

    def quarantined() -> list[str]:
        return [n for n in os.listdir(spool / "quarantine") if not n.startswith(".")
                and not n.endswith(".reason")]

    wait_for(lambda: len(quarantined()) >= expected and pipeline.drained(), timeout=120,
             message=f"{expected} entries in quarantine/")
    assert len(quarantined()) == expected
    for name in quarantined():
        reason = spool / "quarantine" / f"{name}.reason"
        assert reason.is_file() and reason.read_text().strip(), f"{name} has no reason"
    assert pipeline.delivered() == {}, "a hostile input reached the destination"
    assert os.listdir(spool / "incoming") == [".tmp"]
    made_by_the_test = {str(p) for p in tmp_path.glob("*.log")} | {
        str(tmp_path / ".corpus-valid-target.dcm")}  # the target of corpus's valid symlink
    assert entries_outside(tmp_path, spool) - outside_before <= made_by_the_test, \
        "a file was written outside the spool"
    assert not [n for n in set(os.listdir("/tmp")) - tmp_before if "evil" in n or "FORGED" in n]
    assert not os.path.lexists("/tmp/evil")
    no_forged_lines(pipeline.logs())
    pipeline.assert_alive()

    # Still serving: a normal image goes through after all that.
    good = write_dataset(make_dataset(), tmp_path / "src" / "good.dcm")
    acked, result = storescu_acked(pipeline.port, [good])
    assert acked == [good], result.stdout + result.stderr
    wait_for(lambda: pipeline.delivered(), message="a good image delivered after the attack")

    refused = sum(1 for k, v in outcomes.items() if not k.startswith("network:") or v != 0)
    record("hostile input", sent=len(outcomes) + len(names) + 1, acknowledged=1 + network_quarantined,
           delivered=1, quarantined=record_quarantine(spool), refused=refused)
    assert len(outcomes) + len(names) >= 25
    codes = pipeline.stop()
    assert codes == {"receive": 0, "filter": 0, "send": 0}, codes
    # Checked last so that a failure here does not hide the other cases' results: a
    # PDU's declared length must not become an allocation (max_pdu bounds what we take).
    assert growth < 100 * 1024, f"receiver peak memory grew by {growth} KiB on 2 GiB declarations"


def test_unusual_but_valid_input_is_delivered(tmp_path: Path) -> None:
    """Deflated and big-endian transfer syntaxes, a private SOP class, 1 and 1,000 frames."""
    pipeline = Pipeline(tmp_path, peer_extra=("+xa", "-pm")).start()
    try:
        src = tmp_path / "src"
        single = make_dataset(NumberOfFrames=1)
        many = make_dataset(NumberOfFrames=1000)
        many.PixelData = os.urandom(16 * 16 * 2 * 1000)
        private = make_dataset(sop_class=PRIVATE_SOP_CLASS, modality="OT")
        by_storescu = [Path(get_testdata_file(n)) for n in ("MR_small_bigendian.dcm", "CT_small.dcm")]
        by_storescu += [write_dataset(single, src / "one-frame.dcm"),
                        write_dataset(many, src / "thousand-frames.dcm")]
        # dcmsend keeps a deflated file deflated and proposes unknown (private) SOP classes.
        by_dcmsend = [Path(get_testdata_file("image_dfl.dcm")), write_dataset(private, src / "private.dcm")]
        acked, result = storescu_acked(pipeline.port, by_storescu, extra=("-R",))
        assert acked == by_storescu, result.stdout + result.stderr
        sent = subprocess.run([dcmtk("dcmsend"), "-aec", "DICOMFLOW", "127.0.0.1", str(pipeline.port),
                               *map(str, by_dcmsend)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **TCP_ENV})
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sources = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in by_storescu + by_dcmsend}
        wait_for(lambda: len(pipeline.delivered()) == len(sources) and pipeline.drained(),
                 message="every unusual file delivered")
        received = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, pipeline.peer.files())}
        assert received.keys() == sources.keys()
        for uid, source in sources.items():
            got = received[uid]
            assert got.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID, uid
            assert got.SOPClassUID == source.SOPClassUID
            if "PixelData" in source:
                assert got.PixelData == source.PixelData, uid
        assert received[str(many.SOPInstanceUID)].NumberOfFrames == 1000
        assert pipeline.stage("quarantine") == [] and pipeline.stage("rejected") == []
        assert pipeline.stage("failed", "pacs") == []
        record("unusual valid input", sent=len(sources), acknowledged=len(sources),
               delivered=len(received))
    finally:
        codes = pipeline.stop()
    assert codes == {"receive": 0, "filter": 0, "send": 0}, codes


def test_a_half_open_tcp_client_does_not_block_others(pipeline: Pipeline, tmp_path: Path) -> None:
    """A client that connects and sends nothing at all never blocks a normal sender."""
    silent = socket.create_connection(("127.0.0.1", pipeline.port))
    try:
        good = write_dataset(make_dataset(), tmp_path / "src" / "good.dcm")
        acked, result = storescu_acked(pipeline.port, [good])
        assert acked == [good], result.stdout + result.stderr
    finally:
        silent.close()
