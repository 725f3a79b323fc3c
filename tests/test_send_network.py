"""The sender against destinations that misbehave on the network (issue 10): one that
stops reading in the middle of a transfer (defect 1), and fragile ones that die of a
bare TCP probe (defect 20). Real peers in real processes; every test runs with the
fast path on and off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    HANG_TIMEOUT,
    Daemon,
    dicom_files,
    free_port,
    make_dataset,
    make_files,
    run_cli,
    wait_for,
    wait_port,
    write_dataset,
)
from tests.peers import SimpleStorage, StoreSCP, terminate
from tests.sendkit import endpoint_conf, put_in_outbox, read_retry, read_state

FASTPATH = [pytest.param("1", id="fastpath"), pytest.param("0", id="no-fastpath")]
BIG_SIDE = 4096  # 4096 × 4096 × 2 bytes: 32 MiB, far beyond the loopback socket buffers


def count(directory: Path) -> int:
    return len(dicom_files(directory))


def _stalled_sender(tmp_path: Path, cleanup: list, fastpath: str, dimse_timeout: str,
                    side: int = BIG_SIDE):
    """A DCMTK storescp with a live association from the sender, then SIGSTOPped, and a
    32 MiB file in the outbox: the sender is left writing to a peer that reads nothing
    (with a small ``side``, the file fits the socket buffers: the peer never answers)."""
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {"pacs": {
        "port": peer.port, "ae_title": "PACS", "dimse_timeout": dimse_timeout,
        "acse_timeout": "3s", "idle_release": "10m",
        "retry": {"probe_backoff": "0.5s", "probe_backoff_cap": "2s"}}})
    spool = tmp_path / "spool"
    small = write_dataset(make_dataset(), tmp_path / "src" / "small.dcm")
    put_in_outbox(spool, "pacs", [small])
    sender = Daemon(conf, "send", "pacs", env={"DICOMFLOW_FASTPATH": fastpath}).start()
    cleanup.append(sender)
    wait_for(lambda: count(spool / "sent/pacs") == 1, message="the first file delivered")
    os.kill(peer.proc.pid, signal.SIGSTOP)
    cleanup.append(_Resume(peer.proc.pid))
    big = write_dataset(make_dataset(rows=side, cols=side), tmp_path / "src" / "big.dcm")
    put_in_outbox(spool, "pacs", [big])
    wait_for(lambda: read_state(spool, "pacs").get("state") == "delivering", message="delivering")
    return peer, sender, spool


class _Resume:
    """Teardown: never leave a stopped peer behind."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("fastpath", FASTPATH)
def test_defect01_destination_that_stops_reading_is_marked_down_and_retried(
        tmp_path: Path, cleanup, fastpath: str) -> None:
    peer, sender, spool = _stalled_sender(tmp_path, cleanup, fastpath, dimse_timeout="3s")
    sender.wait_log("destination stopped reading", timeout=HANG_TIMEOUT)
    wait_for(lambda: read_state(spool, "pacs").get("state") == "down", message="state down")
    assert "stopped reading" in read_state(spool, "pacs")["last_error"]
    assert count(spool / "outbox/pacs") == 1 and count(spool / "failed/pacs") == 0
    assert sender.alive()
    os.kill(peer.proc.pid, signal.SIGCONT)
    wait_for(lambda: count(spool / "sent/pacs") == 2, message="the big file delivered after SIGCONT")
    assert count(spool / "failed/pacs") == 0 and read_retry(spool, "pacs") == {}
    assert "Traceback" not in sender.log()
    assert sender.stop() == 0


@pytest.mark.parametrize("fastpath", FASTPATH)
def test_defect01_sigterm_exits_while_a_send_is_blocked(tmp_path: Path, cleanup, fastpath: str) -> None:
    # dimse_timeout far beyond the stop bound: only the shutdown path may end the send
    peer, sender, spool = _stalled_sender(tmp_path, cleanup, fastpath, dimse_timeout="10m")
    time.sleep(1.0)  # let the socket buffers fill (not what is tested)
    assert sender.stop(timeout=30) == 0  # supervisord's stopwaitsecs is 300
    assert count(spool / "outbox/pacs") == 1 and count(spool / "failed/pacs") == 0
    assert read_state(spool, "pacs").get("state") == "stopped"
    os.kill(peer.proc.pid, signal.SIGCONT)
    restarted = Daemon(sender.conf, "send", "pacs", env={"DICOMFLOW_FASTPATH": fastpath},
                       log_name="send-pacs-2").start()
    cleanup.append(restarted)
    wait_for(lambda: count(spool / "sent/pacs") == 2, message="the big file delivered after restart")
    assert restarted.stop() == 0


