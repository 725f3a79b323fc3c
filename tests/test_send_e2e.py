"""``dicomflow send`` as a real subprocess against real destinations (DCMTK storescp,
Orthanc, an in-process pynetdicom SCP): reuse, outages, two endpoints, kill -9, SIGTERM."""

from __future__ import annotations

import random
import re
import signal
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from tests.helpers import Daemon, dicom_files, make_files, run_cli, tmp_leftovers, wait_for
from tests.peers import Orthanc, StoreSCP
from tests.sendkit import StatusSCP, endpoint_conf, put_in_outbox, read_retry, read_state, storescp_uids


def uids_of(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def count(directory: Path) -> int:
    return len(dicom_files(directory))


def associations(peer: StoreSCP) -> int:
    log = (peer.directory.parent / f"storescp-{peer.port}.log").read_text(errors="replace")
    return len(re.findall(r"Association Acknowledged", log))


def test_300_files_over_few_associations(tmp_path: Path, cleanup) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS", extra=("-v",)).start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
    files = make_files(tmp_path / "src", 300)
    put_in_outbox(tmp_path / "spool", "pacs", files)
    sender = Daemon(conf, "send", "pacs").start()
    cleanup.append(sender)
    wait_for(lambda: count(tmp_path / "spool/sent/pacs") == 300, message="300 files in sent/")
    assert sorted(storescp_uids(peer.directory)) == sorted(uids_of(files))
    assert associations(peer) <= 3
    assert sender.stop() == 0


def test_destination_down_at_start_then_up_drains_without_charging(tmp_path: Path, cleanup) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS")
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
    files = make_files(tmp_path / "src", 20)
    put_in_outbox(tmp_path / "spool", "pacs", files)
    sender = Daemon(conf, "send", "pacs").start()
    cleanup.append(sender)
    wait_for(lambda: read_state(tmp_path / "spool", "pacs").get("state") == "down", message="down")
    state = read_state(tmp_path / "spool", "pacs")
    assert state["down_since"] and "refused" in state["last_error"]
    assert count(tmp_path / "spool/outbox/pacs") == 20 and read_retry(tmp_path / "spool", "pacs") == {}
    peer.start()
    cleanup.append(peer)
    wait_for(lambda: count(tmp_path / "spool/sent/pacs") == 20, message="drained")
    assert read_retry(tmp_path / "spool", "pacs") == {}
    wait_for(lambda: read_state(tmp_path / "spool", "pacs").get("state") == "idle", message="idle")
    assert read_state(tmp_path / "spool", "pacs")["down_since"] is None
    assert sender.log().count("endpoint down") == 1 and sender.log().count("back up") == 1


def test_destination_stopped_mid_run_and_restarted(tmp_path: Path, cleanup) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
    first = make_files(tmp_path / "a", 30)
    put_in_outbox(tmp_path / "spool", "pacs", first)
    sender = Daemon(conf, "send", "pacs").start()
    cleanup.append(sender)
    wait_for(lambda: count(tmp_path / "spool/sent/pacs") == 30, message="first batch")
    peer.stop()
    second = make_files(tmp_path / "b", 30)
    put_in_outbox(tmp_path / "spool", "pacs", second)
    wait_for(lambda: read_state(tmp_path / "spool", "pacs").get("state") == "down", message="down")
    peer.start()
    wait_for(lambda: count(tmp_path / "spool/sent/pacs") == 60, message="all delivered")
    assert set(storescp_uids(peer.directory)) == set(uids_of(first + second))
    assert read_retry(tmp_path / "spool", "pacs") == {}
    assert sender.stop() == 0


def test_two_endpoints_one_down_the_other_unaffected(tmp_path: Path, cleanup) -> None:
    up = StoreSCP(tmp_path / "up", ae_title="UP").start()
    cleanup.append(up)
    down = StoreSCP(tmp_path / "down", ae_title="DOWN")  # never started
    conf = endpoint_conf(tmp_path, {"up": {"port": up.port, "ae_title": "UP"},
                                    "down": {"port": down.port, "ae_title": "DOWN"}})
    files = make_files(tmp_path / "src", 40)
    put_in_outbox(tmp_path / "spool", "up", files)
    put_in_outbox(tmp_path / "spool", "down", files)
    senders = [Daemon(conf, "send", name).start() for name in ("up", "down")]
    cleanup.extend(senders)
    wait_for(lambda: count(tmp_path / "spool/sent/up") == 40, message="up delivered")
    wait_for(lambda: read_state(tmp_path / "spool", "down").get("state") == "down", message="down")
    assert count(tmp_path / "spool/outbox/down") == 40
    # the state file follows the last delivery (not before it): wait for it, not race it
    wait_for(lambda: read_state(tmp_path / "spool", "up").get("state") == "idle", message="up idle")


def test_second_sender_for_an_endpoint_exits_with_a_message(tmp_path: Path, cleanup) -> None:
    server = StatusSCP(ae_title="PACS").start()
    cleanup.append(server)
    conf = endpoint_conf(tmp_path, {"pacs": {"port": server.port, "ae_title": "PACS"}})
    sender = Daemon(conf, "send", "pacs").start()
    cleanup.append(sender)
    sender.wait_log("sender started")
    result = run_cli(conf, "send", "pacs")
    assert result.returncode == 1 and "already running" in result.stderr


def test_sigterm_finishes_and_exits_zero(tmp_path: Path, cleanup) -> None:
    server = StatusSCP(ae_title="PACS").start()
    cleanup.append(server)
    conf = endpoint_conf(tmp_path, {"pacs": {"port": server.port, "ae_title": "PACS"}})
    put_in_outbox(tmp_path / "spool", "pacs", make_files(tmp_path / "src", 200))
    sender = Daemon(conf, "send", "pacs").start()
    wait_for(lambda: count(tmp_path / "spool/sent/pacs") >= 5, message="sending")
    assert sender.stop(signal.SIGTERM) == 0
    state = read_state(tmp_path / "spool", "pacs")
    assert state["state"] == "stopped"
    sent = count(tmp_path / "spool/sent/pacs")
    assert sent + count(tmp_path / "spool/outbox/pacs") == 200
    assert len(server.received) == sent  # nothing half-done: each send finished and was moved
    assert tmp_leftovers(tmp_path / "spool") == []


def test_transcodes_for_an_implicit_only_storescp(tmp_path: Path, cleanup) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS", extra=("+xi",)).start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
    sources = [Path(get_testdata_file(n)) for n in ("SC_rgb_jpeg_gdcm.dcm", "JPEG2000.dcm")]
    put_in_outbox(tmp_path / "spool", "pacs", sources)
    sender = Daemon(conf, "send", "pacs").start()
    cleanup.append(sender)
    wait_for(lambda: count(tmp_path / "spool/sent/pacs") == 2, message="delivered")
    received = [dcmread(p) for p in peer.files()]
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(uids_of(sources))
    assert {ds.file_meta.TransferSyntaxUID for ds in received} == {ImplicitVRLittleEndian}
    assert all(len(ds.PixelData) == ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
               * int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in received)


@pytest.mark.slow
def test_orthanc_receives_everything(tmp_path: Path, cleanup) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", ae_title="ORTHANC").start()
    cleanup.append(orthanc)
    conf = endpoint_conf(tmp_path, {"orthanc": {"port": orthanc.dicom_port, "ae_title": "ORTHANC"}})
    files = make_files(tmp_path / "src", 25) + [Path(get_testdata_file("JPEG2000.dcm")),
                                                 Path(get_testdata_file("CT_small.dcm"))]
    put_in_outbox(tmp_path / "spool", "orthanc", files)
    sender = Daemon(conf, "send", "orthanc").start()
    cleanup.append(sender)
    wait_for(lambda: count(tmp_path / "spool/sent/orthanc") == 27, message="delivered")
    assert orthanc.sop_instance_uids() == set(uids_of(files))


@pytest.mark.slow
def test_kill_9_during_a_500_file_run_loses_nothing(tmp_path: Path, cleanup) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
    files = make_files(tmp_path / "src", 500)
    put_in_outbox(tmp_path / "spool", "pacs", files)
    rng = random.Random()
    kills = 0
    for target in sorted(rng.sample(range(20, 480), 3)):
        sender = Daemon(conf, "send", "pacs", log_name=f"send-pacs-{kills}").start()
        wait_for(lambda t=target: count(tmp_path / "spool/sent/pacs") >= t or
                 count(tmp_path / "spool/outbox/pacs") == 0, message=f"{target} delivered")
        sender.kill()
        kills += 1
    sender = Daemon(conf, "send", "pacs", log_name="send-pacs-final").start()
    cleanup.append(sender)
    sender.wait_log("sender started")  # its SIGTERM handler is in place (the outbox may be empty)
    wait_for(lambda: count(tmp_path / "spool/outbox/pacs") == 0, 120, message="outbox empty")
    assert sender.stop() == 0
    received = storescp_uids(peer.directory)
    expected = uids_of(files)
    assert set(received) == set(expected)
    assert len(received) - len(expected) <= kills
    assert count(tmp_path / "spool/sent/pacs") == 500
    assert tmp_leftovers(tmp_path / "spool") == []
