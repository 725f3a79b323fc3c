"""``[endpoint] associations = N`` (issue 13, item 3) against real peers over loopback:
DCMTK ``storescp --fork`` and in-process pynetdicom SCPs, the sender in process and as
a real ``dicomflow send`` subprocess. Concurrency is observed on the receiving side
(established TCP connections to the peer's port, or the SCP's own association count);
nothing here asserts a speed."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import evt

from pipeline.clock import FakeClock
from pipeline.config import ConfigError, load
from services.send import Sender
from tests.helpers import (
    Daemon,
    dicom_files,
    make_dataset,
    make_files,
    router_port,
    tmp_leftovers,
    wait_for,
    write_conf,
    write_dataset,
)
from tests.peers import StoreSCP
from tests.sendkit import StatusSCP, endpoint_conf, put_in_outbox, read_state, storescp_uids

EP = "pacs"


def uids_of(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def count(directory: Path) -> int:
    return len(dicom_files(directory))


def established_to(port: int, unread: bool = False) -> int:
    """TCP connections established to ``port`` on this host, as the kernel lists them
    (the acceptor's side: its local port is ``port``); with ``unread``, only those
    with data arrived and not read yet (their receive queue)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and (
                    not unread or int(queues.split(":")[1], 16)):
                total += 1
    return total


class PeakWatcher:
    """Polls :func:`established_to` in a thread and keeps the highest count seen."""

    def __init__(self, port: int) -> None:
        self.port, self.peak = port, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, established_to(self.port))
            self._stop.wait(0.01)

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CountingSCP(StatusSCP):
    """:class:`StatusSCP` that also knows how many associations are up at once, which
    association stored each file, and can be limited to ``maximum`` associations
    (pynetdicom rejects more with A-ASSOCIATE-RJ, "local limit exceeded")."""

    def __init__(self, maximum: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if maximum is not None:
            self.ae.maximum_associations = maximum
        self.up = 0
        self.peak = 0
        self.by_association: collections.Counter[int] = collections.Counter()
        self.on_store: Callable[[int], None] | None = None  # called with the count so far

    def _on_established(self, event: evt.Event) -> None:
        with self.lock:
            self.associations += 1
            self.up += 1
            self.peak = max(self.peak, self.up)

    def _on_ended(self, _event: evt.Event) -> None:
        with self.lock:
            self.up -= 1

    def _on_store(self, event: evt.Event) -> int:
        with self.lock:
            self.by_association[id(event.assoc)] += 1
            stored = sum(self.by_association.values())
        if self.on_store is not None:
            self.on_store(stored)
        return super()._on_store(event)

    def start(self) -> CountingSCP:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_established),
                    (evt.EVT_RELEASED, self._on_ended), (evt.EVT_ABORTED, self._on_ended)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=handlers)
        return self


@pytest.fixture
def counting(cleanup):
    def start(**kwargs) -> CountingSCP:
        server = CountingSCP(ae_title="PACS", **kwargs).start()
        cleanup.append(server)
        return server
    return start


def sender_for(tmp_path: Path, port: int, **endpoint) -> Sender:
    conf = endpoint_conf(tmp_path, {EP: {"port": port, "ae_title": "PACS", **endpoint}})
    return Sender(load(conf), EP, clock=FakeClock(), install_signals=False)


# -- configuration ---------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "17", "-1", "four"])
def test_associations_out_of_range_is_rejected_naming_the_key(tmp_path: Path, value: str) -> None:
    conf = endpoint_conf(tmp_path, {EP: {"port": 104, "ae_title": "PACS", "associations": value}})
    with pytest.raises(ConfigError, match="associations"):
        load(conf)


def test_associations_default_and_maximum(tmp_path: Path) -> None:
    conf = endpoint_conf(tmp_path, {"one": {"port": 104, "ae_title": "PACS"},
                                    "many": {"port": 104, "ae_title": "PACS", "associations": "16"}})
    endpoints = load(conf).endpoints
    assert endpoints["one"].associations == 1 and endpoints["many"].associations == 16


# -- delivery --------------------------------------------------------------------------

def test_four_associations_to_storescp_deliver_everything_exactly_once(tmp_path: Path,
                                                                        cleanup) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS", extra=("--fork", "-v")).start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {EP: {"port": peer.port, "ae_title": "PACS",
                                         "associations": "4"}})
    files = make_files(tmp_path / "src", 120)
    put_in_outbox(tmp_path / "spool", EP, files)
    with PeakWatcher(peer.port) as watcher:
        sender = Daemon(conf, "send", EP).start()
        cleanup.append(sender)
        wait_for(lambda: count(tmp_path / "spool/sent" / EP) == 120, message="120 files in sent/")
    wait_for(lambda: len(peer.files()) == 120, message="120 files at storescp")
    assert sorted(storescp_uids(peer.directory)) == sorted(uids_of(files))  # each exactly once
    # The kernel's count: on a loaded machine an association the sender replaced (one
    # lost to a timeout) may still be listed while its storescp child closes it.
    assert 4 <= watcher.peak <= 5, f"peak of {watcher.peak} associations"
    assert count(tmp_path / "spool/outbox" / EP) == 0 and count(tmp_path / "spool/failed" / EP) == 0
    assert sender.stop() == 0
    assert tmp_leftovers(tmp_path / "spool") == []


