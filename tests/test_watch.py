"""``pipeline.watch``: is a file still open for writing? (lease, then /proc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import watch

HOLD = "import sys; f = open(sys.argv[1], sys.argv[2]); print('open', flush=True); sys.stdin.readline()"


@pytest.fixture(params=["lease", "proc"])
def probe(request, monkeypatch):
    """Both ways of telling: the read lease, and the /proc scan used where no lease is granted."""
    if request.param == "proc":
        monkeypatch.setattr(watch, "_lease_probe", lambda path: None)
    return watch.open_for_writing


@pytest.mark.parametrize("mode", ["ab", "r+b"])
def test_defect14_a_writer_is_seen_until_it_closes(tmp_path: Path, probe, mode: str) -> None:
    path = tmp_path / "file.dcm"
    path.write_bytes(b"half")
    assert probe(path) is False
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert probe(path) is True
        assert watch.writer_pids(path) == [holder.pid]
    finally:
        holder.communicate("\n", timeout=60)
    assert probe(path) is False


def test_defect14_a_reader_is_not_a_writer(tmp_path: Path, probe) -> None:
    path = tmp_path / "file.dcm"
    path.write_bytes(b"whole")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "rb"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert probe(path) is False and watch.writer_pids(path) == []
    finally:
        holder.communicate("\n", timeout=60)


def test_writer_pids_without_proc(tmp_path: Path) -> None:
    path = tmp_path / "file.dcm"
    path.write_bytes(b"x")
    assert watch.writer_pids(path, proc=tmp_path / "no-proc") is None


LEASE_BREAK = """
import os, subprocess, sys, time
from pipeline.watch import take_read_lease
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
assert take_read_lease(fd)
writer = subprocess.Popen([sys.executable, "-c", f"open({path!r}, 'ab').write(b'more')"])
deadline = time.monotonic() + 30
while "BREAKING" not in open("/proc/locks").read():  # the writer's open breaks our lease
    assert time.monotonic() < deadline and writer.poll() is None, "the lease was never broken"
    time.sleep(0.01)
os.close(fd)
assert writer.wait(60) == 0
print("alive")
"""


def test_defect14_a_lease_break_never_kills_the_filter(tmp_path: Path) -> None:
    """A writer opening the file during the probe's lease signals us: not with a deadly SIGIO."""
    path = tmp_path / "file.dcm"
    path.write_bytes(b"half")
    result = subprocess.run([sys.executable, "-c", LEASE_BREAK, str(path)], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout.strip() == "alive", result.stderr
    assert path.read_bytes() == b"halfmore"
