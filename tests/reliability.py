"""Shared pieces of the reliability suite (issue 6): the whole pipeline as real
subprocesses, DCMTK senders whose acknowledgements are parsed file by file, a raw
DICOM client for what a normal SCU refuses to send, memory sampling, a small spool
filesystem, and the figures printed at the end of the run (tests/conftest.py).

Sizes scale with ``DICOMFLOW_TEST_SCALE`` (default 1; e.g. 0.25 in a slow CI); every
scenario runs at any scale.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from tests.helpers import IN_CI, Daemon, dcmtk, dicom_files, router_port, wait_for, write_conf
from tests.peers import TCP_ENV, StoreSCP

SCALE = float(os.environ.get("DICOMFLOW_TEST_SCALE", "1") or 1)


def scaled(count: int, minimum: int = 1) -> int:
    return max(minimum, int(count * SCALE))


# -- figures ---------------------------------------------------------------------------

FIELDS = ("sent", "acknowledged", "delivered", "duplicated", "quarantined", "refused", "lost")
FIGURES: dict[str, Counter] = {}
QUARANTINE_REASONS: Counter = Counter()


def record(scenario: str, **counts: int) -> None:
    """Add to a scenario's figures (printed by the terminal summary hook)."""
    figures = FIGURES.setdefault(scenario, Counter())
    for key, value in counts.items():
        assert key in FIELDS, key
        figures[key] += value


def record_quarantine(spool_root: Path) -> int:
    """Count quarantined files by the first line of their reason; returns how many."""
    count = 0
    for reason in sorted((spool_root / "quarantine").glob("*.reason")):
        first = reason.read_text(errors="replace").splitlines()[0] if reason.stat().st_size else "?"
        QUARANTINE_REASONS[re.sub(r"[0-9a-f]{8,}|\d+", "N", first)[:90]] += 1
        count += 1
    return count


def summary_lines() -> list[str]:
    if not FIGURES:
        return []
    width = max(len(name) for name in FIGURES) + 2
    lines = ["scenario".ljust(width) + "".join(f"{f:>13}" for f in FIELDS)]
    total: Counter = Counter()
    for name, figures in FIGURES.items():
        total.update(figures)
        lines.append(name.ljust(width) + "".join(f"{figures[f]:>13}" for f in FIELDS))
    lines.append("TOTAL".ljust(width) + "".join(f"{total[f]:>13}" for f in FIELDS))
    if QUARANTINE_REASONS:
        lines.append("quarantined, by reason:")
        lines += [f"  {count:>5}  {reason}" for reason, count in QUARANTINE_REASONS.most_common()]
    return lines


# -- the pipeline ------------------------------------------------------------------------

def endpoint_section(peer: StoreSCP, **extra: object) -> dict:
    return {"endpoint": {"host": "127.0.0.1", "port": peer.port, "ae_title": peer.ae_title,
                         "idle_release": "2s", "connect_timeout": "5s", **extra},
            "retry": {"probe_backoff_cap": "1s", "probe_backoff": "0.2s"}}


