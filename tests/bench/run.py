"""DicomFlow benchmark: DicomFlow side by side with what a site would use instead.

One command (from the repository root)::

    .venv/bin/python -m tests.bench.run            # the full run (study sizes 500 and 2,000; 1, 4, 8 senders)
    .venv/bin/python -m tests.bench.run --quick    # smaller data, one round
    .venv/bin/python -m tests.bench.run --only throughput --counts 500 --parallel 1,4 --wan-delay 20ms

It generates its own data in a temp folder (CT images 512×512×16 bit ≈ 0.5 MB, one
1 GiB multi-frame object, 100,000 small ≈ 2 KB objects), then measures, on the same
data and in the same run, with ``TCP_NODELAY=1`` in the environment of every DCMTK
process (Orthanc and the relays' children included), TCP_NODELAY on every Python
socket, and ``-pdu 131072`` on every ``storescp`` (the destination and the relays):

* throughput, end to end (first ``storescu`` start → last file complete at the
  destination), one table per study size (``--counts``) and number of ``storescu``
  sending at once (``--parallel``; each sends its own study, the rate is the
  aggregate): DCMTK storescu → DCMTK storescp directly; → a minimal stock pynetdicom
  SCP directly; → Orthanc with a Lua ``OnStoredInstance`` → ``SendToModality``
  auto-routing script → storescp; → a DCMTK study relay (``storescp -su``, then
  ``dcmsend +sd #p`` one second after the study's end: what mercure is inside) →
  storescp; → a DCMTK per-file relay (``storescp --exec-on-reception "storescu #p/#f"``)
  → storescp; → DicomFlow (receive → filter → send) → storescp, also with its
  endpoint coercing two attributes (``dicomflow-coerced``: each copy its own shaped
  file, written by the filter); with ``--wan-delay``
  also DCMTK direct and DicomFlow with the delay relay (``delay_proxy``) in front of
  the destination, DicomFlow both over one association and with ``[endpoint]
  associations = 4`` (``dicomflow-wan-a4``; ``dicomflow-a4`` is the same without the
  delay, on request with ``--systems``). Images/s, MB/s, the ratio to the direct DCMTK hop, and the CPU
  per image (user + system from /proc) of the processes in between (for the direct
  rows: of the receiving storescp and its per-association children; for the DCMTK
  relays: of the relay storescp and every child it ran, reaped or not);
* the cost of coercion: the filter daemon alone, CPU per image with a plain endpoint
  (a hard link) and with a coerced one (its own shaped file), interleaved rounds
  (:mod:`tests.bench.shaping`);
* DicomFlow's added latency for a single image (p50/p95 over N singles, minus the
  median of the same single sent directly);
* the time from a down destination coming back to the first delivery;
* each daemon's peak RSS (VmHWM) while a 1 GiB object goes through;
* ``dicomflow status`` time and the sender's drain rate with 100,000 small files
  queued, against the rate with a small queue.

Rates are medians over ``--runs`` interleaved rounds (each round runs every system
once, in turn). Bandwidth caps are not applied (loopback is shared with everything
else on the machine); to add one by hand, as root: ``tc qdisc add dev lo root tbf rate
1gbit burst 1mb latency 50ms`` (and ``tc qdisc del dev lo root`` after).
Nothing here is a test: it measures and prints; it asserts no speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

from pipeline.spool_names import SpoolName
from tests.helpers import (
    REPO,
    Daemon,
    free_port,
    make_dataset,
    wait_port,
    write_conf,
    write_dataset,
    write_key,
)
from tests.peers import terminate

TCP_ENV = {"TCP_NODELAY": "1"}
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
DCMSEND = "/usr/bin/dcmsend"
ORTHANC = "/usr/sbin/Orthanc"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
DEST_AET = "STORESCP"
RELAY_AET = "RELAY"
MAX_PDU = "131072"              # every storescp: the destination and the DCMTK relays

LUA_AUTOROUTE = """\
-- Orthanc auto-routing, as in Orthanc's own sample (Samples/Lua/AutoRouting.lua)
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'dest')
end
"""


# -- small utilities -------------------------------------------------------------------

def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fp:
        fields = fp.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fp:
        return fp.read().rsplit(")", 1)[1].split()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and everything it started, reaped or not.

    A DCMTK relay runs its work in exec'd children (``dcmsend``, ``storescu``) and
    reaps them: a reaped child's CPU is in the parent's cutime/cstime; a child not yet
    reaped (running, or a zombie) is still in /proc with its own counters.
    """
    total = 0.0
    for each in (pid, *descendants(pid)):
        try:
            fields = _stat_fields(each)
        except OSError:
            continue  # gone between the listing and the read (reaped: now in its parent's)
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    return total


def busy_descendants(pid: int) -> list[int]:
    """Children still running (zombies — state Z — have finished their work)."""
    busy = []
    for each in descendants(pid):
        try:
            if _stat_fields(each)[0] != "Z":
                busy.append(each)
        except OSError:
            continue
    return busy


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fp:
        for line in fp:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# -- data ----------------------------------------------------------------------------