@pytest.mark.parametrize("fastpath", FASTPATH)
def test_defect01_sigterm_exits_while_the_destination_keeps_quiet(tmp_path: Path, cleanup,
                                                                  fastpath: str) -> None:
    # the file is sent whole, the destination never answers, dimse_timeout is 10m: the
    # stop waits for the answer only a bounded time, then cuts (the file stays queued)
    peer, sender, spool = _stalled_sender(tmp_path, cleanup, fastpath, dimse_timeout="10m", side=64)
    # "delivering" is set before the C-STORE starts: wait until its bytes reach the peer
    wait_for(lambda: _bytes_waiting_at(peer.port), message="the file's bytes at the stopped peer")
    assert sender.stop(timeout=HANG_TIMEOUT) == 0
    assert count(spool / "outbox/pacs") == 1 and count(spool / "failed/pacs") == 0
    assert "transfer cut, the file stays in the outbox" in sender.log()


def _bytes_waiting_at(port: int) -> bool:
    """Has data arrived, unread, on an established connection to local ``port``
    (the receive queue of /proc/net/tcp)?"""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if int(local.split(":")[1], 16) == port and state == "01" and int(queues.split(":")[1], 16):
            return True
    return False


TRANSFER_SCRIPT = r"""
import os, signal, sys, time
from pathlib import Path
import pipeline.config as pc
from pipeline.dicom import patches, scu as net
from pydicom.uid import ExplicitVRLittleEndian
patches.install("send")  # what the send daemon's main installs (DICOMFLOW_FASTPATH decides)
conf, pid, path = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
ep = pc.load(conf).endpoints["pacs"]
link = net.associate(ep, "DICOMFLOW", [("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)], False)
assert link.established
os.kill(pid, signal.SIGSTOP)
outcome = link.store(path, 3)  # what Sender sets: dimse_timeout + size / min_transfer_rate
print("RESULT", outcome.status, link.stall_reason, flush=True)
"""


@pytest.mark.parametrize("fastpath", FASTPATH)
def test_defect01_a_transfer_is_bounded_by_its_dimse_timeout(tmp_path: Path, cleanup,
                                                             fastpath: str) -> None:
    # the per-send socket timeout (dimse_timeout 10m) is out of reach: only the C-STORE's
    # own DIMSE timeout may end it, and the abort that follows must not wait on the peer
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    cleanup.append(peer)
    cleanup.append(_Resume(peer.proc.pid))
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS",
                                             "dimse_timeout": "10m"}})
    big = write_dataset(make_dataset(rows=BIG_SIDE, cols=BIG_SIDE), tmp_path / "src" / "big.dcm")
    result = subprocess.run([sys.executable, "-c", TRANSFER_SCRIPT, str(conf), str(peer.proc.pid),
                             str(big)], capture_output=True, text=True, timeout=HANG_TIMEOUT,
                            cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "DICOMFLOW_FASTPATH": fastpath})
    assert "RESULT None" in result.stdout, result.stdout + result.stderr
    assert "stopped reading" in result.stdout or "DIMSE timeout" in result.stdout


# -- defect 20: probes that do not kill fragile destinations ---------------------------

SCP_SCRIPT = r"""
import sys, time
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
port, verification, abort_stores = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
ae = AE("PACS")
for uid in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"):
    ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
if verification:
    ae.add_supported_context(Verification)
def on_echo(event):
    print(f"ECHO {time.monotonic():.3f}", flush=True)
    return 0x0000
def on_store(event):
    print("STORED", event.request.AffectedSOPInstanceUID, flush=True)
    return 0x0000
def on_established(event):
    storage = [cx for cx in event.assoc.accepted_contexts if cx.abstract_syntax != Verification]
    print("ASSOC", len(event.assoc.accepted_contexts), flush=True)
    if abort_stores and storage:
        print("ABORT", flush=True)
        event.assoc.abort()
ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_ECHO, on_echo),
    (evt.EVT_C_STORE, on_store), (evt.EVT_ESTABLISHED, on_established)])
"""


