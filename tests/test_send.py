"""The sender driven in-process (``run(once=True)``, injected clock) against real DICOM
peers on loopback: an in-process pynetdicom SCP answering chosen statuses, DCMTK storescp."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit

from pipeline.clock import FakeClock
from pipeline.config import load
from pipeline.dicom import scu as net
from pipeline.errors import AlreadyRunning
from pipeline.spool import Spool
from services.send import Sender, main
from tests.helpers import dicom_files, make_dataset, make_files, write_dataset
from tests.peers import StoreSCP
from tests.sendkit import (
    StatusSCP,
    endpoint_conf,
    put_in_outbox,
    read_retry,
    read_state,
    storescp_uids,
)

EP = "pacs"


@pytest.fixture
def scp():
    servers: list[StatusSCP] = []

    def start(**kwargs) -> StatusSCP:
        server = StatusSCP(ae_title="PACS", **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def sender_for(tmp_path: Path, port: int, clock=None, **endpoint) -> Sender:
    conf = endpoint_conf(tmp_path, {EP: {"port": port, "ae_title": "PACS", **endpoint}})
    return Sender(load(conf), EP, clock=clock or FakeClock(), install_signals=False)


def spool_of(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def outbox(tmp_path: Path) -> list[Path]:
    return dicom_files(spool_of(tmp_path) / "outbox" / EP)


def sent(tmp_path: Path) -> list[Path]:
    return dicom_files(spool_of(tmp_path) / "sent" / EP)


def failed(tmp_path: Path) -> list[Path]:
    return dicom_files(spool_of(tmp_path) / "failed" / EP)


def error_text(path: Path) -> str:
    return path.with_name(path.name + ".error").read_text()


# -- outcomes by status ------------------------------------------------------------------

def test_success_moves_to_sent_over_one_association(tmp_path: Path, scp) -> None:
    server = scp()
    files = put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 20))
    sender = sender_for(tmp_path, server.port)
    assert sender.run(once=True) == 0
    assert outbox(tmp_path) == []
    assert [p.name for p in sent(tmp_path)] == [p.name for p in files]
    assert server.associations == 1
    assert server.uids() == [dcmread(p).SOPInstanceUID for p in sent(tmp_path)]  # arrival order
    state = read_state(spool_of(tmp_path), EP)
    assert state["state"] == "stopped" and state["sent"] == 20 and state["failed"] == 0


def test_transient_a700_is_retried_then_delivered(tmp_path: Path, scp) -> None:
    server = scp(statuses=[0xA700])
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 1))
    clock = FakeClock()
    sender_for(tmp_path, server.port, clock=clock, retry={"backoff": "10s"}).run(once=True)
    assert len(sent(tmp_path)) == 1 and failed(tmp_path) == []
    assert len(server.received) == 2 and server.received[0][0] == server.received[1][0]
    # a lone 0xA700 makes the endpoint busy: it waited (on the fake clock) for the probe
    # backoff, 0.5 s shortened by jitter — not the file's 10 s backoff — and charged nothing
    assert 0.25 <= sum(clock.waits) <= 0.5, clock.waits
    assert read_retry(spool_of(tmp_path), EP) == {}


def test_transient_file_goes_to_the_back_and_does_not_block_the_queue(tmp_path: Path, scp) -> None:
    server = scp(statuses=[0xA701])
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 3))
    sender_for(tmp_path, server.port).run(once=True)
    uids = server.uids()
    assert len(uids) == 4
    assert uids[-1] == uids[0]  # the refused first file was sent again after the others
    assert len(sent(tmp_path)) == 3


def test_permanent_c000_goes_to_failed_with_reason(tmp_path: Path, scp) -> None:
    server = scp(statuses=[0xC000])
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 2))
    sender_for(tmp_path, server.port).run(once=True)
    [path] = failed(tmp_path)
    text = error_text(path)
    for expected in ("0xC000", "cannot understand", "attempts: 1", "endpoint: pacs", "time: 20",
                     "PACS@127.0.0.1"):
        assert expected in text
    assert len(sent(tmp_path)) == 1
    state = read_state(spool_of(tmp_path), EP)
    assert state["failed"] == 1 and "0xC000" in state["last_error"]


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warnings_are_delivered(tmp_path: Path, scp, status: int) -> None:
    server = scp(statuses=[status])
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 1))
    sender_for(tmp_path, server.port).run(once=True)
    assert len(sent(tmp_path)) == 1 and failed(tmp_path) == []


@pytest.mark.parametrize("status", [0x0122, 0xA900, 0x0124, 0x0211])
def test_other_failures_are_permanent(tmp_path: Path, scp, status: int) -> None:
    server = scp(statuses=[status])
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 1))
    sender_for(tmp_path, server.port).run(once=True)
    [path] = failed(tmp_path)
    assert f"0x{status:04X}" in error_text(path)


# -- files that are not what they seem ------------------------------------------------------

def test_unreadable_file_fails_without_blocking_the_queue(tmp_path: Path, scp) -> None:
    server = scp()
    spool = Spool(spool_of(tmp_path)).create([EP])
    spool.write_bytes(spool.outbox(EP), "20260101T000000.000000-000001-1.2.3.dcm", b"not dicom at all")
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 2))
    sender_for(tmp_path, server.port).run(once=True)
    [bad] = failed(tmp_path)
    assert "meta" in error_text(bad)
    assert len(sent(tmp_path)) == 2


def test_sidecars_and_other_files_in_the_outbox_are_ignored(tmp_path: Path, scp) -> None:
    server = scp()
    [path] = put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 1))
    box = path.parent
    (box / "notes.txt").write_text("hello")
    (box / (path.name + ".error")).write_text("old reason")
    (box / "orphan.dcm.error").write_text("old reason")
    sender_for(tmp_path, server.port).run(once=True)
    assert len(server.received) == 1
    assert (box / "notes.txt").exists() and (box / "orphan.dcm.error").exists()
    assert not (box / (path.name + ".error")).exists()  # the delivered file's stale sidecar


def test_file_moved_back_by_hand_without_sidecar_is_sent_again(tmp_path: Path, scp) -> None:
    server = scp(statuses=[0xC000])
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 1))
    sender_for(tmp_path, server.port).run(once=True)
    [path] = failed(tmp_path)
    spool = Spool(spool_of(tmp_path))
    spool.move(path, spool.outbox(EP))
    sender_for(tmp_path, server.port).run(once=True)
    assert len(sent(tmp_path)) == 1


# -- contexts, associations, transcoding -----------------------------------------------------

def test_mixed_classes_and_syntaxes_share_one_association(tmp_path: Path, scp) -> None:
    server = scp()
    src = tmp_path / "src"
    files = [write_dataset(make_dataset(), src / "ct.dcm"),
             write_dataset(make_dataset(sop_class="1.2.840.10008.5.1.4.1.1.4", modality="MR"),
                           src / "mr.dcm"),
             Path(get_testdata_file("MR_small_implicit.dcm"))]
    put_in_outbox(spool_of(tmp_path), EP, files)
    sender_for(tmp_path, server.port).run(once=True)
    assert len(sent(tmp_path)) == 3 and server.associations == 1
    syntaxes = {ts for _, ts in server.received}
    assert ImplicitVRLittleEndian in syntaxes


def test_compressed_file_is_transcoded_keeping_its_uid(tmp_path: Path, scp) -> None:
    server = scp(transfer_syntaxes=[ImplicitVRLittleEndian])
    source = Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    [path] = put_in_outbox(spool_of(tmp_path), EP, [source])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sender_for(tmp_path, server.port).run(once=True)
    [(uid, ts)] = server.received
    assert uid == dcmread(source).SOPInstanceUID and ts == ImplicitVRLittleEndian
    [delivered] = sent(tmp_path)
    assert hashlib.sha256(delivered.read_bytes()).hexdigest() == digest  # spool copy untouched


def test_transcoding_disabled_fails_with_reason(tmp_path: Path, scp) -> None:
    server = scp(transfer_syntaxes=[ImplicitVRLittleEndian])
    put_in_outbox(spool_of(tmp_path), EP, [Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))])
    sender_for(tmp_path, server.port, transcode={"enabled": "false"}).run(once=True)
    [path] = failed(tmp_path)
    assert "transcoding is disabled" in error_text(path) and server.received == []


def test_transcoding_bound_fails_with_reason(tmp_path: Path, scp) -> None:
    server = scp(transfer_syntaxes=[ImplicitVRLittleEndian])
    put_in_outbox(spool_of(tmp_path), EP, [Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))])
    sender_for(tmp_path, server.port, transcode={"max_size": "1 KiB"}).run(once=True)
    [path] = failed(tmp_path)
    assert "max_size" in error_text(path)


def test_sop_class_the_destination_refuses_fails_with_reason(tmp_path: Path, scp) -> None:
    server = scp(sop_classes=["1.2.840.10008.5.1.4.1.1.4"])  # MR only
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "ct", 1))  # CT
    put_in_outbox(spool_of(tmp_path), EP,
                  make_files(tmp_path / "mr", 1, sop_class="1.2.840.10008.5.1.4.1.1.4"))
    sender_for(tmp_path, server.port).run(once=True)
    [path] = failed(tmp_path)
    assert "CT Image Storage" in error_text(path) and "accept" in error_text(path)
    assert len(sent(tmp_path)) == 1


def test_only_refused_classes_in_a_batch_fail_not_down(tmp_path: Path, scp) -> None:
    server = scp(sop_classes=["1.2.840.10008.5.1.4.1.1.4"])  # MR only, CT files only
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "ct", 2))
    sender = sender_for(tmp_path, server.port)
    sender.run(once=True)
    assert len(failed(tmp_path)) == 2 and sender.down_reason is None
    assert "none of the proposed" in error_text(failed(tmp_path)[0])


def test_pass_calling_ae_title_uses_the_source_ae(tmp_path: Path, scp) -> None:
    server = scp()
    src = tmp_path / "src"
    files = []
    for index, source_ae in enumerate(["MODALITY_A", "MODALITY_A", "MODALITY_B"]):
        ds = make_dataset()
        ds.file_meta.SourceApplicationEntityTitle = source_ae
        files.append(write_dataset(ds, src / f"{index}.dcm"))
    put_in_outbox(spool_of(tmp_path), EP, files)
    seen: list[str] = []
    from pynetdicom import evt

    server.server.bind(evt.EVT_ESTABLISHED, lambda e: seen.append(e.assoc.requestor.ae_title))
    sender_for(tmp_path, server.port, pass_calling_ae_title="true").run(once=True)
    assert seen == ["MODALITY_A", "MODALITY_B"]


# -- endpoint health ---------------------------------------------------------------------------

def test_endpoint_down_charges_no_attempt_then_drains(tmp_path: Path) -> None:
    server = StatusSCP(ae_title="PACS")
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 5))
    sender = sender_for(tmp_path, server.port)
    sender.run(once=True)  # nothing listening: returns once the endpoint is known down
    state = read_state(spool_of(tmp_path), EP)
    assert len(outbox(tmp_path)) == 5 and read_retry(spool_of(tmp_path), EP) == {}
    assert "refused" in state["last_error"]
    server.start()
    try:
        sender_for(tmp_path, server.port).run(once=True)
    finally:
        server.stop()
    assert len(sent(tmp_path)) == 5


def test_down_and_back_up_log_one_line_each_not_one_per_probe(tmp_path: Path) -> None:
    server = StatusSCP(ae_title="PACS")
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 1))
    sender = sender_for(tmp_path, server.port)
    sender.start()
    try:
        for _ in range(5):  # five probes while down
            sender.step()
            sender.clock.advance(10)
        assert sender.down_reason is not None
        assert read_state(spool_of(tmp_path), EP)["state"] == "down"
        assert read_state(spool_of(tmp_path), EP)["down_since"]
        server.start()
        for _ in range(3):
            sender.step()
            sender.clock.advance(10)
        assert sender.down_reason is None and len(sent(tmp_path)) == 1
    finally:
        sender.close()
        server.stop()


def test_second_sender_for_the_same_endpoint_is_refused(tmp_path: Path, scp) -> None:
    server = scp()
    first = sender_for(tmp_path, server.port)
    first.start()
    try:
        with pytest.raises(AlreadyRunning):
            sender_for(tmp_path, server.port).start()
    finally:
        first.close()


def test_unknown_endpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    conf = endpoint_conf(tmp_path, {EP: {"port": 11999, "ae_title": "PACS"}})
    assert main(load(conf), "nope") == 1
    assert "unknown endpoint 'nope'" in capsys.readouterr().err


# -- windows (injected clock: nobody waits a real minute) ---------------------------------------

class _RecordingClock(FakeClock):
    def __init__(self, spool: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spool = spool
        self.states: list[dict] = []

    def wait(self, waiter, seconds: float) -> bool:
        self.states.append(read_state(self.spool, EP))
        return super().wait(waiter, seconds)


def test_window_closed_now_opens_a_minute_later(tmp_path: Path, scp) -> None:
    server = scp()
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 3))
    clock = _RecordingClock(spool_of(tmp_path), start=datetime(2026, 11, 28, 12, 0, 0))
    sender = sender_for(tmp_path, server.port, clock=clock, schedule={"window": "12:01 - 13:00"})
    sender.run(once=True)
    assert clock.waits[0] == 60.0  # slept exactly until the opening, computed, not polled
    outside = clock.states[0]
    assert outside["state"] == "outside_window"
    assert outside["next_open"].startswith("2026-11-28T12:01:00")
    assert len(sent(tmp_path)) == 3 and server.associations == 1


def test_files_wait_outside_the_window(tmp_path: Path, scp) -> None:
    server = scp()
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 2))
    clock = FakeClock(start=datetime(2026, 11, 28, 12, 0, 0))
    sender = sender_for(tmp_path, server.port, clock=clock, schedule={"window": "19:00 - 07:00"})
    sender.start()
    try:
        wait, _ = sender.step()
        assert wait == 900.0  # capped re-computation of a 7-hour sleep
        assert server.received == [] and len(outbox(tmp_path)) == 2
    finally:
        sender.close()


# -- the pynetdicom C-STORE response race (README, Design notes) ------------------------------------------

class _NeverPausedCheckpoint:
    """Stands in for the reactor's pause checkpoint so the reactor never pauses."""

    def wait(self, timeout=None) -> bool:
        return True

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return True