class Pipeline:
    """receive → filter → send-pacs as ``dicomflow`` subprocesses, delivering to a DCMTK
    storescp; everything under one test directory."""

    NAMES = ("receive", "filter", "send")

    def __init__(self, base: Path, router: dict | None = None, filter_: dict | None = None,
                 tls: dict | None = None, spool: Path | None = None,
                 peer_extra: tuple[str, ...] = ()) -> None:
        self.base = base
        self.peer = StoreSCP(base / "dest", ae_title="PACS", extra=peer_extra)
        router = {"log_level": "INFO", **(router or {})}
        if spool is not None:
            router["spool"] = str(spool)
        self.conf = write_conf(base, router=router, filter_=filter_, tls=tls,
                               endpoints={"pacs": endpoint_section(self.peer)})
        self.spool = spool or base / "spool"
        self.port = router_port(self.conf)
        self.daemons: dict[str, Daemon] = {}
        self.generation = Counter()

    def start(self, *names: str) -> Pipeline:
        if self.peer.proc is None:
            self.peer.start()
        for name in names or self.NAMES:
            self.restart(name)
        return self

    def restart(self, name: str) -> Daemon:
        args = ("send", "pacs") if name == "send" else (name,)
        self.generation[name] += 1
        daemon = Daemon(self.conf, *args, log_name=f"{name}-{self.generation[name]}").start()
        self.daemons[name] = daemon
        daemon.wait_log({"receive": "listening as", "filter": "filter ready",
                         "send": "sender started"}[name])
        return daemon

    def kill(self, name: str) -> None:
        self.daemons[name].kill()

    def all_alive(self) -> bool:
        return all(d.alive() for d in self.daemons.values())

    def assert_alive(self) -> None:
        for name, daemon in self.daemons.items():
            assert daemon.alive(), f"{name} died:\n{daemon.log()[-3000:]}"

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.base.glob("*.log")))

    def stop(self) -> dict[str, int]:
        codes: dict[str, int] = {}
        try:
            for name, daemon in self.daemons.items():
                try:
                    codes[name] = daemon.stop()
                except AssertionError:  # ignored SIGTERM: it was killed; report it
                    codes[name] = -9
        finally:
            self.peer.stop()
        return codes

    # -- what is where -------------------------------------------------------------------

    def stage(self, *parts: str) -> list[Path]:
        return dicom_files(self.spool.joinpath(*parts))

    def drained(self) -> bool:
        return not (self.stage("incoming") or self.stage("accepted") or self.stage("outbox", "pacs"))

    def delivered(self) -> Counter:
        """SOP Instance UIDs at the destination, with their multiplicity."""
        return destination_uids(self.peer.directory)


_UID_CACHE: dict[tuple[str, int, int], str] = {}


def destination_uids(directory: Path) -> Counter:
    """SOP Instance UIDs of the files a storescp wrote (cached by name, size and mtime)."""
    found: Counter = Counter()
    if not directory.is_dir():
        return found
    for entry in os.scandir(directory):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        st = entry.stat()
        key = (entry.path, st.st_size, st.st_mtime_ns)
        uid = _UID_CACHE.get(key)
        if uid is None:
            try:
                uid = str(dcmread(entry.path, stop_before_pixels=True).SOPInstanceUID)
            except Exception:  # noqa: BLE001 - storescp still writing it: next poll
                continue
            _UID_CACHE[key] = uid
        found[uid] += 1
    return found


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- DCMTK senders with per-file acknowledgement -------------------------------------------

_SENDING = re.compile(r"^I: Sending file: (.*)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.*)\)")


def acknowledged(output: str) -> list[str]:
    """Files that storescu's verbose output shows answered with Success, in order.

    A file counts as acknowledged only if a "Received Store Response (Success)" follows
    its own "Sending file" line before the next file starts: a batch cut short by an
    abort or a dead receiver leaves its remaining files unacknowledged.
    """
    acked, current = [], None
    for line in output.splitlines():
        sending = _SENDING.match(line)
        if sending:
            current = sending.group(1)
            continue
        response = _RESPONSE.match(line)
        if response and current is not None:
            if response.group(1) == "Success":
                acked.append(current)
            current = None
    return acked