class ScriptSCP:
    """A pynetdicom Storage SCP in its own process (a real peer on a real socket), with
    or without Verification, optionally aborting every storage association as soon as
    it is established; its stdout logs events."""

    def __init__(self, directory: Path, verification: bool, abort_stores: bool = False,
                 port: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = directory / f"scp-{self.port}.log"
        self.args = [str(self.port), "1" if verification else "0", "1" if abort_stores else "0"]
        self.proc = None

    def start(self) -> ScriptSCP:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", SCP_SCRIPT, *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def events(self, kind: str) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.startswith(kind)]

    def stop(self) -> None:
        terminate(self.proc, self.log, grace=10)
        self.proc = None


@pytest.mark.parametrize("fastpath", FASTPATH)
def test_defect20_probe_does_not_kill_simple_storage(tmp_path: Path, cleanup, fastpath: str) -> None:
    peer = SimpleStorage(tmp_path / "recv", ae_title="CTN")
    conf = endpoint_conf(tmp_path, {"ctn": {"port": peer.port, "ae_title": "CTN",
                                            "retry": {"probe_backoff": "0.5s",
                                                      "probe_backoff_cap": "1s"}}})
    spool = tmp_path / "spool"
    put_in_outbox(spool, "ctn", make_files(tmp_path / "src", 3))
    sender = Daemon(conf, "send", "ctn", env={"DICOMFLOW_FASTPATH": fastpath}).start()
    cleanup.append(sender)
    wait_for(lambda: read_state(spool, "ctn").get("state") == "down", message="down at first")
    peer.start()
    cleanup.append(peer)
    wait_for(lambda: count(spool / "sent/ctn") == 3, message="delivered to simple_storage")
    assert len(peer.files()) == 3
    assert peer.alive(), "simple_storage died of a probe"
    assert count(spool / "failed/ctn") == 0
    assert sender.stop() == 0


def test_defect20_dicomflow_echo_does_not_kill_simple_storage(tmp_path: Path, cleanup) -> None:
    peer = SimpleStorage(tmp_path / "recv", ae_title="CTN").start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {"ctn": {"port": peer.port, "ae_title": "CTN"}})
    for _ in range(3):  # a probe that killed it would make the next echo fail
        result = run_cli(conf, "echo", "ctn")
        assert result.returncode == 0, result.stderr
    assert peer.alive()


def test_defect20_probes_respect_the_probe_backoff_floor(tmp_path: Path, cleanup) -> None:
    # answers C-ECHO, aborts every storage association: the endpoint flaps between
    # "answers the probe" and "association lost" — the probe must still be rate-limited
    peer = ScriptSCP(tmp_path / "peer", verification=True, abort_stores=True).start()
    cleanup.append(peer)
    floor = 1.0
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS",
                                             "retry": {"probe_backoff": f"{floor}s",
                                                       "probe_backoff_cap": "2s"}}})
    spool = tmp_path / "spool"
    put_in_outbox(spool, "pacs", make_files(tmp_path / "src", 1))
    sender = Daemon(conf, "send", "pacs").start()
    cleanup.append(sender)
    wait_for(lambda: len(peer.events("ECHO")) >= 4, message="four probes")
    assert sender.stop() == 0
    times = [float(line.split()[1]) for line in peer.events("ECHO")]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= floor * 0.9, gaps  # a lower bound on the interval, not a speed
    assert count(spool / "outbox/pacs") == 1


def test_defect20_falls_back_to_tcp_without_verification(tmp_path: Path, cleanup) -> None:
    peer = ScriptSCP(tmp_path / "peer", verification=False)
    port = peer.port
    conf = endpoint_conf(tmp_path, {"pacs": {"port": port, "ae_title": "PACS",
                                             "retry": {"probe_backoff": "0.5s",
                                                       "probe_backoff_cap": "1s"}}})
    spool = tmp_path / "spool"
    put_in_outbox(spool, "pacs", make_files(tmp_path / "src", 2))
    sender = Daemon(conf, "send", "pacs").start()
    cleanup.append(sender)
    wait_for(lambda: read_state(spool, "pacs").get("state") == "down", message="down at first")
    peer.start()
    cleanup.append(peer)
    wait_for(lambda: count(spool / "sent/pacs") == 2, message="delivered without Verification")
    sender.wait_log("does not accept Verification; probing it with TCP")
    assert sender.log().count("does not accept Verification") == 1
    peer.stop()
    put_in_outbox(spool, "pacs", make_files(tmp_path / "src2", 1))
    wait_for(lambda: read_state(spool, "pacs").get("state") == "down", message="down again")
    peer = ScriptSCP(tmp_path / "peer2", verification=False, port=port).start()
    cleanup.append(peer)
    wait_for(lambda: count(spool / "sent/pacs") == 3, message="delivered after TCP probes")
    assert peer.events("ECHO") == []
    assert sender.stop() == 0