@dataclass
class DataSet:
    files: list[Path]
    dataset_bytes: int          # bytes after the file meta (what every destination stores)
    total_bytes: int            # file sizes

    @property
    def count(self) -> int:
        return len(self.files)


def _dataset_bytes(path: Path) -> int:
    meta = read_file_meta_info(path)
    meta_length = int(meta.FileMetaInformationGroupLength) + 12
    return path.stat().st_size - 132 - meta_length


def make_ct_series(directory: Path, count: int, size: int) -> DataSet:
    directory.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    files = []
    for index in range(count):
        ds = make_dataset(rows=size, cols=size, study_uid=study, patient_name="BENCH^CT",
                          patient_id="BENCH01")
        ds.InstanceNumber = index + 1
        files.append(write_dataset(ds, directory / f"ct{index:05d}.dcm"))
    per_file = _dataset_bytes(files[0])
    return DataSet(files, per_file * count, sum(p.stat().st_size for p in files))


def make_studies(directory: Path, count: int, senders: int, size: int) -> list[DataSet]:
    """``count`` images as ``senders`` studies of (nearly) equal size, one per sender."""
    return [make_ct_series(directory / f"study{index}", count // senders + (index < count % senders), size)
            for index in range(senders)]


def combined(sets: list[DataSet]) -> DataSet:
    return DataSet([f for s in sets for f in s.files], sum(s.dataset_bytes for s in sets),
                   sum(s.total_bytes for s in sets))


def make_big_object(path: Path, mib: int) -> DataSet:
    """A multi-frame CT of ``mib`` MiB of pixel data, written without holding it in memory."""
    frames = max(1, mib * 1024 * 1024 // (512 * 512 * 2))
    ds = make_dataset(rows=512, cols=512, patient_name="BENCH^BIG", patient_id="BENCH02")
    del ds.PixelData
    ds.NumberOfFrames = frames
    write_dataset(ds, path)
    length = frames * 512 * 512 * 2
    block = os.urandom(1024 * 1024)
    with open(path, "ab") as fp:
        fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            chunk = block[: min(left, len(block))]
            fp.write(chunk)
            left -= len(chunk)
    return DataSet([path], _dataset_bytes(path), path.stat().st_size)


def make_small_template() -> tuple[bytes, bytes]:
    """A ≈2 KB object and its SOP Instance UID (to be replaced by same-length UIDs)."""
    uid = "1.2.826.0.1.3680043.8.498." + "1" * 30
    ds = make_dataset(rows=30, cols=30, patient_name="BENCH^SMALL", patient_id="BENCH03")
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dataset(ds, Path(tmp) / "small.dcm")
        return path.read_bytes(), uid.encode()


def fill_small_queue(directory: Path, count: int, template: tuple[bytes, bytes], start: int) -> None:
    """``count`` small files with distinct UIDs, named as the spool names them."""
    data, uid = template
    directory.mkdir(parents=True, exist_ok=True)
    prefix = uid[: len(uid) - 12]
    second = datetime.now(UTC).replace(microsecond=0)
    for index in range(start, start + count):
        new_uid = prefix + b"%012d" % index
        stamp = second.replace(microsecond=index % 1_000_000)
        name = str(SpoolName(stamp, index % 1_000_000, new_uid.decode()))
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data.replace(uid, new_uid))
        finally:
            os.close(fd)


# -- peers -----------------------------------------------------------------------------

class Destination:
    """DCMTK storescp, the destination of every route (and the direct DCMTK row).

    ``--fork`` (a child per association) so that the associations of parallel senders,
    of the per-file relay's ``storescu`` children and of a study relay's ``dcmsend``
    overlapping the next study are served at once rather than queued behind each other.
    """

    def __init__(self, base: Path, port: int | None = None) -> None:
        self.base = base
        self.port = port or free_port()
        self.directory = base / f"dest-{self.port}-{time.monotonic_ns()}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Destination:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [STORESCP, "--fork", "-aet", DEST_AET, "-od", str(self.directory), "+uf", "+B", "-dhl",
               "-pdu", MAX_PDU, str(self.port)]
        self._log = open(self.base / f"storescp-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **TCP_ENV})
        if wait:
            wait_port(self.port)
        return self

    def count(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.directory) if not e.name.startswith("."))
        except FileNotFoundError:
            return 0

    def bytes(self) -> int:
        return sum(e.stat().st_size for e in os.scandir(self.directory))

    def complete(self, count: int, dataset_bytes: int, base_count: int = 0, base_bytes: int = 0) -> bool:
        """All ``count`` files there and written (storescp writes in place: check sizes)."""
        return (self.count() >= base_count + count
                and self.bytes() >= base_bytes + dataset_bytes + 132 * count)

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def storescu(port: int, files: list[Path], called: str, timeout: float = 3600) -> None:
    storescu_all(port, [files], called, timeout)