def storescu_acked(port: int, files: Iterable[Path], calling: str = "STORESCU",
                   called: str = "DICOMFLOW", extra: tuple[str, ...] = (),
                   timeout: float = 600) -> tuple[list[Path], subprocess.CompletedProcess]:
    """Send with DCMTK storescu (``-v -nh``: verbose, go on after a refusal); return the
    files acknowledged with Success and the completed process."""
    files = list(files)
    cmd = [dcmtk("storescu"), "-v", "-nh", "-aet", calling, "-aec", called, *extra,
           "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **TCP_ENV})
    by_name = {str(p): p for p in files}
    return [by_name[name] for name in acknowledged(result.stdout + result.stderr)], result


def refused_stores(output: str) -> int:
    return sum(1 for m in _RESPONSE.finditer(output) if m.group(1) != "Success") + len(
        re.findall(r"Association Rejected", output))


# -- memory ----------------------------------------------------------------------------------

def rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    """Resident memory of a process in KiB (``VmHWM`` for its peak so far)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class RssSampler:
    """Samples VmRSS of some processes in a thread, tagged with a progress value."""

    def __init__(self, pids: dict[str, int], progress, interval: float = 0.2) -> None:
        self.pids = pids
        self.progress = progress
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            progress = self.progress()
            for name, pid in self.pids.items():
                rss = rss_kib(pid)
                if rss is not None:
                    self.samples[name].append((progress, rss))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- a small filesystem for the spool ----------------------------------------------------------

@contextmanager
def tmpfs(path: Path, size_mib: int):
    """Mount a tmpfs of ``size_mib`` at ``path`` (root only) for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs",
                             str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        message = f"cannot mount a tmpfs (root needed): {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- a raw DICOM upper-layer client --------------------------------------------------------------

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _uid(value: str | bytes) -> bytes:
    data = value.encode("latin-1") if isinstance(value, str) else value
    return data + (b"\0" if len(data) % 2 else b"")


def associate_rq(called: bytes = b"DICOMFLOW", calling: bytes = b"RAWSCU",
                 contexts: Iterable[tuple[int, str, tuple[str, ...]]] = ((1, CT, (EXPLICIT_LE,)),),
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU, with AE titles given as raw bytes (padded to 16)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16, b" ")[:16] + calling.ljust(16, b" ")[:16]
    body += b"\0" * 32 + _item(0x10, APP_CONTEXT)
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _uid("1.2.826.0.1.3680043.9.9999"))
    body += _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, data: bytes, command: bool, last: bool = True) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, (1 if command else 0) | (2 if last else 0))
    pdv += data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def c_store_rq(sop_class: str | bytes, sop_instance: str | bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian), UIDs as given (even hostile)."""
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, tag, len(value)) + value

    body = element(0x0002, _uid(sop_class)) + element(0x0100, struct.pack("<H", 0x0001))
    body += element(0x0110, struct.pack("<H", message_id)) + element(0x0700, struct.pack("<H", 0))
    body += element(0x0800, struct.pack("<H", 0x0000)) + element(0x1000, _uid(sop_instance))
    return element(0x0000, struct.pack("<I", len(body))) + body


def encode_dataset(ds: Dataset, implicit: bool = False) -> bytes:
    """A dataset body (no preamble, no file meta) as it travels in P-DATA."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


class RawAssociation:
    """One TCP connection speaking the DICOM upper layer by hand."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None when the peer closed the connection."""
        head = self._read(6)
        if head is None:
            return None
        kind, _, length = struct.unpack(">BBI", head)
        body = self._read(length)
        return (kind, body or b"") if body is not None or length == 0 else None

    def _read(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def associate(self, **kwargs) -> int:
        """Send an A-ASSOCIATE-RQ; return the answer's PDU type (2 accept, 3 reject, 7 abort,
        0 for a closed connection)."""
        self.send(associate_rq(**kwargs))
        answer = self.read_pdu()
        return 0 if answer is None else answer[0]

    def store(self, command: bytes, dataset: bytes, context_id: int = 1) -> int | str:
        """Send one C-STORE; return its status, or ``"abort"``/``"closed"``."""
        try:
            self.send(p_data(context_id, command, command=True))
            self.send(p_data(context_id, dataset, command=False))
        except OSError:
            return "closed"
        return self.response()

    def response(self) -> int | str:
        while True:
            answer = self.read_pdu()
            if answer is None:
                return "closed"
            kind, body = answer
            if kind == 0x07:
                return "abort"
            if kind != 0x04:
                continue
            data = body[6:]  # one PDV: length(4), context(1), control(1)
            ds = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
            return int(ds[0x00000900].value)

    def release(self) -> None:
        try:
            self.send(struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0")
            self.read_pdu()
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def established(port: int, timeout: float = 60.0, **kwargs) -> RawAssociation:
    """An accepted raw association, retrying while the receiver is busy (a slot still
    held by a connection it has just refused or aborted)."""
    def attempt() -> RawAssociation | None:
        conn = RawAssociation(port)
        if conn.associate(**kwargs) == 2:
            return conn
        conn.close()
        return None

    return wait_for(attempt, timeout, interval=0.1, message="an accepted association")  # type: ignore


def wait_closed(conn: RawAssociation, timeout: float = 60.0) -> None:
    """Wait until the server closes (or aborts) a connection."""
    conn.sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            answer = conn.read_pdu()
            if answer is None or answer[0] == 0x07:
                return
    except TimeoutError:
        pass
    raise AssertionError(f"the server kept a silent connection open for {timeout:.0f}s")

