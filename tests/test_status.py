"""``dicomflow status``: counts, ages, endpoint states, orphans — without parsing DICOM."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import config as config_module
from pipeline.lock import DaemonLock
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from services.status import CLEAR, collect, count_stage, exit_code, format_age, process_info, render
from tests.helpers import HANG_TIMEOUT, REPO, Daemon, make_files, run_cli, wait_for, write_conf

ENDPOINT = {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "PACS"}}


def make(tmp_path: Path, endpoints: dict | None = None):
    conf = write_conf(tmp_path, endpoints=endpoints if endpoints is not None else {"pacs": ENDPOINT})
    loaded = config_module.load(conf)
    spool = Spool(loaded.spool).create(loaded.endpoints)
    return conf, loaded, spool


def test_counts_and_oldest_age_from_names(tmp_path: Path) -> None:
    _, loaded, spool = make(tmp_path)
    now = time.time()
    for age in (30, 600, 5):
        spool.write_bytes(spool.outbox("pacs"), str(SpoolName.new("1.2.3", now=now - age)), b"x")
    spool.write_bytes(spool.failed("pacs"), str(SpoolName.new("1.2.4", now=now - 100)), b"x")
    spool.write_sidecar(spool.failed("pacs") / "whatever.dcm", ".error", "0xC000 cannot understand")
    report = collect(loaded, now=now)
    pacs = report["endpoints"]["pacs"]
    assert pacs["outbox"]["count"] == 3
    assert 599 <= pacs["outbox"]["oldest_age_s"] <= 601
    assert pacs["failed"]["count"] == 1
    assert pacs["last_error"] == "0xC000 cannot understand"
    assert pacs["state"] == "not running"
    assert report["stages"]["incoming"] == {"count": 0, "oldest_age_s": None}
    assert report["processes"]["receive"]["running"] is False


def test_hand_dropped_names_use_mtime(tmp_path: Path) -> None:
    _, _, spool = make(tmp_path)
    dropped = spool.incoming / "scan.dcm"
    dropped.write_bytes(b"x")
    os.utime(dropped, (time.time() - 3600, time.time() - 3600))
    info = count_stage(spool.incoming, time.time())
    assert info.count == 1 and 3590 < info.oldest_age_s < 3610


def test_sender_state_file_and_orphans(tmp_path: Path) -> None:
    _, loaded, spool = make(tmp_path)
    spool.create_endpoint("old")
    spool.write_bytes(spool.outbox("old"), str(SpoolName.new("1.2.5")), b"x")
    state = {"endpoint": "pacs", "pid": os.getpid(), "state": "down", "since": "2026-11-28T06:00:00+00:00",
             "down_since": "2026-11-28T06:00:00+00:00", "last_error": "connection refused",
             "last_error_at": "2026-11-28T06:00:00+00:00", "next_open": None, "sent": 0, "failed": 0}
    spool.write_bytes(spool.run_dir, "send-pacs.json", json.dumps(state).encode(), replace=True)
    report = collect(loaded)
    assert report["endpoints"]["old"]["state"] == "orphaned"
    assert report["endpoints"]["old"]["outbox"]["count"] == 1
    assert report["endpoints"]["pacs"]["last_error"] == "connection refused"
    text = render(report)
    assert "orphaned" in text and "connection refused" in text


def test_status_json_command_and_check_warns_orphans(tmp_path: Path) -> None:
    conf, _, spool = make(tmp_path)
    spool.create_endpoint("gone")
    result = run_cli(conf, "status", "--json")
    assert result.returncode == 3, result.stderr  # nothing runs
    report = json.loads(result.stdout)
    assert set(report) == {"spool", "conf", "time", "processes", "stages", "endpoints", "journal"}
    assert report["journal"] == {"enabled": True, "path": str(spool.run_dir / "journal.sqlite"),
                                 "bytes": None, "retention_s": 90 * 86400.0, "phi": False}
    assert set(report["endpoints"]) == {"pacs", "gone"}
    assert set(report["endpoints"]["pacs"]) == {
        "configured", "destination", "sender_running", "state", "since", "down_since", "next_open",
        "last_error", "last_error_at", "outbox", "sent", "failed", "handed_back"}
    check = run_cli(conf, "check")
    assert check.returncode == 0 and "gone" in check.stdout and "orphaned" in check.stdout


def test_status_on_100000_queued_files(tmp_path: Path) -> None:
    """Works on a large queue without opening files (the benchmark measures its speed)."""
    _, loaded, spool = make(tmp_path)
    outbox = spool.outbox("pacs")
    base = time.time() - 50
    for index in range(100_000):
        (outbox / str(SpoolName.new("1.2.3", now=base + index * 0.0001))).touch()
    report = collect(loaded)
    assert report["endpoints"]["pacs"]["outbox"]["count"] == 100_000
    assert report["endpoints"]["pacs"]["outbox"]["oldest_age_s"] >= 49


def test_format_age() -> None:
    assert [format_age(v) for v in (None, 5, 90, 7200, 172800)] == ["-", "5s", "2m", "2h", "2d"]


# -- studies (issue 17): the filter's state file and the study lists ---------------------

AI = {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "AI"}}
STUDY = "1.2.826.0.1.3680043.8.498.10000000000000000001"


def write_study_state(spool: Spool, waiting: list[dict], released: list[dict] | None = None,
                      written: float | None = None, raw: bytes | None = None) -> Path:
    """``run/studies/state.json`` as the filter writes it (atomically, through the spool)."""
    directory = spool.run_dir / "studies"
    directory.mkdir(mode=0o700, exist_ok=True)
    state = {"version": 1, "written": time.time() if written is None else written, "pid": 1,
             "waiting": waiting, "released": released or []}
    return spool.write_bytes(directory, "state.json", raw if raw is not None else json.dumps(state).encode(),
                             replace=True)


def waiting_entry(study: str = STUDY, endpoint: str = "ai", now: float | None = None, *,
                  level: str = "study", series: str | None = None, instances: int = 42,
                  sample: str | None = None, release_in: float | None = 20.0,
                  mpps: str | None = None) -> dict:
    now = time.time() if now is None else now
    return {"endpoint": endpoint, "level": level, "study": study, "series": series,
            "instances": instances, "first_arrival": now - 900, "last_arrival": now - 40,
            "completion": "mpps" if mpps else "stable", "mpps": mpps,
            "release_at": None if release_in is None else now + release_in,
            "sample": sample or str(SpoolName.new("1.2.3.4", now=now - 900))}


def write_study_list(spool: Spool, endpoint: str, study: str, released: float,
                     prefixes: list[str], series: str | None = None) -> Path:
    """A study list in ``run/studies/queue/<endpoint>/`` (the queue module's format)."""
    directory = spool.run_dir / "studies" / "queue" / endpoint
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{SpoolName.new(None, now=released).prefix}.study"
    data = {"version": 1, "endpoint": endpoint, "study": study, "series": series,
            "level": "series" if series else "study", "released": released, "prefixes": prefixes}
    return spool.write_bytes(directory, name, json.dumps(data).encode())


@pytest.fixture
def fake_filter():
    """A live process that looks like ``dicomflow filter`` to status (its pid in
    ``run/filter.lock``, ``services.cli`` in its command line) but does nothing: a filter
    that hangs. It ends when its stdin closes."""
    procs: list[subprocess.Popen] = []

    def start(spool: Spool) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "services.cli",
                                 "filter"], stdin=subprocess.PIPE)
        procs.append(proc)
        DaemonLock(spool.run_dir, "filter").path.write_text(f"{proc.pid}\n")
        wait_for(lambda: process_info(spool.run_dir, "filter")["running"], message="the fake filter")
        return proc

    yield start
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(HANG_TIMEOUT)


