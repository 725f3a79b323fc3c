"""Example 03 (two sites over WireGuard in network namespaces) run as a user runs it,
as root: its own checks, the state files it leaves behind, and that ``stop.sh`` removes
everything — after a complete run and after an interrupted one; and the WAN's UDP delay
relay on its own, over loopback (no root needed).

Marked ``slow`` but deliberately not ``e2e``: the DicomFlow daemons it starts are the
ones the e2e tests already run both ways (``DICOMFLOW_FASTPATH=0`` included); what this
test adds is the topology (namespaces, WireGuard, the slowed WAN), and running its ~3
minutes twice would only lengthen CI (README, Examples). The window is the short cyclic
``m2 < 1`` (open in even minutes), so the run waits at most about two minutes for it;
``DICOMFLOW_TEST_SCALE`` scales the study size.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import HANG_TIMEOUT, IN_CI, REPO, require_binary, wait_for

# Both tests use the same namespace names: pyproject's ``--dist loadfile`` runs them on
# one xdist worker, one after the other.
pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "03-two-sites"
PREFIX = "df3-"
SCALE = float(os.environ.get("DICOMFLOW_TEST_SCALE", "1") or 1)
IMAGES = max(2, round(4 * SCALE))


def require_root() -> None:
    """Namespaces, veths and tc need root: CI runs as root, so there it must fail."""
    if os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("tests/test_two_sites.py needs root in CI (network namespaces)")
    pytest.skip("needs root (network namespaces)")


def environment(work: Path) -> dict[str, str]:
    """This interpreter's venv and this checkout's code, in the example and its daemons."""
    return {**os.environ, "WORK": str(work), "VENV": str(Path(sys.executable).parent.parent),
            "PYTHONPATH": str(REPO), "WINDOW": "m2 < 1", "IMAGES": str(IMAGES),
            "WAIT_LIMIT": "300"}


def stop(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(EXAMPLE / "stop.sh")], capture_output=True, text=True,
                          timeout=120, env=environment(work))


def leftovers(work: Path) -> list[str]:
    """Whatever of the example is still on the host: namespaces, links, sockets, processes."""
    found = [f"netns {line.split()[0]}" for line in
             subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
             if line.startswith(PREFIX)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {line.split(': ')[1]}" for line in links.splitlines()
              if line.split(": ")[1].startswith(PREFIX)]
    host = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    found += [f"host network: {line.strip()}" for line in host.splitlines() if "198.18." in line]
    wg = Path("/var/run/wireguard")
    found += [f"socket {p}" for p in (wg.glob(f"{PREFIX}*") if wg.is_dir() else [])]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work) in args or "udp_delay.py" in args or f"wireguard-go {PREFIX}" in args:
            found.append(f"process {proc.name}: {args[:200]}")
    return found


@pytest.fixture
def work(tmp_path: Path):
    require_root()
    for binary in ("/usr/bin/wireguard-go", "/usr/bin/wg", "/usr/sbin/Orthanc", "/usr/sbin/tc"):
        require_binary(binary)
    work = tmp_path / "w"
    yield work
    stop(work)


def test_stop_after_an_interrupted_run(work: Path) -> None:
    """run.sh killed once DicomFlow is up (everything started, nothing waited for):
    stop.sh still finds and removes all of it."""
    work.mkdir(parents=True)
    log = work.parent / "run.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(EXAMPLE / "run.sh")], stdout=out, stderr=subprocess.STDOUT,
                                env=environment(work), start_new_session=True)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"run.sh ended early:\n{log.read_text()[-3000:]}")
                return "dicomflow: up" in log.read_text()

            wait_for(up, timeout=180, interval=0.2, message="run.sh to start DicomFlow")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert leftovers(work), "nothing was running to be interrupted"
    result = stop(work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert leftovers(work) == []


def test_two_sites(work: Path) -> None:
    result = subprocess.run(["bash", str(EXAMPLE / "run.sh")], capture_output=True, text=True,
                            timeout=600, env=environment(work))
    assert result.returncode == 0, f"run.sh failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"
    assert "OK: the archive got both studies at once" in result.stdout

    # 1. outside the window: site B's copies wait, the archive's do not
    outside = json.loads((work / "status-outside-window.json").read_text())["endpoints"]
    assert outside["siteb"]["state"] == "outside_window"
    assert outside["siteb"]["next_open"] is not None
    assert outside["siteb"]["outbox"]["count"] == IMAGES  # the CT images, not the report
    assert outside["archive"]["outbox"]["count"] == 0

    # 3. the WAN cut: site B down, its queue held, no file charged
    down = json.loads((work / "status-wan-down.json").read_text())["endpoints"]["siteb"]
    assert down["state"] == "down", down
    assert down["outbox"]["count"] == IMAGES
    assert down["failed"]["count"] == 0
    before = json.loads((work / "retry-before-cut.json").read_text()).get("files", {})
    during = json.loads((work / "retry-during-cut.json").read_text()).get("files", {})
    assert before == during == {}

    # the end: every copy delivered once, nothing set aside
    spool = work / "spool"
    assert len(list((spool / "sent" / "siteb").glob("*.dcm"))) == 2 * IMAGES
    assert len(list((spool / "sent" / "archive").glob("*.dcm"))) == 2 * (IMAGES + 1)
    for stage in ("failed/siteb", "failed/archive", "quarantine", "rejected"):
        assert not any((spool / stage).glob("*.dcm")), stage

    result = stop(work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert leftovers(work) == []


def udp_pair() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(HANG_TIMEOUT)
    return sock, sock.getsockname()[1]


def free_udp_port() -> int:
    sock, port = udp_pair()
    sock.close()
    return port


@pytest.mark.parametrize("queue", [20000, 3])
def test_udp_delay_relay(queue: int) -> None:
    """The WAN's relay (no root needed): each direction held at least the delay, from
    the far side's socket to the far peer; a full queue drops, never blocks."""
    peer1, port1 = udp_pair()
    peer2, port2 = udp_pair()
    side1, side2 = free_udp_port(), free_udp_port()
    relay = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "udp_delay.py"), "--delay", "0.5", "--queue", str(queue),
         f"127.0.0.1:{side1}=127.0.0.1:{port1}", f"127.0.0.1:{side2}=127.0.0.1:{port2}"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout is not None and "udp_delay:" in relay.stdout.readline()
        for source, target, listen, far in ((peer1, peer2, side1, side2), (peer2, peer1, side2, side1)):
            sent = time.monotonic()
            for index in range(6):
                source.sendto(b"datagram %d" % index, ("127.0.0.1", listen))
            payload, origin = target.recvfrom(65535)
            assert time.monotonic() - sent >= 0.5
            assert (payload, origin) == (b"datagram 0", ("127.0.0.1", far))
            received = [payload]
            target.settimeout(2.0)  # the rest are due at once; then only silence is left
            with contextlib.suppress(TimeoutError):
                while True:
                    received.append(target.recvfrom(65535)[0])
            target.settimeout(HANG_TIMEOUT)
            assert received == [b"datagram %d" % i for i in range(min(6, queue))]
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(HANG_TIMEOUT)
        peer1.close()
        peer2.close()
    assert relay.returncode == 0