def storescu_all(port: int, sets: list[list[Path]], called: str, timeout: float = 3600) -> None:
    """One ``storescu`` per set, all at once (modalities sending in parallel), until all end.

    ``-ta`` (ACSE timeout) is long because a DCMTK relay serves one association at a
    time: a sender may wait for the one before it to finish before it is accepted.
    """
    procs = []
    for files in sets:
        cmd = [STORESCU, "-ta", str(int(timeout)), "-aet", "MODALITY", "-aec", called, "127.0.0.1",
               str(port), *map(str, files)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, **TCP_ENV}))
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failures.append(f"storescu failed ({proc.returncode}): {err[-2000:]}")
    if failures:
        raise RuntimeError("\n".join(failures))


class DcmtkRelay:
    """A relay built from DCMTK alone: a ``storescp`` that forwards what it stores.

    ``per_study`` — what mercure is inside: files sorted into a folder per Study
    Instance UID (``-su``); one second after the study's last association
    (``--eostudy-timeout 1``) ``dcmsend +sd #p`` sends the study's folder. Otherwise
    per file: ``--exec-on-reception`` runs ``storescu #p/#f`` for each stored file.
    Both run their command in a child without waiting for it, and serve one
    association at a time (``--exec-on-eostudy`` is not allowed with ``--fork``; the
    per-file relay is kept alike). Its CPU is the storescp's and its children's.
    """

    def __init__(self, base: Path, dest_port: int, per_study: bool) -> None:
        self.port = free_port()
        self.base = base
        self.directory = base / f"relay-{self.port}-{time.monotonic_ns()}"
        self.dest_port = dest_port
        self.per_study = per_study
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [STORESCP, "-aet", RELAY_AET, "-od", str(self.directory), "-pdu", MAX_PDU]
        to_dest = f"-aet {RELAY_AET} -aec {DEST_AET} 127.0.0.1 {self.dest_port}"
        if self.per_study:
            cmd += ["-su", "study", "--eostudy-timeout", "1",
                    "--exec-on-eostudy", f"{DCMSEND} {to_dest} +sd #p"]
        else:
            cmd += ["--exec-on-reception", f"{STORESCU} {to_dest} #p/#f"]
        return [*cmd, str(self.port)]

    def start(self) -> DcmtkRelay:
        self.directory.mkdir(parents=True)
        self._log = open(self.base / f"relay-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **TCP_ENV})
        wait_port(self.port)
        return self

    def pid(self) -> int:
        assert self.proc is not None, "relay not started"
        return self.proc.pid

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid())

    def settle(self) -> None:
        """Wait for the children still finishing (releasing their association) to end."""
        wait_until(lambda: not busy_descendants(self.pid()), 120, 0.01, "the relay's children")

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc is not None:
            self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class DelayProxy:
    """``tests.bench.delay_proxy`` in front of a port: a link with ``delay`` s each way."""

    def __init__(self, base: Path, target_port: int, delay: float) -> None:
        self.port = free_port()
        self.base = base
        self.target_port = target_port
        self.delay = delay
        self.proc: subprocess.Popen | None = None

    def start(self) -> DelayProxy:
        self._log = open(self.base / f"delay-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.bench.delay_proxy", "--delay",
                                      str(self.delay), "--target", f"127.0.0.1:{self.target_port}",
                                      str(self.port)], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc is not None:
            self._log.close()


class PynetdicomSCP:
    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.directory = base / f"pynetdicom-{self.port}"
        self.base = base
        self.proc: subprocess.Popen | None = None

    def start(self) -> PynetdicomSCP:
        self.directory.mkdir(parents=True)
        self._log = open(self.base / f"pynetdicom-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.bench.pynetdicom_scp", str(self.port),
                                      str(self.directory)], cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def count(self) -> int:
        return sum(1 for e in os.scandir(self.directory) if not e.name.startswith("."))

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc is not None:
            self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class OrthancRouter:
    """Orthanc with the Lua auto-routing script, forwarding to ``dest``."""

    def __init__(self, base: Path, dest_port: int) -> None:
        self.base = base / f"orthanc-{time.monotonic_ns()}"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.dest_port = dest_port
        self.proc: subprocess.Popen | None = None

    def start(self) -> OrthancRouter:
        self.base.mkdir(parents=True)
        lua = self.base / "autoroute.lua"
        lua.write_text(LUA_AUTOROUTE)
        config = {
            "Name": "ORTHANC", "DicomAet": "ORTHANC",
            "StorageDirectory": str(self.base / "storage"), "IndexDirectory": str(self.base / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {"dest": [DEST_AET, "127.0.0.1", self.dest_port]},
            "LuaScripts": [str(lua)], "Plugins": [], "SaveJobs": False,
            "DicomScpTimeout": 60, "StorageCompression": False,
        }
        (self.base / "orthanc.json").write_text(json.dumps(config, indent=2))
        self._log = open(self.base / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([ORTHANC, str(self.base / "orthanc.json")], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **TCP_ENV})
        wait_port(self.dicom_port)
        wait_port(self.http_port)
        return self

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc is not None:
            self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)


