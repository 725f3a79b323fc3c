"""The sender's outcome handling and its own bookkeeping (issue 10, defects 2, 3, 11, 13),
against real pynetdicom peers on loopback and real filesystems (a tmpfs mounted by the
test for a cross-device ``sent/`` and for a full disk).

* 2 — an OSError after the destination's success (``sent/`` on another filesystem,
  ENOSPC saving the retry count or writing the ``.error``) never crashes the sender and
  never makes it send a delivered file again; ``max_attempts`` still ends the retries.
* 3 — no single file stops a sender (a 69-character Transfer Syntax UID in the file meta).
* 11 — every warning status (0x0001, 0x0107, 0x0116, any 0xBxxx) means stored.
* 13 — out of resources (0xA7xx) makes the endpoint *busy*: no file is charged unless
  other files were stored since its last refusal; the queue drains when it clears.
  ``max_age``, counted from a file's first 0xA7xx (kept across restarts), still sends a
  file refused for ever to ``failed/`` (Orthanc's 0xA700 for an instance it cannot index).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset as write_body
from pydicom.filewriter import write_file_meta_info
from pynetdicom import evt

from pipeline.clock import FakeClock
from pipeline.config import load
from pipeline.errors import SpoolError
from pipeline.log import logger
from pipeline.sender_state import RetryBook, iso_utc
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from pipeline.statuses import Outcome, classify
from services.send import Sender
from tests.helpers import IN_CI, Daemon, dicom_files, make_dataset, make_files, run_cli, wait_for
from tests.reliability import free_bytes, tmpfs
from tests.sendkit import StatusSCP, endpoint_conf, put_in_outbox, read_retry, read_state

EP = "pacs"
A700 = 0xA700


class RuleSCP(StatusSCP):
    """A pynetdicom Storage SCP answering ``rule(SOP Instance UID)``; records every answer."""

    def __init__(self, rule: Callable[[str], int] = lambda uid: 0x0000, **kwargs) -> None:
        super().__init__(ae_title="PACS", **kwargs)
        self.rule = rule
        self.answers: list[tuple[str, int]] = []

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.dataset.SOPInstanceUID)
        with self.lock:
            status = self.rule(uid)
            self.received.append((uid, str(event.context.transfer_syntax)))
            self.answers.append((uid, status))
            return status

    def stored(self) -> list[str]:
        with self.lock:
            return [uid for uid, status in self.answers if classify(status) is Outcome.DELIVERED]

    def count(self, uid: str) -> int:
        with self.lock:
            return sum(1 for u, _ in self.answers if u == uid)


@pytest.fixture
def peer():
    servers: list[RuleSCP] = []

    def start(rule: Callable[[str], int] = lambda uid: 0x0000, **kwargs) -> RuleSCP:
        server = RuleSCP(rule, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def log_lines():
    """Every log line the in-process sender writes (level and message)."""
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="DEBUG",
                         format="{level} {message}\n{exception}", backtrace=False, diagnose=False)
    yield lines
    logger.remove(handler)


def conf_for(tmp_path: Path, port: int, spool: Path | None = None, **endpoint) -> Path:
    router = {"spool": str(spool)} if spool else {}
    return endpoint_conf(tmp_path, {EP: {"port": port, "ae_title": "PACS", **endpoint}}, **router)


def sender_for(conf: Path, clock=None) -> Sender:
    return Sender(load(conf), EP, clock=clock or FakeClock(), install_signals=False)


def drive(sender: Sender, until: Callable[[], bool], steps: int = 200,
          between: Callable[[], None] | None = None) -> None:
    """Run the loop of a started sender on its fake clock until ``until()``."""
    for _ in range(steps):
        if until():
            return
        wait, _blocked = sender.step()
        if between is not None:
            between()
        if wait is not None:
            sender.clock.wait(sender.watcher, wait)
    assert until(), "the condition was not reached"


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def stage(spool: Path, name: str) -> list[Path]:
    return dicom_files(spool / name / EP)


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("ERROR")]


def no_traceback(lines: list[str]) -> None:
    assert not [line for line in lines if "Traceback" in line], "\n".join(lines)


# -- defect 2: sent/ on another filesystem -------------------------------------------------------

def test_defect02_cross_device_sent_keeps_the_file_and_never_resends_it(
        tmp_path: Path, peer, log_lines) -> None:
    server = peer()
    spool = tmp_path / "spool"
    files = put_in_outbox(spool, EP, make_files(tmp_path / "src", 3))
    uids = [uid_of(p) for p in files]
    sender = sender_for(conf_for(tmp_path, server.port))
    sender.start()
    try:
        with tmpfs(spool / "sent" / EP, 4):  # appears while the sender runs: EXDEV on the move
            drive(sender, lambda: len(server.answers) >= 1)
            for _ in range(20):  # the move is retried with backoff; nothing more is sent
                wait, _ = sender.step()
                sender.clock.wait(sender.watcher, wait or 0)
            assert len(server.answers) == 1, "a delivered file was sent again"
            first = files[0]
            assert first.exists(), "the delivered file left its safe stage"
            assert first.name in read_retry_delivered(spool)
            state = read_state(spool, EP)
            assert "cannot move it to sent/pacs" in state["last_error"]
            moves = [line for line in errors(log_lines) if "cannot move it to sent" in line]
            assert len(moves) == 1, log_lines
        # the mount is gone: the pending move succeeds, the rest is delivered
        drive(sender, lambda: len(stage(spool, "sent")) == 3)
    finally:
        sender.close()
    assert sorted(server.stored()) == sorted(uids)  # each exactly once
    assert len(server.answers) == 3
    assert read_retry(spool, EP) == {} and read_retry_delivered(spool) == {}
    no_traceback(log_lines)


def read_retry_delivered(spool: Path) -> dict:
    try:
        return json.loads((spool / "run" / f"retry-{EP}.json").read_text()).get("delivered", {})
    except FileNotFoundError:
        return {}


def test_defect02_restart_refuses_a_cross_device_sent_then_moves_without_resending(
        tmp_path: Path, peer, log_lines) -> None:
    server = peer()
    spool = tmp_path / "spool"
    files = put_in_outbox(spool, EP, make_files(tmp_path / "src", 2))
    uids = [uid_of(p) for p in files]
    conf = conf_for(tmp_path, server.port)
    sender = sender_for(conf)
    sender.start()
    with tmpfs(spool / "sent" / EP, 4):
        try:
            drive(sender, lambda: len(server.answers) >= 1)
            sender.step()
        finally:
            sender.close()
        assert files[0].name in read_retry_delivered(spool)
        # A restart with sent/ still on another filesystem is a configuration error …
        with pytest.raises(SpoolError, match="another filesystem"):
            sender_for(conf).start()
        result = run_cli(conf, "send", EP)
        assert result.returncode == 1 and "another filesystem" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # … and once it is fixed, the recorded file is moved, not sent again.
    sender_for(conf).run(once=True)
    assert [p.name for p in stage(spool, "sent")] == [p.name for p in files]
    assert server.count(uids[0]) == 1 and server.count(uids[1]) == 1
    assert read_retry_delivered(spool) == {}
    assert any("delivered before the restart" in line for line in log_lines)
    no_traceback(log_lines)


def test_defect02_sibling_every_daemon_refuses_a_stage_bind_mounted_from_the_same_filesystem(
        tmp_path: Path) -> None:
    """A bind mount keeps ``st_dev`` but rename across it still fails with EXDEV: the
    start-up check reads the mount table, and it guards receive and filter too."""
    spool = Spool(tmp_path / "spool").create([EP])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = spool.root / "accepted"
    result = subprocess.run(["mount", "--bind", str(elsewhere), str(target)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        message = f"cannot bind-mount (root needed): {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        with pytest.raises(SpoolError, match="accepted is another filesystem"):
            Spool(spool.root).create([EP])
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
    Spool(spool.root).create([EP])  # one filesystem again: accepted


# -- defect 2: a full disk ------------------------------------------------------------------

def fill(mount: Path) -> Path:
    """Take every free byte of the tmpfs."""
    path = mount / "ballast"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = free_bytes(mount)
        while size > 0:
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, size)
            except OSError:
                size //= 2
                continue
            size = free_bytes(mount)
    finally:
        os.close(fd)
    return path


def test_defect02_full_disk_retry_count_and_error_sidecar_never_crash_and_max_attempts_ends(
        tmp_path: Path, peer, log_lines) -> None:
    with tmpfs(tmp_path / "mnt", 16) as mount:
        spool = mount / "spool"
        src = make_files(tmp_path / "src", 4)
        poison = uid_of(src[0])
        server = peer(lambda uid: A700 if uid == poison else 0x0000)
        conf = conf_for(tmp_path, server.port, spool=spool,
                        retry={"max_attempts": "2", "backoff": "1s"})
        [bad] = put_in_outbox(spool, EP, src[:1])
        # newcomers wait on the same filesystem, so that they can arrive on a full disk
        holding = spool / "holding"
        holding.mkdir()
        arrivals = []
        for path in put_in_outbox(spool, EP, src[1:]):
            os.rename(path, holding / path.name)
            arrivals.append(holding / path.name)
        sender = sender_for(conf)
        sender.start()
        ballast = fill(mount)
        try:
            def arrive() -> None:  # one new image whenever the queue runs dry (the poison aside)
                waiting = [p for p in stage(spool, "outbox") if p.name != bad.name]
                if not waiting and arrivals:
                    os.rename(arrivals.pop(0), spool / "outbox" / EP / str(SpoolName.new(None)))

            drive(sender, lambda: bad.name in sender.pending, steps=400, between=arrive)
            sent_so_far = server.count(poison)
            for _ in range(30):  # disk still full: the poison is never sent again
                wait, _ = sender.step()
                arrive()
                sender.clock.wait(sender.watcher, wait or 0)
            assert server.count(poison) == sent_so_far
            assert bad.exists() and stage(spool, "failed") == []
            ballast.unlink()
            drive(sender, lambda: len(stage(spool, "failed")) == 1, between=arrive)
        finally:
            sender.close()
        [failed] = stage(spool, "failed")
        assert failed.name == bad.name
        text = (failed.parent / (failed.name + ".error")).read_text()
        assert "attempts: 2" in text and "gave up after 2 attempts" in text
        assert "0xA700" in text
        # uncharged first refusals aside, exactly max_attempts charged ones, none after
        assert sent_so_far == server.count(poison) <= 4
        assert len(stage(spool, "sent")) == len(server.stored())
        saves = [line for line in log_lines if "cannot save the retry state" in line]
        assert len(saves) == 1, log_lines
        moves = [line for line in log_lines if "cannot move it to failed/pacs" in line
                 and not line.startswith("DEBUG")]
        assert len(moves) == 1, log_lines
        assert len(errors(log_lines)) == 1, log_lines  # one line for the event, not one per retry
        no_traceback(log_lines)


# -- defect 3: one file never stops a sender ------------------------------------------------------

LONG_TS = "1.2.840.10008.1.2.1" + ".1" * 25   # 69 characters


def write_with_transfer_syntax(path: Path, transfer_syntax: str, sop_class: str | None = None) -> Path:
    """An Explicit VR LE file whose file meta names ``transfer_syntax`` (pydicom refuses to
    write an unknown one, so the file meta is written on its own)."""
    ds = make_dataset()
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_body(body, ds)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if sop_class is not None:
        ds.file_meta.MediaStorageSOPClassUID = sop_class
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue() + body.getvalue())
    return path


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_defect03_a_69_character_transfer_syntax_uid_fails_alone(
        tmp_path: Path, peer, fastpath: str) -> None:
    server = peer()
    spool = tmp_path / "spool"
    bad = write_with_transfer_syntax(tmp_path / "src" / "bad.dcm", LONG_TS)
    [queued_bad] = put_in_outbox(spool, EP, [bad])
    good = put_in_outbox(spool, EP, make_files(tmp_path / "good", 3))
    conf = conf_for(tmp_path, server.port)
    sender = Daemon(conf, "send", EP, env={"DICOMFLOW_FASTPATH": fastpath}).start()
    try:
        wait_for(lambda: len(stage(spool, "sent")) == 3 and len(stage(spool, "failed")) == 1,
                 message="good files delivered, the bad one in failed/")
        assert sender.alive(), sender.log()
    finally:
        code = sender.stop()
    assert code == 0, sender.log()
    [failed] = stage(spool, "failed")
    assert failed.name == queued_bad.name
    text = (failed.parent / (failed.name + ".error")).read_text()
    assert "Transfer Syntax UID" in text and "not a valid UID" in text and "69 characters" in text
    assert sorted(server.stored()) == sorted(uid_of(p) for p in stage(spool, "sent"))
    assert {p.name for p in stage(spool, "sent")} == {p.name for p in good}
    assert "Traceback" not in sender.log()


def test_defect03_sibling_a_sop_class_uid_that_is_not_a_uid_fails_alone(tmp_path: Path, peer) -> None:
    """pynetdicom checks only the length: letters in the SOP Class UID would go into the
    association request of the whole batch."""
    server = peer()
    spool = tmp_path / "spool"
    bad = write_with_transfer_syntax(tmp_path / "src" / "bad.dcm", "1.2.840.10008.1.2.1",
                                     sop_class="1.2.840.10008.5.1.4.1.1.2a")
    [queued_bad] = put_in_outbox(spool, EP, [bad])
    put_in_outbox(spool, EP, make_files(tmp_path / "good", 2))
    sender_for(conf_for(tmp_path, server.port)).run(once=True)
    [failed] = stage(spool, "failed")
    assert failed.name == queued_bad.name
    text = (failed.parent / (failed.name + ".error")).read_text()
    assert "SOP Class UID" in text and "not a valid UID" in text
    assert len(stage(spool, "sent")) == 2 and server.associations == 1


def test_defect03_sibling_an_unexpected_error_while_preparing_a_file_fails_it_alone(
        tmp_path: Path, peer, monkeypatch, log_lines) -> None:
    """The transcoding branch ran outside the per-file guard: any exception there (here a
    MemoryError decoding a JPEG) stopped the sender."""
    import pipeline.sending.delivery as send_module

    server = peer()  # takes Explicit and Implicit VR LE: the JPEG file must be transcoded
    spool = tmp_path / "spool"
    [jpeg] = put_in_outbox(spool, EP, [Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))])
    put_in_outbox(spool, EP, make_files(tmp_path / "good", 2))

    def exploding(*_args, **_kwargs):
        raise MemoryError("cannot allocate the decoded frames")

    monkeypatch.setattr(send_module, "load_uncompressed", exploding)
    sender_for(conf_for(tmp_path, server.port)).run(once=True)
    [failed] = stage(spool, "failed")
    assert failed.name == jpeg.name
    assert "MemoryError" in (failed.parent / (failed.name + ".error")).read_text()
    assert len(stage(spool, "sent")) == 2
    no_traceback(log_lines)


# -- defect 11: every warning means stored ------------------------------------------------------

WARNINGS = [0x0001, 0x0107, 0x0116, 0xB000, 0xB001, 0xB006, 0xB007, 0xB00F, 0xB123, 0xBFFF]


def test_defect11_classify_every_warning_as_delivered() -> None:
    for status in [0x0001, 0x0107, 0x0116, *range(0xB000, 0xC000)]:
        assert classify(status) is Outcome.DELIVERED, hex(status)
    for status in (0xA700, 0xA7FF, 0x0213):
        assert classify(status) is Outcome.TRANSIENT
    for status in (0xA900, 0xC000, 0x0110, 0x0122, 0xAFFF, 0xFE00, 0x0002):
        assert classify(status) is Outcome.PERMANENT


@pytest.mark.parametrize("status", WARNINGS, ids=[f"0x{s:04X}" for s in WARNINGS])
def test_defect11_every_warning_status_is_delivered_once(tmp_path: Path, peer, status: int) -> None:
    server = peer(lambda uid: status)
    spool = tmp_path / "spool"
    files = put_in_outbox(spool, EP, make_files(tmp_path / "src", 2))
    sender_for(conf_for(tmp_path, server.port)).run(once=True)
    assert [p.name for p in stage(spool, "sent")] == [p.name for p in files]
    assert stage(spool, "failed") == []
    assert len(server.answers) == 2  # stored: never sent again
    state = read_state(spool, EP)
    assert state["sent"] == 2 and state["failed"] == 0


# -- defect 13: out of resources is the endpoint's condition ----------------------------------

def test_defect13_a_busy_destination_charges_no_file_and_the_queue_drains(
        tmp_path: Path, peer, log_lines) -> None:
    busy = threading.Event()
    busy.set()
    server = peer(lambda uid: A700 if busy.is_set() else 0x0000)
    spool = tmp_path / "spool"
    files = put_in_outbox(spool, EP, make_files(tmp_path / "src", 5))
    uids = [uid_of(p) for p in files]
    conf = conf_for(tmp_path, server.port, retry={"max_attempts": "2", "backoff": "1s"})
    sender = sender_for(conf)
    sender.start()
    try:
        # "40 minutes" of refusals on the fake clock
        drive(sender, lambda: sender.clock.monotonic() > 1000 + 2400, steps=5000)
        assert len(server.answers) >= 400, "the busy endpoint was not probed"
        assert stage(spool, "failed") == [] and len(stage(spool, "outbox")) == 5
        assert read_retry(spool, EP) == {}
        assert all(sender.retry.attempts(p.name) == 0 for p in files)
        assert read_state(spool, EP)["state"] == "busy"
        tried = {uid for uid, _ in server.answers}
        assert tried == set(uids), "probes do not rotate through the queue"
        assert max(sender.clock.waits) <= 5.0  # probe_backoff_cap, not the file backoff
        busy.clear()
        drive(sender, lambda: len(stage(spool, "sent")) == 5)
    finally:
        sender.close()
    assert stage(spool, "failed") == [] and stage(spool, "outbox") == []
    assert sorted(server.stored()) == sorted(uids)
    said = [line for line in log_lines if not line.startswith("DEBUG")]
    assert len([line for line in said if "endpoint busy" in line]) == 1, said  # not one per probe
    assert len([line for line in said if "no longer busy" in line]) == 1, said


def test_defect13_a_file_is_charged_only_when_others_were_stored_meanwhile(
        tmp_path: Path, peer) -> None:
    src = make_files(tmp_path / "src", 12)
    poison = uid_of(src[0])
    server = peer(lambda uid: 0xA702 if uid == poison else 0x0000)
    spool = tmp_path / "spool"
    [bad] = put_in_outbox(spool, EP, src[:1])
    later = list(src[1:])
    conf = conf_for(tmp_path, server.port, retry={"max_attempts": "3", "backoff": "1s"})
    sender = sender_for(conf)
    sender.start()
    charges: list[tuple[int, int]] = []   # (attempts, files stored before)
    refusals = [0]

    def arrive() -> None:  # a new image after each refusal of the poison: inflow goes on
        attempts = sender.retry.attempts(bad.name)
        if attempts and (not charges or charges[-1][0] != attempts):
            charges.append((attempts, len(server.stored())))
        if server.count(poison) > refusals[0] and later:
            refusals[0] = server.count(poison)
            put_in_outbox(spool, EP, [later.pop(0)])

    try:
        drive(sender, lambda: len(stage(spool, "failed")) == 1, steps=1000, between=arrive)
    finally:
        sender.close()
    assert [a for a, _ in charges] == [1, 2]   # the third charge sent it to failed/
    stored_at = [n for _, n in charges]
    assert stored_at[0] >= 1 and stored_at[1] > stored_at[0], charges
    [failed] = stage(spool, "failed")
    text = (failed.parent / (failed.name + ".error")).read_text()
    assert "0xA702" in text and "attempts: 3" in text and "other files were stored" in text
    assert len(stage(spool, "sent")) == len(server.stored())


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_defect13_busy_for_a_while_then_ok_delivers_everything_status_shows_busy(
        tmp_path: Path, peer, fastpath: str) -> None:
    busy = threading.Event()
    busy.set()
    server = peer(lambda uid: 0xA700 if busy.is_set() else 0x0000)
    spool = tmp_path / "spool"
    uids = [uid_of(p) for p in put_in_outbox(spool, EP, make_files(tmp_path / "src", 10))]
    # the old code charged each refusal: with these settings all ten went to failed/ in seconds
    conf = conf_for(tmp_path, server.port, retry={
        "max_attempts": "2", "backoff": "0.1s", "backoff_cap": "0.2s",
        "probe_backoff": "0.1s", "probe_backoff_cap": "0.3s"})
    sender = Daemon(conf, "send", EP, env={"DICOMFLOW_FASTPATH": fastpath}).start()
    try:
        def shows_busy() -> bool:
            result = run_cli(conf, "status", "--json")
            return json.loads(result.stdout)["endpoints"][EP]["state"] == "busy"

        wait_for(shows_busy, message="status --json shows busy")
        wait_for(lambda: len(server.answers) >= 15, message="several busy probes")
        assert read_retry(spool, EP) == {}, "a file was charged while nothing was stored"
        assert stage(spool, "failed") == [] and len(stage(spool, "outbox")) == 10
        shown = run_cli(conf, "status")
        text = shown.stdout
        assert "busy since" in text, text
        assert shown.returncode == 4, shown.stderr  # the sender runs, receive and filter do not
        busy.clear()
        wait_for(lambda: len(stage(spool, "sent")) == 10, message="all ten delivered")
        assert sender.alive(), sender.log()
    finally:
        code = sender.stop()
    assert code == 0, sender.log()
    assert stage(spool, "failed") == []
    assert sorted(server.stored()) == sorted(uids)
    assert "Traceback" not in sender.log()


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_busy_probes_go_on_a_fresh_association(tmp_path: Path, peer, fastpath: str) -> None:
    """A destination refusing 0xA700 on one association while a new one would be served
    (a restarted storescp's lingering child, a PACS node being drained): the next probe
    opens a fresh association, so the queue goes out without waiting for the old one to
    be released as idle (which busy probes every few seconds would never let happen)."""
    holder: list[RuleSCP] = []
    server = peer(lambda uid: A700 if holder[0].associations <= 1 else 0x0000)
    holder.append(server)
    spool = tmp_path / "spool"
    uids = [uid_of(p) for p in put_in_outbox(spool, EP, make_files(tmp_path / "src", 5))]
    conf = conf_for(tmp_path, server.port, idle_release="600s", retry={
        "probe_backoff": "0.2s", "probe_backoff_cap": "0.5s"})
    sender = Daemon(conf, "send", EP, env={"DICOMFLOW_FASTPATH": fastpath}).start()
    try:
        wait_for(lambda: len(stage(spool, "sent")) == 5, message="all five delivered")
    finally:
        code = sender.stop()
    assert code == 0, sender.log()
    assert server.associations >= 2
    assert sorted(server.stored()) == sorted(uids)
    assert read_retry(spool, EP) == {} and stage(spool, "failed") == []


# -- a 0xA7xx that only looks busy: max_age bounds it (interop: Orthanc's 0xA700) ----------

MAX_AGE = 600.0  # "10m"


def refused_since(spool: Path) -> dict:
    try:
        return json.loads((spool / "run" / f"retry-{EP}.json").read_text()).get("refused_since", {})
    except FileNotFoundError:
        return {}


def error_of(path: Path) -> str:
    return (path.parent / (path.name + ".error")).read_text()


def test_busy_sibling_a_file_always_refused_alone_fails_after_max_age_not_before(
        tmp_path: Path, peer) -> None:
    server = peer(lambda uid: A700)
    spool = tmp_path / "spool"
    [lone] = put_in_outbox(spool, EP, make_files(tmp_path / "src", 1))
    sender = sender_for(conf_for(tmp_path, server.port, retry={"max_age": "10m"}))
    sender.start()
    clock = sender.clock
    try:
        drive(sender, lambda: len(server.answers) >= 1)
        first = clock.time()
        assert refused_since(spool) == {lone.name: first}  # saved at the first refusal
        drive(sender, lambda: clock.time() >= first + MAX_AGE - 1, steps=5000)
        assert len(server.answers) > 100, "the busy endpoint was not probed"
        assert stage(spool, "failed") == [] and len(stage(spool, "outbox")) == 1
        assert read_retry(spool, EP) == {}, "a busy refusal was charged"
        drive(sender, lambda: len(stage(spool, "failed")) == 1, steps=100)
    finally:
        sender.close()
    assert clock.time() >= first + MAX_AGE
    assert stage(spool, "outbox") == [] and stage(spool, "sent") == []
    [gone] = stage(spool, "failed")
    text = error_of(gone)
    for expected in ("0xA700", "refused with 0xA7xx (out of resources) since "
                     f"{iso_utc(first)}", "max_age=600s", "refusing only this file",
                     "endpoint: pacs"):
        assert expected in text, text
    assert refused_since(spool) == {}  # dropped with the file
    assert read_state(spool, EP)["failed"] == 1


def test_busy_sibling_the_first_refusal_time_survives_a_restart(tmp_path: Path, peer) -> None:
    server = peer(lambda uid: A700)
    spool = tmp_path / "spool"
    [lone] = put_in_outbox(spool, EP, make_files(tmp_path / "src", 1))
    conf = conf_for(tmp_path, server.port, retry={"max_age": "10m"})
    before = sender_for(conf)
    before.start()
    try:
        drive(before, lambda: len(server.answers) >= 1)
        first = before.clock.time()
        drive(before, lambda: before.clock.time() >= first + 400, steps=5000)
    finally:
        before.close()
    assert stage(spool, "failed") == [] and refused_since(spool) == {lone.name: first}
    clock = FakeClock(wall=before.clock.time())
    after = sender_for(conf, clock=clock)
    after.start()
    assert after.retry.refused_since == {lone.name: first}  # loaded from run/
    restarted = clock.time()
    try:
        drive(after, lambda: len(stage(spool, "failed")) == 1, steps=5000)
    finally:
        after.close()
    # failed max_age after the first refusal before the restart, not max_age after it
    assert first + MAX_AGE <= clock.time() < restarted + MAX_AGE - 100
    assert f"since {iso_utc(first)}" in error_of(stage(spool, "failed")[0])


def test_busy_sibling_a_file_failed_by_max_age_does_not_stop_the_next(tmp_path: Path, peer) -> None:
    """A destination really full for longer than max_age: the file refused longest ago
    fails, the next one is tried in the same turn, refused, and makes the endpoint busy
    again — each file gets its own max_age."""
    server = peer(lambda uid: A700)
    spool = tmp_path / "spool"
    src = make_files(tmp_path / "src", 2)
    [early] = put_in_outbox(spool, EP, src[:1])
    sender = sender_for(conf_for(tmp_path, server.port, retry={"max_age": "10m"}))
    sender.start()
    clock = sender.clock
    turns: list[tuple[int, int]] = []   # (files failed, answers) after each turn

    def watch() -> None:
        turns.append((len(stage(spool, "failed")), len(server.answers)))

    try:
        drive(sender, lambda: len(server.answers) >= 1)
        first = clock.time()
        drive(sender, lambda: clock.time() >= first + 60, steps=1000)
        [late] = put_in_outbox(spool, EP, src[1:])
        drive(sender, lambda: late.name in refused_since(spool), steps=100)
        drive(sender, lambda: len(stage(spool, "failed")) >= 1, steps=5000, between=watch)
        assert [p.name for p in stage(spool, "failed")] == [early.name]
        assert turns[-1][1] - turns[-2][1] == 2, "the next file was not tried in the same turn"
        assert sender.busy_since is not None and stage(spool, "outbox") == [late]
        failed_at = clock.time()
        drive(sender, lambda: len(stage(spool, "failed")) == 2, steps=1000)
        assert clock.time() - failed_at >= 50  # its own max_age, from its own first refusal
    finally:
        sender.close()
    assert read_retry(spool, EP) == {} and refused_since(spool) == {}
    for path in stage(spool, "failed"):
        assert "refused with 0xA7xx (out of resources) since" in error_of(path)


def test_busy_sibling_the_retry_book_keeps_first_refusals_and_reads_old_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").create([EP])
    old = {"endpoint": EP, "files": {"a.dcm": {"attempts": 2, "first_failure": 5.0,
                                               "last_error": "x"}}}
    (spool.run_dir / f"retry-{EP}.json").write_text(json.dumps(old))  # before refused_since
    clock = FakeClock()
    book = RetryBook(spool, EP, clock).load()
    assert book.attempts("a.dcm") == 2 and book.refused_since == {}
    first = book.refused_at("b.dcm")
    clock.advance(30)
    assert book.refused_at("b.dcm") == first == 1_800_000_000.0  # the first one counts
    book.refused_at("c.dcm")
    assert RetryBook(spool, EP).load().refused_since == {"b.dcm": first, "c.dcm": first + 30}
    book.forget("b.dcm")
    book.keep_only({"a.dcm"})
    again = RetryBook(spool, EP).load()
    assert again.refused_since == {} and again.attempts("a.dcm") == 2


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_busy_sibling_the_only_queued_file_always_refused_reaches_failed(
        tmp_path: Path, peer, fastpath: str) -> None:
    server = peer(lambda uid: A700)
    spool = tmp_path / "spool"
    put_in_outbox(spool, EP, make_files(tmp_path / "src", 1))
    conf = conf_for(tmp_path, server.port, retry={
        "max_age": "2s", "probe_backoff": "0.1s", "probe_backoff_cap": "0.3s"})
    sender = Daemon(conf, "send", EP, env={"DICOMFLOW_FASTPATH": fastpath}).start()
    try:
        wait_for(lambda: len(stage(spool, "failed")) == 1, message="the refused file in failed/")
        assert sender.alive(), sender.log()
    finally:
        code = sender.stop()
    assert code == 0, sender.log()
    assert stage(spool, "outbox") == [] and stage(spool, "sent") == []
    assert len(server.answers) >= 2 and {status for _, status in server.answers} == {A700}
    text = error_of(stage(spool, "failed")[0])
    assert "0xA700" in text and "max_age=2s" in text and "refusing only this file" in text, text
    assert "Traceback" not in sender.log()


def test_busy_endpoint_state_is_rendered() -> None:
    from services.status import describe_state

    assert describe_state({"state": "busy", "since": "2026-12-01T10:00:00Z"}) == \
        "busy since 2026-12-01T10:00:00Z (queue kept)"