def _racy_association(port: int, fix: bool, dimse_timeout: float):
    """An association whose reactor always wins the race for the C-STORE response: it
    never pauses, and the waiting send only looks at the queue after the reactor took
    the response off it."""
    from pynetdicom import AE, Association

    ae = AE(ae_title="RACER")
    ae.dimse_timeout = dimse_timeout
    contexts = net.contexts_for([("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")], fallback=False)
    assoc = ae.associate("127.0.0.1", port, contexts, ae_title="PACS",
                         evt_handlers=net.HANDLERS if fix else [])
    assert assoc.is_established

    class Racy(type(assoc)):
        @property
        def _is_paused(self) -> bool:
            return True

        @_is_paused.setter
        def _is_paused(self, value: bool) -> None:
            pass

    assoc.__class__ = Racy
    assoc._reactor_checkpoint = _NeverPausedCheckpoint()
    grabbed = threading.Condition()
    counts = {"grabs": 0, "seen": 0}
    serve = assoc._serve_request if fix else Association._serve_request.__get__(assoc)

    def reactor_serve(msg, context_id):
        with grabbed:
            counts["grabs"] += 1
            grabbed.notify_all()
        serve(msg, context_id)

    assoc._serve_request = reactor_serve
    original_get = assoc.dimse.get_msg

    def sender_get(block=False):
        if not block:
            return original_get(block)
        with grabbed:
            assert grabbed.wait_for(lambda: counts["grabs"] > counts["seen"], 10), \
                "the reactor never took the response"
        result = original_get(block)
        with grabbed:
            counts["seen"] = counts["grabs"]
        return result

    assoc.dimse.get_msg = sender_get
    return assoc