class DicomFlow:
    """receive, filter and one sender as three daemon subprocesses (what supervisord runs)."""

    DAEMONS = ("receive", "filter", "send")

    def __init__(self, base: Path, dest_port: int, extra_endpoint: dict | None = None,
                 env: dict | None = None, shaping: dict[str, dict] | None = None) -> None:
        self.env = env
        self.base = base / f"dicomflow-{time.monotonic_ns()}"
        self.base.mkdir(parents=True)
        endpoint = {"host": "127.0.0.1", "port": dest_port, "ae_title": DEST_AET}
        endpoint.update(extra_endpoint or {})
        sections: dict[str, dict] = {"endpoint": endpoint, **(shaping or {})}
        self.conf = write_conf(self.base, router={"log_level": "INFO"},
                               endpoints={"dest": sections})
        if "deidentify" in sections:
            write_key(self.conf, sections["deidentify"]["key_file"])
        from pipeline.config import load_router

        self.port = load_router(self.conf).port
        self.spool = self.base / "spool"
        self.daemons: dict[str, Daemon] = {}

    def start(self, which: tuple[str, ...] = DAEMONS) -> DicomFlow:
        for name in which:
            args = ("send", "dest") if name == "send" else (name,)
            self.daemons[name] = Daemon(self.conf, *args, log_name=name, env=self.env).start()
        for name in which:
            daemon = self.daemons[name]
            if name == "receive":
                wait_port(self.port)
            else:
                daemon.wait_log("filter ready" if name == "filter" else "sender started")
        return self

    def pids(self) -> dict[str, int]:
        return {name: d.pid for name, d in self.daemons.items() if d.alive()}

    def cpu(self) -> float:
        return sum(self.cpu_each().values())

    def cpu_each(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    def stop(self, which: tuple[str, ...] | None = None) -> None:
        for name in which or tuple(self.daemons):
            daemon = self.daemons.pop(name, None)
            if daemon is not None:
                daemon.stop()

    def status_seconds(self) -> float:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "services.cli", "status", "--conf", str(self.conf)],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - start
        if result.returncode not in (0, 3, 4):  # 3, 4: not every daemon runs (the queue part)
            raise RuntimeError(f"dicomflow status failed: {result.stderr}")
        return elapsed

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# -- measurements ----------------------------------------------------------------------

@dataclass
class Rate:
    seconds: float
    cpu: float
    count: int
    nbytes: int
    per_process: dict[str, float] = field(default_factory=dict)

    @property
    def images_s(self) -> float:
        return self.count / self.seconds

    @property
    def mb_s(self) -> float:
        return self.nbytes / MB / self.seconds

    @property
    def cpu_ms(self) -> float:
        return self.cpu * 1000 / self.count


@dataclass
class Results:
    throughput: dict[tuple[int, int], dict[str, list[Rate]]] = field(default_factory=dict)  # (count, senders)
    big: dict[str, list[Rate]] = field(default_factory=dict)
    latency_direct: list[float] = field(default_factory=list)
    latency_routed: list[float] = field(default_factory=list)
    comeback: list[float] = field(default_factory=list)
    rss: dict[str, float] = field(default_factory=dict)
    status_small: list[float] = field(default_factory=list)
    status_large: list[float] = field(default_factory=list)
    drain_small: list[float] = field(default_factory=list)
    drain_large: list[float] = field(default_factory=list)
    large_queue: int = 0
    shaping: dict = field(default_factory=dict)   # tests.bench.shaping's rounds


SYSTEMS = ("dcmtk", "pynetdicom", "orthanc", "dcmtk-study-relay", "dcmtk-file-relay", "dicomflow",
           "dicomflow-stock", "dicomflow-coerced", "dicomflow-deid", "dicomflow-a4", "dcmtk-wan",
           "dicomflow-wan", "dicomflow-wan-a4")
DEFAULT_SYSTEMS = SYSTEMS[:9]
#: the dicomflow-coerced row's endpoint operations (its copy is its own shaped file)
COERCE = "PatientID = SITEA-{PatientID}\nIssuerOfPatientID = SITEA"
#: the dicomflow-deid row's endpoint: the Basic Profile (its copy is its own file)
DEIDENTIFY = {"profile": "basic", "key_file": "keys/bench.key"}
#: the endpoint sections of the rows that shape
SHAPING: dict[str, dict[str, dict]] = {"dicomflow-coerced": {"coerce": {"operations": COERCE}},
                                       "dicomflow-deid": {"deidentify": DEIDENTIFY}}