def make_studies(tmp_path: Path):
    return make(tmp_path, {"pacs": ENDPOINT, "ai": AI})


def test_studies_waiting_and_queued_per_endpoint(tmp_path: Path) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    series = "1.2.826.0.1.3680043.8.498.2"
    write_study_state(spool, [waiting_entry(now=now),
                              waiting_entry("1.2.3", now=now, level="series", series=series, instances=3,
                                            release_in=None, mpps="in progress")], written=now)
    write_study_list(spool, "ai", "1.2.4", now - 120, ["20261203T050000.000000-000001"])
    write_study_list(spool, "ai", "1.2.5", now - 30, [])
    report = collect(loaded, now=now)
    assert report["studies_state"] == "ok"
    assert "studies" not in report["endpoints"]["pacs"]  # instance-level: as before
    block = report["endpoints"]["ai"]["studies"]
    assert block["queued"] == {"count": 2, "oldest_age_s": 120.0}
    assert block["waiting"] == [  # oldest first, then by UID
        {"study": "1.2.3", "series": series, "level": "series", "instances": 3, "age_s": 900.0,
         "idle_s": 40.0, "mpps": "in progress", "release_in_s": None},
        {"study": STUDY, "series": None, "level": "study", "instances": 42, "age_s": 900.0,
         "idle_s": 40.0, "mpps": None, "release_in_s": 20.0}]
    text = render(report)
    assert "studies: 2 queued (oldest 2m), 2 waiting" in text
    assert "studies waiting      2" in text
    assert "…" + STUDY[-20:] in text and "on MPPS" in text and STUDY not in text