def test_race_without_the_fix_loses_the_response(tmp_path: Path, scp) -> None:
    """Control: proves the test really reproduces pynetdicom's race."""
    server = scp()
    path = write_dataset(make_dataset(), tmp_path / "one.dcm")
    assoc = _racy_association(server.port, fix=False, dimse_timeout=1.0)
    try:
        rsp = assoc.send_c_store(path)
        assert "Status" not in rsp  # the response was swallowed; the send waited for the timeout
        assert len(server.received) == 1
    finally:
        assoc.abort()


def test_race_with_the_fix_hands_the_response_back(tmp_path: Path, scp) -> None:
    server = scp()
    paths = [write_dataset(make_dataset(), tmp_path / f"{i}.dcm") for i in range(20)]
    assoc = _racy_association(server.port, fix=True, dimse_timeout=30.0)
    try:
        for path in paths:
            rsp = assoc.send_c_store(path)
            assert rsp.Status == 0x0000
        assert net.handbacks(assoc) >= 20  # every response was first taken by the reactor
    finally:
        assoc.abort()


def test_many_sends_over_one_association_never_lose_a_response(tmp_path: Path, scp) -> None:
    """The natural race, exercised many times: a lost response would show up as an empty
    status (dimse_timeout is short, so a stall fails rather than hangs)."""
    server = scp()
    path = write_dataset(make_dataset(rows=4, cols=4), tmp_path / "small.dcm")
    from pynetdicom import AE

    ae = AE(ae_title="STRESS")
    ae.dimse_timeout = 5
    contexts = net.contexts_for([("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")], fallback=False)
    assoc = ae.associate("127.0.0.1", server.port, contexts, ae_title="PACS", evt_handlers=net.HANDLERS)
    try:
        statuses = [assoc.send_c_store(path).get("Status") for _ in range(400)]
    finally:
        assoc.release()
    assert statuses == [0] * 400


