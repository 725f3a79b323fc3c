"""Several receive processes on one port (``[router] receive_processes``, SO_REUSEPORT).

Real ``dicomflow receive`` subprocesses and real DCMTK ``storescu`` peers over loopback:
connections spread over the processes, each stores durably on its own, one killed does
not stop the others, one process alone keeps its exclusive bind, and ``dicomflow up``
runs, waits for, shows and stops every one of them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import config as config_module
from pipeline.errors import ConfigError
from pipeline.spool import Spool
from services.supervise import Supervisor, listening_pids, receive_values
from tests.helpers import (
    Daemon,
    dcmtk,
    dicom_files,
    make_files,
    router_port,
    run_cli,
    wait_for,
    wait_port,
    write_conf,
)
from tests.peers import TCP_ENV, storescu

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e


def receive_process(conf: Path, index: int, log_name: str | None = None) -> Daemon:
    return Daemon(conf, "receive", "--process", str(index), log_name=log_name or f"receive-{index}")


def start_all(daemons: list[Daemon]) -> list[Daemon]:
    for daemon in daemons:
        daemon.start()
    for daemon in daemons:
        daemon.wait_log("listening as")
    return daemons


def stores_in(daemon: Daemon) -> int:
    return daemon.log().count("stored from")


def send_concurrently(port: int, batches: list[list[Path]]) -> list[subprocess.CompletedProcess]:
    """One ``storescu`` (one association) per batch, all started at once."""
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", f"MOD{i}", "-aec", "DICOMFLOW",
                               "127.0.0.1", str(port), *map(str, batch)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **TCP_ENV})
             for i, batch in enumerate(batches)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.fixture
def three(tmp_path: Path):
    conf = write_conf(tmp_path, router={"receive_processes": 3, "log_level": "INFO"})
    daemons = start_all([receive_process(conf, k) for k in (1, 2, 3)])
    yield conf, daemons
    for daemon in daemons:
        daemon.stop()


def test_concurrent_associations_spread_over_the_processes_and_all_arrive(three, tmp_path: Path) -> None:
    conf, daemons = three
    port = router_port(conf)
    incoming = Spool(config_module.load(conf).spool).incoming
    sent = 0
    # 8 associations at once; the kernel picks a process per connection (a hash of
    # the addresses), so a round may land on one: send rounds until two have served
    # (the chance that 5 rounds of 8 all land on one of 3 is ~1e-18).
    for round_ in range(5):
        batches = [make_files(tmp_path / f"r{round_}-{i}", 3, rows=64, cols=64) for i in range(8)]
        results = send_concurrently(port, batches)
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        sent += 24
        # storescu exits after the last acknowledgement: every acknowledged file is there
        assert len(dicom_files(incoming)) == sent
        if sum(1 for d in daemons if stores_in(d) > 0) >= 2:
            break
    served = [stores_in(d) for d in daemons]
    assert sum(served) == sent, served
    assert sum(1 for n in served if n > 0) >= 2, f"every association landed on one process: {served}"
    # each process wrote its transfers in its own temp folder, left nothing behind
    tmp = incoming / ".tmp"
    assert sorted(p.name for p in tmp.iterdir()) == ["receive-1", "receive-2", "receive-3"]
    assert [p for p in tmp.rglob("*") if p.is_file()] == []


def test_a_killed_process_does_not_stop_the_others(three, tmp_path: Path) -> None:
    conf, daemons = three
    port = router_port(conf)
    incoming = Spool(config_module.load(conf).spool).incoming
    daemons[0].kill()
    for i in range(8):  # each its own connection: the kernel picks among the living
        result = storescu(port, make_files(tmp_path / f"after-{i}", 2, rows=32, cols=32))
        assert result.returncode == 0, result.stderr
    wait_for(lambda: len(dicom_files(incoming)) == 16, message="16 files in incoming/")
    assert stores_in(daemons[1]) + stores_in(daemons[2]) == 16


def test_a_restarted_process_cleans_only_its_own_temp_folder(three, tmp_path: Path) -> None:
    conf, daemons = three
    spool = Spool(config_module.load(conf).spool)
    daemons[0].kill()
    # process 1's own leftover, and process 2's transfer "in flight" (a fresh file)
    own = spool.tmp_dir(spool.incoming) / "receive-1" / "tmpdead"
    sibling = spool.tmp_dir(spool.incoming) / "receive-2" / "tmpinflight"
    own.write_bytes(b"x")
    sibling.write_bytes(b"y")
    restarted = receive_process(conf, 1, log_name="receive-1-restarted")
    daemons[0] = restarted
    start_all([restarted])
    assert not own.exists()
    assert sibling.read_bytes() == b"y", "process 1 removed process 2's transfer in flight"
    sibling.unlink()


def test_one_process_keeps_the_exclusive_bind(tmp_path: Path) -> None:
    first_conf = write_conf(tmp_path / "a")
    port = router_port(first_conf)
    first = start_all([Daemon(first_conf, "receive")])[0]
    try:
        # another router (its own spool) on the same port, one process: refused
        second = Daemon(write_conf(tmp_path / "b", router={"port": port}), "receive")
        second.start()
        assert second.proc is not None and second.proc.wait(60) == 1
        assert re.search(rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use",
                         second.log()), second.log()[-2000:]
        # ... and with SO_REUSEPORT it cannot join a listener bound without it either
        third = Daemon(write_conf(tmp_path / "c", router={"port": port, "receive_processes": 2}),
                       "receive", "--process", "1")
        third.start()
        assert third.proc is not None and third.proc.wait(60) == 1
        assert "Address already in use" in third.log(), third.log()[-2000:]
        assert first.alive()
    finally:
        first.stop()


def test_each_process_needs_its_index(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, router={"receive_processes": 2})
    for args in ((), ("--process", "3"), ("--process", "0")):
        result = run_cli(conf, "receive", *args)
        assert result.returncode == 1
        assert "[router] receive_processes: is 2: each receive process needs --process 1..2" \
            in result.stderr, result.stderr


@pytest.mark.parametrize("value", ["0", "17", "two"])
def test_receive_processes_is_bounded(tmp_path: Path, value: str) -> None:
    conf = write_conf(tmp_path, router={"receive_processes": value})
    with pytest.raises(ConfigError, match=r"\[router\] receive_processes"):
        config_module.load(conf)


def test_supervisord_values() -> None:
    assert receive_values(1) == {"DICOMFLOW_RECEIVE_PROCESSES": "1",
                                 "DICOMFLOW_RECEIVE_PROCESS_NAME": "receive",
                                 "DICOMFLOW_RECEIVE_PROCESS_ARG": ""}
    several = receive_values(4)
    assert several["DICOMFLOW_RECEIVE_PROCESSES"] == "4"
    assert several["DICOMFLOW_RECEIVE_PROCESS_NAME"] == "receive-%(process_num)d"
    assert several["DICOMFLOW_RECEIVE_PROCESS_ARG"] == " --process %(process_num)d"


def test_listening_pids_tells_which_processes_listen(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, router={"receive_processes": 2})
    port = router_port(conf)
    assert listening_pids(port, [os.getpid()]) == set()
    daemon = start_all([receive_process(conf, 1)])[0]
    try:
        assert listening_pids(port, [daemon.pid, os.getpid()]) == {daemon.pid}
    finally:
        daemon.stop()


def test_sweep_and_clean_leave_folders_and_young_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").create()
    tmp = spool.tmp_dir(spool.incoming)
    mine = spool.process_tmp_dir(spool.incoming, "receive-1")
    other = spool.process_tmp_dir(spool.incoming, "receive-2")
    old = time.time() - 3600
    files = {name: path for name, path in (("top", tmp / "t"), ("mine", mine / "m"),
                                           ("other_old", other / "o"), ("other_new", other / "n"))}
    for path in files.values():
        path.write_bytes(b"")
    for name in ("top", "other_old"):
        os.utime(files[name], (old, old))
    assert spool.clean_tmp(spool.incoming, process="receive-1") == 1  # its own, whatever age
    assert not files["mine"].exists() and files["other_new"].exists() and files["top"].exists()
    assert spool.sweep_tmp(spool.incoming, older_than=600) == 2  # old ones, every folder
    assert not files["top"].exists() and not files["other_old"].exists()
    assert files["other_new"].exists() and mine.is_dir() and other.is_dir()
    assert spool.clean_tmp(spool.incoming) == 0  # one process's clean: folders untouched
    assert files["other_new"].exists()


def status(conf: Path, code: int = 0) -> dict:
    """``status --json``; ``code``: its exit status (0 all running, 3 stopped, 4 partly)."""
    result = run_cli(conf, "status", "--json")
    assert result.returncode == code, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_up_runs_and_shows_every_receive_process_and_back_to_one(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, router={"receive_processes": 2, "log_level": "INFO"})
    try:
        up = run_cli(conf, "up", timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        assert re.search(r"receive-1\s+RUNNING", up.stdout) and \
            re.search(r"receive-2\s+RUNNING", up.stdout), up.stdout
        config = config_module.load(conf)
        supervisor = Supervisor(config)
        pids = supervisor.receive_pids()
        assert sorted(pids) == ["receive-1", "receive-2"]
        port = router_port(conf)
        wait_port(port)
        assert listening_pids(port, list(pids.values())) == set(pids.values())
        report = status(conf)
        assert "receive" not in report["processes"]
        for name in ("receive-1", "receive-2"):
            assert report["processes"][name] == {"running": True, "pid": pids[name]}
        text = run_cli(conf, "status")
        assert text.returncode == 0, text.stderr
        assert re.search(r"receive-1\s+running, pid", text.stdout), text.stdout
        result = storescu(port, make_files(tmp_path / "a", 3, rows=32, cols=32))
        assert result.returncode == 0, result.stderr
        log_dir = Spool(config.spool).log_dir
        wait_for(lambda: sum((log_dir / f"receive-{k}.log").read_text().count("stored from")
                             for k in (1, 2)) == 3, message="3 stores in receive-1/2.log")

        # back to one process: `up` replaces the two with the one named receive
        router_ini = conf / "router.ini"
        router_ini.write_text(router_ini.read_text().replace("receive_processes = 2",
                                                             "receive_processes = 1"))
        again = run_cli(conf, "up", timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "restarted receive" in again.stdout, again.stdout
        assert sorted(Supervisor(config_module.load(conf)).receive_pids()) == ["receive"]
        assert status(conf)["processes"]["receive"]["running"]
        result = storescu(port, make_files(tmp_path / "b", 1, rows=32, cols=32))
        assert result.returncode == 0, result.stderr
        wait_for(lambda: "stored from" in (log_dir / "receive.log").read_text(),
                 message="a store in receive.log")
    finally:
        down = run_cli(conf, "down", timeout=400)
    assert down.returncode == 0, down.stderr
    assert not status(conf, code=3)["processes"]["receive"]["running"]


@pytest.mark.slow
def test_down_stops_every_receive_process(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, router={"receive_processes": 2})
    try:
        up = run_cli(conf, "up", timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        assert all(p["running"] for p in status(conf)["processes"].values())
    finally:
        down = run_cli(conf, "down", timeout=400)
    assert down.returncode == 0, down.stderr
    report = status(conf, code=3)
    assert not report["processes"]["receive-1"]["running"]
    assert not report["processes"]["receive-2"]["running"]