# -- defect 6, sibling: what a destination can make the sender read --------------------

HUGE_PDU = 0x7FFFFFF0  # declared P-DATA-TF body length: almost 2 GiB
HUGE_PDU_SCRIPT = r"""
import struct, sys, time
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
port, declared = int(sys.argv[1]), int(sys.argv[2])
stores = []
ae = AE("PACS")
ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
ae.add_supported_context(Verification)
def on_store(event):
    stores.append(event.request.AffectedSOPInstanceUID)
    if len(stores) > 1:
        print("STORED", flush=True)
        return 0x0000
    # instead of an answer: a P-DATA-TF header declaring `declared` bytes, 4 KiB of
    # them, then silence on a connection kept open
    event.assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, declared) + bytes(4096))
    print("HUGE", flush=True)
    # the reactor (this thread) is busy here: the DUL's state machine sees the peer leave
    state = event.assoc.dul.state_machine
    end = time.monotonic() + 600
    while state.current_state == "Sta6" and time.monotonic() < end:
        time.sleep(0.1)
    print("DROPPED" if state.current_state != "Sta6" else "HELD", flush=True)
    return 0x0000
ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


class HugePduSCP(ScriptSCP):
    """A pynetdicom Storage SCP (with Verification) in its own process that answers its
    first C-STORE with a P-DATA-TF header declaring ``HUGE_PDU`` bytes and a few KiB,
    then holds the connection silent; later C-STOREs are answered with success."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, verification=True)
        self.script = directory / "huge_pdu_scp.py"
        self.script.write_text(HUGE_PDU_SCRIPT)

    def start(self) -> HugePduSCP:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(self.script), str(self.port), str(HUGE_PDU)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@pytest.mark.parametrize("fastpath", FASTPATH)
def test_defect06_sibling_a_destination_cannot_make_the_sender_read_a_huge_pdu(
        tmp_path: Path, cleanup, fastpath: str) -> None:
    peer = HugePduSCP(tmp_path / "peer").start()
    cleanup.append(peer)
    # dimse_timeout far beyond the wait below: only the PDU limit may end the first C-STORE
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS",
                                             "dimse_timeout": "10m",
                                             "retry": {"probe_backoff": "0.5s",
                                                       "probe_backoff_cap": "2s"}}})
    spool = tmp_path / "spool"
    put_in_outbox(spool, "pacs", make_files(tmp_path / "src", 1))
    sender = Daemon(conf, "send", "pacs", env={"DICOMFLOW_FASTPATH": fastpath}).start()
    cleanup.append(sender)
    sender.wait_log("P-DATA-TF PDU declaring", timeout=HANG_TIMEOUT)
    wait_for(lambda: peer.events("DROPPED"), message="the destination sees the association end")
    wait_for(lambda: count(spool / "sent/pacs") == 1, message="delivered once the destination behaves")
    assert len(peer.events("HUGE")) == 1 and len(peer.events("STORED")) == 1
    peak = peak_rss(sender.pid)
    log = sender.log()
    lines = [line for line in log.splitlines() if "P-DATA-TF PDU declaring" in line]
    assert len(lines) == 1, lines
    assert "dropped connection" in lines[0] and str(HUGE_PDU) in lines[0], lines[0]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    # the destination's trouble, not the file's: the endpoint goes down, no attempt charged
    assert "endpoint down" in log and "transient failure" not in log, log[-3000:]
    assert count(spool / "failed/pacs") == 0 and count(spool / "outbox/pacs") == 0
    assert peak < 300 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MiB"
    assert sender.alive()
    assert sender.stop() == 0