# -- retention and state --------------------------------------------------------------------------

def test_state_file_schema(tmp_path: Path, scp) -> None:
    server = scp()
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 1))
    sender_for(tmp_path, server.port).run(once=True)
    state = json.loads((spool_of(tmp_path) / "run" / f"send-{EP}.json").read_text())
    assert set(state) == {"endpoint", "pid", "state", "since", "down_since", "last_error",
                          "last_error_at", "next_open", "sent", "failed", "updated"}
    assert state["endpoint"] == EP and state["state"] == "stopped" and state["sent"] == 1


def test_storescp_destination(tmp_path: Path) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    try:
        files = make_files(tmp_path / "src", 10)
        put_in_outbox(spool_of(tmp_path), EP, files)
        sender_for(tmp_path, peer.port).run(once=True)
        assert sorted(storescp_uids(peer.directory)) == sorted(
            str(dcmread(p).SOPInstanceUID) for p in files)
    finally:
        peer.stop()


def test_jpeg_file_sent_as_is_when_accepted(tmp_path: Path, scp) -> None:
    source = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert dcmread(source).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    server = scp(transfer_syntaxes=[JPEGBaseline8Bit, ImplicitVRLittleEndian])
    put_in_outbox(spool_of(tmp_path), EP, [source])
    sender_for(tmp_path, server.port).run(once=True)
    assert [ts for _, ts in server.received] == [JPEGBaseline8Bit]