WAN_SYSTEMS = ("dcmtk-wan", "dicomflow-wan", "dicomflow-wan-a4")   # run when --wan-delay is set
PARALLEL_SENDS = 4   # [endpoint] associations of the …-a4 rows
LABELS = {
    "dcmtk": "DCMTK storescu → DCMTK storescp (direct)",
    "pynetdicom": "DCMTK storescu → pynetdicom SCP (direct)",
    "orthanc": "DCMTK storescu → Orthanc + Lua auto-routing → storescp",
    "dcmtk-study-relay": "DCMTK storescu → storescp -su + dcmsend per study → storescp",
    "dcmtk-file-relay": "DCMTK storescu → storescp + storescu per file → storescp",
    "dicomflow": "DCMTK storescu → DicomFlow → storescp",
    "dicomflow-stock": "… DicomFlow with DICOMFLOW_FASTPATH=0 (stock pynetdicom loops)",
    "dicomflow-coerced": "… DicomFlow, the endpoint coercing 2 attributes (its own copy)",
    "dicomflow-deid": "… DicomFlow, the endpoint de-identifying (Basic Profile, its own copy)",
    "dcmtk-wan": "DCMTK storescu → delay relay → storescp",
    "dicomflow-wan": "DCMTK storescu → DicomFlow → delay relay → storescp",
    "dicomflow-a4": f"… DicomFlow sending over associations = {PARALLEL_SENDS}",
    "dicomflow-wan-a4": f"… DicomFlow sending over associations = {PARALLEL_SENDS} → delay relay",
}


@dataclass
class Route:
    """Where a system's senders connect, and how its CPU and its arrivals are read."""

    port: int
    called: str
    cpu: Callable[[], float]
    stops: list[Callable[[], None]]
    arrived: Callable[[], int] | None = None     # files at the system itself (pynetdicom), if not at dest
    settle: Callable[[], None] = lambda: None    # let in-between work finish before the CPU is read
    cpu_each: Callable[[], dict[str, float]] = dict


def open_route(system: str, base: Path, dest: Destination, env: dict | None, wan_delay: float,
               stops: list[Callable[[], None]]) -> Route:
    """Start what ``system`` puts between the senders and ``dest``; ``stops`` gains its stops."""
    dest_port = dest.port
    if "-wan" in system:
        proxy = DelayProxy(base, dest.port, wan_delay).start()
        stops.append(proxy.stop)
        dest_port = proxy.port
    if system in ("dcmtk", "dcmtk-wan"):
        return Route(dest_port, DEST_AET, lambda: tree_cpu_seconds(dest.proc.pid), stops)
    if system == "pynetdicom":
        scp = PynetdicomSCP(base).start()
        stops.append(scp.stop)
        return Route(scp.port, "PYNETDICOM", lambda: cpu_seconds(scp.proc.pid), stops, arrived=scp.count)
    if system == "orthanc":
        orthanc = OrthancRouter(base, dest_port).start()
        stops.append(orthanc.stop)
        return Route(orthanc.dicom_port, "ORTHANC", lambda: cpu_seconds(orthanc.proc.pid), stops)
    if system in ("dcmtk-study-relay", "dcmtk-file-relay"):
        relay = DcmtkRelay(base, dest_port, per_study=system == "dcmtk-study-relay").start()
        stops.append(relay.stop)
        return Route(relay.port, RELAY_AET, relay.cpu, stops, settle=relay.settle)
    if system == "dicomflow-stock":
        env = {**(env or {}), "DICOMFLOW_FASTPATH": "0"}
    extra = {"associations": str(PARALLEL_SENDS)} if system.endswith("-a4") else None
    flow = DicomFlow(base, dest_port, extra_endpoint=extra, env=env, shaping=SHAPING.get(system))
    stops.append(flow.remove)
    flow.start()
    return Route(flow.port, "DICOMFLOW", flow.cpu, stops, cpu_each=flow.cpu_each)


def run_transfer(system: str, base: Path, data: DataSet, poll: float = 0.005,
                 warmup: DataSet | None = None, env: dict | None = None,
                 subsets: list[DataSet] | None = None, wan_delay: float = 0.0) -> Rate:
    """One end-to-end transfer of ``data`` through ``system``; destination complete = done.

    ``warmup`` goes through first, untimed: long-running daemons have their modules
    imported and their association open; a cold start is not what a site lives with.
    ``env`` is added to the DicomFlow daemons' environment (the patch A/B, ``patches_ab``).
    ``subsets`` (together ``data``) are sent by one ``storescu`` each, all at once; the
    rate is then the aggregate. ``wan_delay`` is the delay relay's one-way delay (s) for
    the ``…-wan`` systems.
    """
    dest = Destination(base).start()
    stops: list[Callable[[], None]] = [dest.clear, dest.stop]
    try:
        route = open_route(system, base, dest, env, wan_delay, stops)

        def complete(count: int, nbytes: int, base_count: int, base_bytes: int) -> bool:
            if route.arrived is not None:
                return route.arrived() >= base_count + count
            return dest.complete(count, nbytes, base_count, base_bytes)

        def counted() -> tuple[int, int]:
            return (route.arrived(), 0) if route.arrived is not None else (dest.count(), dest.bytes())

        base_count = base_bytes = 0
        if warmup is not None:
            storescu(route.port, warmup.files, route.called)
            wait_until(lambda: complete(warmup.count, warmup.dataset_bytes, 0, 0), 600, poll, "warm-up")
            route.settle()
            base_count, base_bytes = counted()
        time.sleep(0.2)  # let start-up work settle before the clock starts
        cpu0, each0 = route.cpu(), route.cpu_each()
        start = time.monotonic()
        storescu_all(route.port, [s.files for s in subsets or [data]], route.called)
        wait_until(lambda: complete(data.count, data.dataset_bytes, base_count, base_bytes),
                   3600, poll, "destination")
        elapsed = time.monotonic() - start
        route.settle()
        cpu = route.cpu() - cpu0
        each = {k: (v - each0[k]) * 1000 / data.count for k, v in route.cpu_each().items()}
        return Rate(elapsed, cpu, data.count, data.total_bytes, each)
    finally:
        for stop in reversed(stops):
            stop()