def test_studies_text_is_capped_at_20_rows(tmp_path: Path) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    write_study_state(spool, [waiting_entry(f"1.2.3.{i}", now=now) for i in range(25)], written=now)
    report = collect(loaded, now=now)
    assert len(report["endpoints"]["ai"]["studies"]["waiting"]) == 25  # JSON: all of them
    text = render(report)
    assert "… and 5 more" in text
    assert sum(1 for line in text.splitlines() if line.strip().startswith("ai ") and "1.2.3." in line) == 20


def test_no_studies_no_key(tmp_path: Path) -> None:
    _, loaded, _ = make_studies(tmp_path)
    report = collect(loaded)
    assert "studies_state" not in report
    assert all("studies" not in info for info in report["endpoints"].values())
    text = render(report)
    assert "studies waiting" not in text and "studies:" not in text


def test_studies_state_unavailable(tmp_path: Path) -> None:
    """Missing (while lists exist), corrupt, wrong version, or huge: not an error, said so."""
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    write_study_list(spool, "ai", "1.2.4", now - 10, [])
    report = collect(loaded, now=now)
    assert report["studies_state"] == "unavailable"
    assert report["endpoints"]["ai"]["studies"]["queued"]["count"] == 1
    assert "state unavailable" in render(report)
    for raw in (b"{not json", b'{"version": 2, "waiting": [], "released": []}', b"[1, 2]",
                b"[" * 100_000, b'{"version": 1, "waiting": {}, "released": []}'):
        write_study_state(spool, [], raw=raw)
        assert collect(loaded, now=now)["studies_state"] == "unavailable", raw[:40]


def test_studies_state_stale_only_while_the_filter_runs(tmp_path: Path, fake_filter) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    write_study_state(spool, [waiting_entry(now=now)], written=now - 120)
    assert collect(loaded, now=now)["studies_state"] == "ok"  # filter stopped: the last word
    fake_filter(spool)
    report = collect(loaded, now=now)
    assert report["processes"]["filter"]["running"] is True
    assert report["studies_state"] == "unavailable"
    assert len(report["endpoints"]["ai"]["studies"]["waiting"]) == 1  # the last known rows


def test_hostile_state_rows_are_dropped(tmp_path: Path) -> None:
    _, loaded, spool = make_studies(tmp_path)
    now = time.time()
    forged = {**waiting_entry("1.2.7", now=now), "mpps": "\x1b[31mforged"}
    rows: list = [waiting_entry("../../etc", now=now), waiting_entry(now=now, endpoint="../x"),
                  waiting_entry("1.2\n3", now=now), "not a row", forged]
    write_study_state(spool, rows, written=now)
    waiting = collect(loaded, now=now)["endpoints"]["ai"]["studies"]["waiting"]
    assert [(w["study"], w["mpps"]) for w in waiting] == [("1.2.7", None)]


def test_status_reads_no_dicom_file(tmp_path: Path) -> None:
    """The sample named by the state file is never opened: a FIFO there would block any
    reader, garbage would fail a parser; status and its JSON command don't care."""
    conf, _, spool = make_studies(tmp_path)
    fifo = spool.accepted / str(SpoolName.new("1.2.3.4"))
    os.mkfifo(fifo, 0o600)
    garbage = spool.accepted / str(SpoolName.new("1.2.3.5"))
    garbage.write_bytes(b"not DICOM at all")
    write_study_state(spool, [waiting_entry(sample=fifo.name), waiting_entry("1.2.9", sample=garbage.name)])
    result = run_cli(conf, "status", "--json")
    assert result.returncode == 3, result.stderr  # nothing runs
    report = json.loads(result.stdout)
    assert report["studies_state"] == "ok"
    assert len(report["endpoints"]["ai"]["studies"]["waiting"]) == 2
    assert fifo.name not in result.stdout  # no file names, no patient data
    text = run_cli(conf, "status")
    assert text.returncode == 3 and "studies waiting" in text.stdout