def test_idle_association_is_released_after_idle_release(tmp_path: Path, scp) -> None:
    server = scp()
    put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "src", 2))
    sender = sender_for(tmp_path, server.port, idle_release="10s")
    sender.start()
    try:
        sender.step()  # delivers both over one association
        assert len(sent(tmp_path)) == 2 and sender.current is not None
        wait, blocked = sender.step()
        assert blocked and wait <= 5.0 and sender.current is not None  # kept for more files
        sender.clock.advance(10.5)
        sender.step()
        assert sender.current is None  # released once idle for idle_release
        put_in_outbox(spool_of(tmp_path), EP, make_files(tmp_path / "more", 1))
        sender.step()
        assert len(sent(tmp_path)) == 3 and server.associations == 2
    finally:
        sender.close()


@pytest.mark.parametrize("status,outcome", [
    (0x0000, "delivered"), (0xB000, "delivered"), (0xB006, "delivered"), (0xB007, "delivered"),
    (0xA700, "transient"), (0xA7FF, "transient"), (0xA900, "permanent"), (0xC000, "permanent"),
    (0xCFFF, "permanent"), (0x0122, "permanent"), (0x0211, "permanent"), (0xFE00, "permanent"),
])
def test_status_classification(status: int, outcome: str) -> None:
    from pipeline.statuses import classify, describe

    assert classify(status).value == outcome
    assert describe(status).startswith(f"0x{status:04X} (")