def measure_throughput(base: Path, ct: DataSet, warm: DataSet, count: int, senders: int,
                       systems: list[str], args: argparse.Namespace, results: Results) -> None:
    """Interleaved rounds (every system once per round, in turn) of one study size and
    one number of parallel senders; the data is made for it (and removed after) unless
    it is the one-sender series already made."""
    directory = base / "data" / f"ct-{count}-{senders}"
    if senders == 1 and count == ct.count:
        subsets = [ct]
    else:
        log(f"generating {count} CT images as {senders} studies")
        subsets = make_studies(directory, count, senders, args.size)
    data = combined(subsets)
    table = results.throughput.setdefault((count, senders), {})
    try:
        for round_ in range(args.runs):
            for system in systems:
                rate = run_transfer(system, base, data, warmup=warm, subsets=subsets,
                                    wan_delay=args.wan_delay)
                table.setdefault(system, []).append(rate)
                detail = ", ".join(f"{k} {v:.2f}" for k, v in rate.per_process.items())
                log(f"{count} images, {senders} sender(s), round {round_ + 1}: {system}: "
                    f"{rate.images_s:.1f} images/s, {rate.cpu_ms:.2f} ms CPU/image"
                    + (f" ({detail})" if detail else ""))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def measure_latency(base: Path, files: list[Path], results: Results) -> None:
    """Single images, one storescu each: directly, then through DicomFlow."""
    dest = Destination(base).start()
    flow = DicomFlow(base, dest.port).start()
    try:
        for label, port, called, out in (("direct", dest.port, DEST_AET, results.latency_direct),
                                         ("routed", flow.port, "DICOMFLOW", results.latency_routed)):
            for path in files:
                before = dest.count()
                start = time.monotonic()
                storescu(port, [path], called)
                wait_until(lambda b=before: dest.count() > b and dest.bytes() > 0, 60, 0.0005, label)
                out.append(time.monotonic() - start)
    finally:
        flow.remove()
        dest.stop()
        dest.clear()


def measure_comeback(base: Path, files: list[Path], rounds: int, down_for: float, results: Results) -> None:
    """Destination down for ``down_for`` s with files queued; time from its restart to
    the first delivery."""
    port = free_port()
    dest = Destination(base, port)
    flow = DicomFlow(base, port).start()
    try:
        for index in range(rounds):
            storescu(flow.port, files[index * 3:(index + 1) * 3], "DICOMFLOW")
            time.sleep(down_for)
            back = dest = Destination(base, port)
            start = time.monotonic()
            back.start(wait=False)
            wait_until(back.count, 120, 0.002, "first delivery after the comeback")
            results.comeback.append(time.monotonic() - start)
            wait_until(lambda d=back: d.count() >= 3, 120, 0.01, "the rest of the queue")
            back.stop()
            back.clear()
    finally:
        flow.remove()
        dest.stop()
        dest.clear()


def measure_big(base: Path, big: DataSet, results: Results) -> None:
    """The 1 GiB object directly (DCMTK) and through DicomFlow, with each daemon's VmHWM."""
    results.big.setdefault("dcmtk", []).append(run_transfer("dcmtk", base, big, poll=0.05))
    dest = Destination(base).start()
    flow = DicomFlow(base, dest.port).start()
    try:
        cpu0 = flow.cpu()
        start = time.monotonic()
        storescu(flow.port, big.files, "DICOMFLOW")
        wait_until(lambda: dest.complete(1, big.dataset_bytes), 3600, 0.05, "the big object")
        elapsed = time.monotonic() - start
        results.big.setdefault("dicomflow", []).append(Rate(elapsed, flow.cpu() - cpu0, 1, big.total_bytes))
        for name, pid in flow.pids().items():
            results.rss[name] = max(results.rss.get(name, 0.0), peak_rss_mb(pid))
    finally:
        flow.remove()
        dest.stop()
        dest.clear()