# -- exit status and --watch (issue 19) ---------------------------------------------------

REPORT_KEYS = {"spool", "conf", "time", "processes", "stages", "endpoints", "journal"}


def report_with(processes: dict[str, bool], senders: dict[str, bool],
                orphans: tuple[str, ...] = ()) -> dict:
    """The parts of a report ``exit_code`` reads."""
    endpoints = {name: {"configured": True, "sender_running": running} for name, running in senders.items()}
    endpoints.update({name: {"configured": False, "sender_running": False} for name in orphans})
    return {"processes": {name: {"running": running, "pid": 1 if running else None}
                          for name, running in processes.items()},
            "endpoints": endpoints}


def test_exit_code_counts_processes_and_configured_senders() -> None:
    up = {"receive": True, "filter": True}
    assert exit_code(report_with(up, {"pacs": True}, orphans=("old",))) == 0  # an orphan has no sender
    assert exit_code(report_with(up, {"pacs": False})) == 4
    assert exit_code(report_with({**up, "web": False}, {"pacs": True})) == 4
    assert exit_code(report_with({"receive-1": True, "receive-2": False, "filter": True}, {})) == 4
    assert exit_code(report_with({"receive": False, "filter": False, "web": False}, {"pacs": False},
                                 orphans=("old",))) == 3


def enable_web(conf: Path) -> None:
    """``[web] enabled = true`` (write_conf writes no [web] section)."""
    router_ini = conf / "router.ini"
    router_ini.write_text(router_ini.read_text() + "\n[web]\nenabled = true\n")


def test_web_row_only_when_enabled(tmp_path: Path) -> None:
    conf, loaded, _ = make(tmp_path)
    assert "web" not in collect(loaded)["processes"]
    enable_web(conf)
    report = collect(config_module.load(conf))
    assert report["processes"]["web"] == {"running": False, "pid": None}
    assert "web        NOT RUNNING" in render(report)
    result = run_cli(conf, "status", "--json")
    assert result.returncode == 3, result.stderr
    shown = json.loads(result.stdout)
    assert set(shown) == REPORT_KEYS and set(shown["processes"]) == {"receive", "filter", "web"}


def test_exit_3_when_nothing_runs(tmp_path: Path) -> None:
    conf, _, spool = make(tmp_path)
    spool.create_endpoint("gone")  # orphaned: no sender expected
    for args in (("status",), ("status", "--json")):
        result = run_cli(conf, *args)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Start real ``dicomflow`` daemons, each waited on until ready; stopped at the end."""
    started: list[Daemon] = []
    ready = {"receive": "listening as", "filter": "filter ready", "send": "sender started"}

    def start(conf: Path, *args: str) -> Daemon:
        daemon = Daemon(conf, *args).start()
        started.append(daemon)
        daemon.wait_log(ready[args[0]])
        return daemon

    yield start
    codes = {daemon.args: daemon.stop() for daemon in reversed(started)}
    assert all(code == 0 for code in codes.values()), codes


@pytest.mark.e2e
def test_exit_4_when_only_the_filter_runs(tmp_path: Path, daemons) -> None:
    conf, _, _ = make(tmp_path)
    daemons(conf, "filter")
    result = run_cli(conf, "status", "--json")
    assert result.returncode == 4, result.stderr
    report = json.loads(result.stdout)
    assert report["processes"]["filter"]["running"] and not report["processes"]["receive"]["running"]
    assert not report["endpoints"]["pacs"]["sender_running"]
    assert run_cli(conf, "status").returncode == 4


@pytest.mark.e2e
def test_exit_0_when_every_daemon_runs_even_with_the_destination_down(tmp_path: Path, daemons) -> None:
    conf, loaded, spool = make(tmp_path)  # pacs: port 1, nothing listens
    (image,) = make_files(tmp_path / "src", 1)  # queued: the sender tries it and finds pacs down
    spool.write_bytes(spool.outbox("pacs"), str(SpoolName.new("1.2.3")), image.read_bytes())
    for args in (("receive",), ("filter",), ("send", "pacs")):
        daemons(conf, *args)
    wait_for(lambda: collect(loaded)["endpoints"]["pacs"]["state"] == "down", message="pacs down")
    shown = run_cli(conf, "status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "down since" in shown.stdout
    result = run_cli(conf, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["endpoints"]["pacs"]["state"] == "down" and report["endpoints"]["pacs"]["sender_running"]


def read_until(fd: int, done: Callable[[bytes], bool], timeout: float = HANG_TIMEOUT) -> bytes:
    """Read ``fd`` until ``done(everything so far)``; output that ends first, or a hang,
    fails the test."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:.0f}s; read so far: {data[-2000:]!r}")
        if select.select([fd], [], [], left)[0]:
            chunk = read_chunk(fd)
            if not chunk:
                raise AssertionError(f"the output ended early: {data[-2000:]!r}")
            data += chunk
    return data