# -- the SCU boundary's own types (pipeline/dicom/scu.py) --------------------------------

class _FakeAssoc:
    """Just enough of an association for :meth:`net.Link.store`."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome
        self.dimse_timeout = None

    def send_c_store(self, _source):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _link(tmp_path: Path, outcome) -> net.Link:
    conf = endpoint_conf(tmp_path, {EP: {"port": 11112, "ae_title": "PACS"}})
    return net.Link(load(conf).endpoints[EP], _FakeAssoc(outcome), 1)  # type: ignore[arg-type]


def test_store_maps_the_library_exceptions_to_ours(tmp_path: Path) -> None:
    from pipeline.errors import EndpointTrouble, PermanentError

    with pytest.raises(EndpointTrouble, match="was lost"):
        _link(tmp_path, RuntimeError("must be established")).store(tmp_path / "x.dcm", 5.0)
    with pytest.raises(PermanentError, match="ValueError"):
        _link(tmp_path, ValueError("no context")).store(tmp_path / "x.dcm", 5.0)
    with pytest.raises(FileNotFoundError):
        _link(tmp_path, FileNotFoundError("gone")).store(tmp_path / "x.dcm", 5.0)


def test_store_returns_status_and_comment(tmp_path: Path) -> None:
    from pydicom import Dataset

    rsp = Dataset()
    rsp.Status = 0xC000
    rsp.ErrorComment = "no room"
    link = _link(tmp_path, rsp)
    assert link.store(tmp_path / "x.dcm", 7.0) == net.StoreOutcome(0xC000, "no room")
    assert link._assoc.dimse_timeout == 7.0
    assert _link(tmp_path, Dataset()).store(tmp_path / "x.dcm", 5.0) == net.StoreOutcome(None)


def test_associate_to_a_closed_port_is_an_association_failure(tmp_path: Path) -> None:
    from tests.helpers import free_port

    conf = endpoint_conf(tmp_path, {EP: {"port": free_port(), "ae_title": "PACS"}})
    ep = load(conf).endpoints[EP]
    result = net.associate(ep, "DICOMFLOW", [("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")], False)
    assert isinstance(result, net.AssociationFailure) and "refused" in result.reason
    outcome = net.echo(ep, "DICOMFLOW")
    assert outcome.failure is not None and "refused" in outcome.failure and outcome.status is None