def test_files_are_spread_over_the_associations_in_process(tmp_path: Path, counting) -> None:
    server = counting()
    files = make_files(tmp_path / "src", 80)
    put_in_outbox(tmp_path / "spool", EP, files)
    sender = sender_for(tmp_path, server.port, associations="4")
    sender.run(once=True)
    assert sorted(server.uids()) == sorted(uids_of(files))  # every file once
    assert count(tmp_path / "spool/sent" / EP) == 80
    assert server.peak == 4 and len(server.by_association) == 4
    assert read_state(tmp_path / "spool", EP)["sent"] == 80


def test_new_contexts_replace_every_association(tmp_path: Path, counting) -> None:
    """CT files, then MR files the associations were not negotiated for: every lane is
    renegotiated (none sends an MR file on a CT-only association: it would fail), and
    each file arrives once."""
    server = counting()
    cts = make_files(tmp_path / "ct", 20)
    mrs = make_files(tmp_path / "mr", 20, sop_class="1.2.840.10008.5.1.4.1.1.4", modality="MR")
    conf = endpoint_conf(tmp_path, {EP: {"port": server.port, "ae_title": "PACS",
                                         "associations": "4", "idle_release": "10m"}})
    sender = Sender(load(conf), EP, clock=FakeClock(), install_signals=False)
    sender.start()
    try:
        put_in_outbox(tmp_path / "spool", EP, cts)
        sender.step()
        assert count(tmp_path / "spool/sent" / EP) == 20 and server.peak == 4
        put_in_outbox(tmp_path / "spool", EP, mrs)
        sender.step()
        assert count(tmp_path / "spool/sent" / EP) == 40
        assert count(tmp_path / "spool/failed" / EP) == 0
        assert sorted(server.uids()) == sorted(uids_of(cts + mrs))
        assert server.associations >= 5 and server.peak <= 4
    finally:
        sender.close()


def test_every_association_stops_at_the_window_close(tmp_path: Path, counting) -> None:
    """The window closes (the injected clock jumps) while the 10th file is stored:
    nothing more is handed out, the files in flight (at most one per association)
    finish and are moved, the rest wait in the outbox, every association is released."""
    server = counting()
    put_in_outbox(tmp_path / "spool", EP, make_files(tmp_path / "src", 40))
    clock = FakeClock()  # 12:00
    conf = endpoint_conf(tmp_path, {EP: {"port": server.port, "ae_title": "PACS",
                                         "associations": "4",
                                         "schedule": {"window": "12:00 - 12:30"}}})
    sender = Sender(load(conf), EP, clock=clock, install_signals=False)
    server.on_store = lambda stored: clock.advance(3600) if stored == 10 else None
    sender.start()
    try:
        sender.step()
        received = len(server.uids())
        assert 10 <= received <= 13, received
        assert count(tmp_path / "spool/sent" / EP) == received
        assert count(tmp_path / "spool/outbox" / EP) == 40 - received
        assert server.peak >= 2
        sender.step()
        assert read_state(tmp_path / "spool", EP)["state"] == "outside_window"
        assert all(lane.current is None for lane in sender.lanes)
        wait_for(lambda: server.up == 0, message="every association released")
        assert len(server.uids()) == received
    finally:
        sender.close()


def test_one_association_still_uses_exactly_one_in_arrival_order(tmp_path: Path,
                                                                  counting) -> None:
    server = counting()
    published = put_in_outbox(tmp_path / "spool", EP, make_files(tmp_path / "src", 30))
    in_arrival_order = uids_of(sorted(published, key=lambda p: p.name))
    sender_for(tmp_path, server.port).run(once=True)
    assert server.uids() == in_arrival_order
    assert server.associations == 1 and server.peak == 1


def test_a_destination_taking_one_association_gets_everything_and_is_not_down(
        tmp_path: Path, cleanup, counting) -> None:
    server = counting(maximum=1)
    conf = endpoint_conf(tmp_path, {EP: {"port": server.port, "ae_title": "PACS",
                                         "associations": "4", "log_level": "DEBUG"}})
    files = make_files(tmp_path / "src", 60)
    put_in_outbox(tmp_path / "spool", EP, files)
    sender = Daemon(conf, "send", EP).start()
    cleanup.append(sender)
    states = set()

    def done() -> bool:
        states.add(read_state(tmp_path / "spool", EP).get("state"))
        return count(tmp_path / "spool/sent" / EP) == 60

    wait_for(done, message="60 files in sent/")
    assert sorted(server.uids()) == sorted(uids_of(files))
    assert server.peak == 1
    assert "down" not in states
    log = sender.log()
    assert "refused an extra association" in log and "endpoint down" not in log
    assert log.count("refused an extra association") == 1  # said once
    assert count(tmp_path / "spool/failed" / EP) == 0
    assert read_state(tmp_path / "spool", EP)["down_since"] is None
    assert sender.stop() == 0