def measure_queue(base: Path, large: int, small: int, window: int, rounds: int, results: Results) -> None:
    """``status`` time and drain rate with ``large`` files queued, versus ``small``."""
    template = make_small_template()
    results.large_queue = large
    for queued, statuses, drains in ((small, results.status_small, results.drain_small),
                                     (large, results.status_large, results.drain_large)):
        for _ in range(rounds):
            dest = Destination(base).start()
            flow = DicomFlow(base, dest.port)
            flow.start(("receive", "filter"))
            outbox = flow.spool / "outbox" / "dest"
            log(f"queueing {queued} small files")
            fill_small_queue(outbox, queued, template, 0)
            statuses.append(median([flow.status_seconds() for _ in range(3)]))
            measured = min(window, queued)
            try:
                flow.start(("send",))
                wait_until(dest.count, 600, 0.002, "first small file")
                c1, t1 = dest.count(), time.monotonic()
                target = min(queued, c1 + measured)
                wait_until(lambda d=dest, t=target: d.count() >= t, 3600, 0.01, "the drain window")
                drains.append((dest.count() - c1) / (time.monotonic() - t1))
            finally:
                flow.remove()
                dest.stop()
                dest.clear()


# -- report ----------------------------------------------------------------------------

def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def report(results: Results, args: argparse.Namespace, ct: DataSet) -> str:
    lines = []
    mean_mb = ct.total_bytes / ct.count / MB
    lines.append(f"DicomFlow benchmark — {os.cpu_count()} CPUs, {platform_line()}")
    lines.append(f"data: CT images {args.size}×{args.size}×16 bit ({mean_mb:.2f} MB each); medians of "
                 f"{args.runs} interleaved round(s); TCP_NODELAY everywhere; every storescp -pdu {MAX_PDU}")
    lines.append("")
    for (count, senders), table in results.throughput.items():
        lines += throughput_table(table, count, senders, args.wan_delay)
    if results.shaping:
        from tests.bench import shaping

        lines += ["cost of coercion (the filter daemon alone, same files, interleaved rounds):",
                  shaping.report(results.shaping), ""]
    if results.big:
        for system, rates in results.big.items():
            r = median([x.mb_s for x in rates])
            cpu = median([x.cpu for x in rates])
            seconds = median([x.seconds for x in rates])
            lines.append(f"big object, {system}: {fmt(r)} MB/s, {fmt(seconds, 2)} s"
                         + (f", router CPU {fmt(cpu, 2)} s" if system == "dicomflow" else ""))
    if results.rss:
        lines.append("peak RSS (VmHWM) with the 1 GiB object: "
                     + ", ".join(f"{k} {v:.0f} MB" for k, v in results.rss.items()))
    if results.latency_routed:
        direct = median(results.latency_direct)
        routed = results.latency_routed
        lines.append(f"single image ({len(routed)} singles): direct p50 {direct * 1000:.0f} ms; "
                     f"through DicomFlow p50 {median(routed) * 1000:.0f} ms, "
                     f"p95 {percentile(routed, 0.95) * 1000:.0f} ms; "
                     f"added p50 {(median(routed) - direct) * 1000:.0f} ms, "
                     f"p95 {(percentile(routed, 0.95) - direct) * 1000:.0f} ms")
    if results.comeback:
        lines.append(f"destination back → first delivery: median {median(results.comeback):.2f} s, max "
                     f"{max(results.comeback):.2f} s ({', '.join(f'{x:.2f}' for x in results.comeback)})")
    if results.status_large:
        small = median(results.drain_small)
        large = median(results.drain_large)
        lines.append(f"status: {median(results.status_small):.2f} s with {args.small_queue} queued, "
                     f"{median(results.status_large):.2f} s with {results.large_queue:,} queued")
        lines.append(f"drain rate: {small:.0f} files/s with {args.small_queue} queued, "
                     f"{large:.0f} files/s with {results.large_queue:,} queued ({large / small * 100:.0f} %)")
    return "\n".join(lines)