def read_chunk(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the pseudo-terminal's other side is closed (the process ended)
        return b""


def read_to_end(fd: int, timeout: float = HANG_TIMEOUT) -> bytes:
    """The rest of the output, up to its end (EOF, or EIO on a pty); a hang fails the test."""
    rest = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"the output did not end within {timeout:.0f}s: {rest[-2000:]!r}")
        chunk = read_chunk(fd)
        if not chunk:
            return rest
        rest += chunk


def start_watch(conf: Path, *args: str, stdout: int, stderr: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "services.cli", "status", "--watch", "0.2", *args, "--conf", str(conf)]
    # SIGINT back to its default in the child: a shell without job control starts
    # background jobs (a CI run under nohup) with SIGINT ignored, and Python then installs
    # no KeyboardInterrupt for it — the Ctrl-C of interrupt() would never arrive
    return subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(proc: subprocess.Popen) -> int:
    """Ctrl-C: SIGINT to the watching process; its exit code."""
    proc.send_signal(signal.SIGINT)
    return proc.wait(HANG_TIMEOUT)


def test_watch_on_a_terminal_redraws_in_place(tmp_path: Path) -> None:
    conf, _, _ = make(tmp_path)
    master, slave = pty.openpty()
    proc = start_watch(conf, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        clear = CLEAR.encode()
        shown = read_until(master, lambda data: data.count(clear) >= 2)
        code = interrupt(proc)
        shown += read_to_end(master)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = shown.decode("utf-8", "replace")
    assert code == 3, text  # the last report's code: nothing runs
    assert text.startswith(CLEAR) and "every 0.2s — Ctrl-C to stop" in text
    assert text.count("DicomFlow  spool") == text.count(CLEAR)  # one report per redraw
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


def watch_piped(conf: Path, enough: Callable[[bytes], bool], *args: str) -> tuple[bytes, bytes, int]:
    """``status --watch 0.2`` on pipes until ``enough`` of its output, then Ctrl-C: what
    it wrote to stdout and stderr, and its exit code."""
    proc = start_watch(conf, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        out = read_until(proc.stdout.fileno(), enough)
        code = interrupt(proc)
        return out + proc.stdout.read(), proc.stderr.read(), code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.e2e
def test_watch_on_a_pipe_prints_plain_reports(tmp_path: Path, daemons) -> None:
    conf, _, _ = make(tmp_path)
    daemons(conf, "filter")
    out, err, code = watch_piped(conf, lambda data: data.count(b"DicomFlow  spool") >= 2)
    assert code == 4, (out, err)  # the last report's: the filter runs, receive and the sender not
    assert b"\x1b" not in out and b"Ctrl-C" not in out
    first = out.split(b"DicomFlow  spool")[1]
    assert b"  journal  " in first and first.endswith(b" days\n\n")  # the whole report, a blank line
    assert err == b"", err


def test_watch_json_prints_one_document_per_line(tmp_path: Path) -> None:
    conf, _, _ = make(tmp_path)
    out, err, code = watch_piped(conf, lambda data: data.count(b"\n") >= 2, "--json")
    assert code == 3 and err == b"", err
    lines = out.decode().splitlines()
    reports = [json.loads(line) for line in lines[:2]]  # an interrupted last line may be cut
    assert all(set(report) == REPORT_KEYS for report in reports)
    assert b"\x1b" not in out