def test_sigterm_mid_run_loses_nothing(tmp_path: Path, cleanup, counting) -> None:
    server = counting()
    conf = endpoint_conf(tmp_path, {EP: {"port": server.port, "ae_title": "PACS",
                                         "associations": "4"}})
    put_in_outbox(tmp_path / "spool", EP, make_files(tmp_path / "src", 300))
    sender = Daemon(conf, "send", EP).start()
    wait_for(lambda: count(tmp_path / "spool/sent" / EP) >= 20, message="sending")
    assert sender.stop(signal.SIGTERM) == 0
    assert read_state(tmp_path / "spool", EP)["state"] == "stopped"
    sent = count(tmp_path / "spool/sent" / EP)
    assert sent + count(tmp_path / "spool/outbox" / EP) == 300
    assert len(server.received) == sent  # every file in flight finished and was moved
    assert len(set(server.uids())) == len(server.uids())  # none twice
    assert tmp_leftovers(tmp_path / "spool") == []


def test_our_own_receiver_with_one_association_gets_everything(tmp_path: Path, cleanup) -> None:
    """A ``dicomflow receive`` with ``max_associations = 1`` refuses the extras with
    A-ASSOCIATE-RJ (local limit exceeded): the sender goes on over the one it has."""
    receiver_conf = write_conf(tmp_path / "receiver", router={"max_associations": "1",
                                                              "log_level": "INFO"})
    receiver = Daemon(receiver_conf, "receive").start()
    cleanup.append(receiver)
    receiver.wait_log("listening as")
    conf = endpoint_conf(tmp_path, {EP: {"port": router_port(receiver_conf),
                                         "ae_title": "DICOMFLOW", "associations": "3"}})
    files = make_files(tmp_path / "src", 40)
    put_in_outbox(tmp_path / "spool", EP, files)
    sender = Daemon(conf, "send", EP).start()
    cleanup.append(sender)
    wait_for(lambda: count(tmp_path / "spool/sent" / EP) == 40, message="40 files in sent/")
    incoming = tmp_path / "receiver/spool/incoming"
    assert sorted(uids_of(dicom_files(incoming))) == sorted(uids_of(files))
    log = sender.log()
    assert "refused an extra association" in log and "endpoint down" not in log
    assert read_state(tmp_path / "spool", EP)["down_since"] is None
    assert sender.stop() == 0
    assert receiver.stop() == 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class _Resume:
    """Teardown: never leave stopped peers behind."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_sigterm_exits_while_every_association_is_blocked(tmp_path: Path, cleanup) -> None:
    """Three associations each writing a 32 MiB file to a storescp --fork whose processes
    are all stopped: the shutdown cuts every blocked transfer (dimse_timeout is far
    beyond the stop bound) and the files stay queued; a restart delivers them."""
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS", extra=("--fork",)).start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {EP: {
        "port": peer.port, "ae_title": "PACS", "associations": "3", "dimse_timeout": "10m",
        "idle_release": "10m"}})
    spool = tmp_path / "spool"
    put_in_outbox(spool, EP, make_files(tmp_path / "small", 6))
    sender = Daemon(conf, "send", EP).start()
    cleanup.append(sender)
    wait_for(lambda: count(spool / "sent" / EP) == 6, message="the small files delivered")
    wait_for(lambda: established_to(peer.port) == 3, message="three associations up")
    assert peer.proc is not None
    stopped = [peer.proc.pid, *_children(peer.proc.pid)]
    assert len(stopped) == 4  # the listener and one child per association
    big = [write_dataset(make_dataset(rows=4096, cols=4096), tmp_path / "big" / f"{i}.dcm")
           for i in range(3)]
    # the sender is held while the three are published, so that one scan sees them all
    os.kill(sender.pid, signal.SIGSTOP)
    cleanup.append(_Resume([sender.pid]))
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    cleanup.append(_Resume(stopped))
    put_in_outbox(spool, EP, big)
    os.kill(sender.pid, signal.SIGCONT)
    wait_for(lambda: established_to(peer.port, unread=True) == 3,
             message="all three associations sending to the stopped peer")
    time.sleep(1.0)  # let the socket buffers fill (not what is tested)
    assert sender.stop(timeout=30) == 0  # supervisord's stopwaitsecs is 60
    assert count(spool / "outbox" / EP) == 3 and count(spool / "failed" / EP) == 0
    assert read_state(spool, EP).get("state") == "stopped"
    assert "transfer cut, the file stays in the outbox" in sender.log()
    _Resume(stopped).stop()
    restarted = Daemon(conf, "send", EP, log_name="send-pacs-2").start()
    cleanup.append(restarted)
    wait_for(lambda: count(spool / "sent" / EP) == 9, message="the big files delivered")
    assert restarted.stop() == 0