def throughput_table(table: dict[str, list[Rate]], count: int, senders: int, wan_delay: float) -> list[str]:
    """One table: every row of one study size and one number of parallel senders."""
    sending = "1 storescu" if senders == 1 else f"{senders} storescu at once, one study each (aggregate)"
    lines = [f"{count} images, {sending}"
             + (f"; delay relay {wan_delay * 1000:.0f} ms each way" if set(table) & set(WAN_SYSTEMS) else ""),
             "",
             "| route | images/s | MB/s | × direct DCMTK | CPU ms/image (in between) | runs (images/s) |",
             "|---|---:|---:|---:|---:|---|"]
    base = median([r.images_s for r in table.get("dcmtk", [])])
    for system in SYSTEMS:
        rates = table.get(system)
        if not rates:
            continue
        ims = median([r.images_s for r in rates])
        lines.append(f"| {LABELS[system]} | {fmt(ims)} | {fmt(median([r.mb_s for r in rates]))} | "
                     f"{fmt(ims / base, 2)} | {fmt(median([r.cpu_ms for r in rates]), 2)} | "
                     f"{', '.join(fmt(r.images_s, 0) for r in rates)} |")
    flow, orth = table.get("dicomflow"), table.get("orthanc")
    lines.append("")
    for one, many in (("dicomflow", "dicomflow-a4"), ("dicomflow-wan", "dicomflow-wan-a4")):
        if table.get(one) and table.get(many):
            ratios = [m.images_s / o.images_s for o, m in zip(table[one], table[many], strict=False)]
            lines.append(f"{LABELS[one]}: associations = {PARALLEL_SENDS} / 1 (same round): median "
                         f"{fmt(median(ratios), 2)}× ({', '.join(fmt(r, 2) for r in ratios)})")
            lines.append("")
    if flow and orth:
        ratios = [f.images_s / o.images_s for f, o in zip(flow, orth, strict=False)]
        lines.append(f"DicomFlow / Orthanc auto-routing (same round): median {fmt(median(ratios), 2)}× "
                     f"({', '.join(fmt(r, 2) for r in ratios)})")
        lines.append("")
    return lines


def platform_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {mem:.0f} GiB RAM, Linux {os.uname().release}"


# -- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, one round")
    parser.add_argument("--runs", type=int, default=3, help="rounds of the throughput table")
    parser.add_argument("--counts", type=int_list, default=[500, 2000],
                        help="comma-separated study sizes (CT images per transfer)")
    parser.add_argument("--count", type=int, help="one study size (instead of --counts)")
    parser.add_argument("--parallel", type=int_list, default=[1, 4, 8],
                        help="comma-separated numbers of storescu sending at once, one study each")
    parser.add_argument("--wan-delay", type=seconds, default=0.0,
                        help="add the rows through a delay relay with this delay each way (20ms, 0.02)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the CT images")
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the multi-frame object (MiB)")
    parser.add_argument("--singles", type=int, default=50, help="single images for the latency")
    parser.add_argument("--comebacks", type=int, default=3, help="destination restarts measured")
    parser.add_argument("--down-for", type=float, default=15.0, help="seconds a destination stays down")
    parser.add_argument("--large-queue", type=int, default=100_000, help="small files queued")
    parser.add_argument("--small-queue", type=int, default=2_000, help="small files queued (reference)")
    parser.add_argument("--window", type=int, default=2_000, help="files over which a drain rate is taken")
    parser.add_argument("--only", default="throughput,shaping,big,latency,comeback,queue",
                        help="comma-separated parts to run")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated rows to run, of: {', '.join(SYSTEMS)}")
    parser.add_argument("--workdir", type=Path, help="where to put data and spools (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.counts, args.parallel, args.big_mib, args.singles = 1, [200], [1, 4], 256, 20
        args.comebacks, args.down_for, args.large_queue = 1, 8.0, 20_000
        args.small_queue = args.window = 1000
    if args.count is not None:
        args.counts = [args.count]
    return args


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def seconds(text: str) -> float:
    """``20ms`` or ``0.02`` (seconds)."""
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.removesuffix("s"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for binary in (STORESCU, STORESCP, DCMSEND, ORTHANC):
        if not os.access(binary, os.X_OK):
            print(f"missing {binary}: apt-get install dcmtk orthanc", file=sys.stderr)
            return 1
    base = Path(tempfile.mkdtemp(prefix="dicomflow-bench-", dir=args.workdir))
    parts = set(args.only.split(","))
    systems = [s for s in SYSTEMS if s in args.systems.split(",")
               or (args.wan_delay and s in WAN_SYSTEMS)]
    results = Results()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        log(f"generating {args.counts[0]} CT images in {base}")
        ct = make_ct_series(base / "data" / "ct", args.counts[0], args.size)
        warm = make_ct_series(base / "data" / "warm", 10, args.size)
        if "throughput" in parts:
            for count in args.counts:
                for senders in args.parallel:
                    measure_throughput(base, ct, warm, count, senders, systems, args, results)
        if "shaping" in parts:
            from tests.bench import shaping  # it imports this module: not at the top

            log("shaping: the filter alone, a plain, a coerced and a de-identifying endpoint")
            results.shaping = shaping.measure(base, ct, warm, args.runs)
        if "latency" in parts:
            log(f"latency: {args.singles} singles")
            measure_latency(base, ct.files[: args.singles], results)
        if "comeback" in parts:
            log("destination comeback")
            measure_comeback(base, ct.files, args.comebacks, args.down_for, results)
        if "big" in parts:
            log(f"generating a {args.big_mib} MiB multi-frame object")
            big = make_big_object(base / "data" / "big.dcm", args.big_mib)
            measure_big(base, big, results)
            (base / "data" / "big.dcm").unlink()
        if "queue" in parts:
            measure_queue(base, args.large_queue, args.small_queue, args.window, 1 if args.quick else 2,
                          results)
    finally:
        text = report(results, args, ct) if "ct" in locals() else ""
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
