"""Real DICOM peers for tests: DCMTK's storescp and an Orthanc instance.

Both are started as separate processes from Debian's packages and spoken to over
loopback — never mocks (the brief: "real peers wherever the network is involved").
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import HANG_TIMEOUT, dcmtk, free_port, require_binary, wait_for, wait_port

TCP_ENV = {"TCP_NODELAY": "1"}


def terminate(proc: subprocess.Popen | None, log=None, grace: float = 30) -> None:
    """SIGTERM a peer, SIGKILL it after ``grace`` seconds, close its log (if given)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        log.close()


class StoreSCP:
    """DCMTK ``storescp`` writing every received instance under a unique name.

    ``bit_preserving`` (``+B``) writes what arrives without parsing it; without it,
    storescp parses each data set and refuses what it cannot read (a reference for
    what a careful receiver accepts).
    """

    def __init__(self, directory: Path, ae_title: str = "STORESCP", port: int | None = None,
                 extra: tuple[str, ...] = (), bit_preserving: bool = True) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = port or free_port()
        self.extra = extra
        self.bit_preserving = bit_preserving
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.directory),
               "+uf", *(("+B",) if self.bit_preserving else ()), "-dhl", *self.extra,
               str(self.port)]
        self.log = open(self.directory.parent / f"storescp-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **TCP_ENV})
        wait_port(self.port)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def stop(self) -> None:
        terminate(self.proc, self.log, grace=10)
        self.proc = None


def storescu(port: int, files: list[Path] | list[str], called: str = "DICOMFLOW",
             calling: str = "STORESCU", extra: tuple[str, ...] = (),
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Send with DCMTK ``storescu`` (one association), TCP_NODELAY set."""
    cmd = [dcmtk("storescu"), "-aet", calling, "-aec", called, *extra,
           "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **TCP_ENV})


class Orthanc:
    """An Orthanc PACS with its own storage, DICOM port and REST API on loopback."""

    def __init__(self, directory: Path, ae_title: str = "ORTHANC", modalities: dict | None = None,
                 dicom_port: int | None = None, http_port: int | None = None,
                 extra: dict | None = None) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = modalities or {}
        self.extra = extra or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.ae_title,
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "SaveJobs": False,
            "HttpsVerifyPeers": False,
            **self.extra,
        }
        config_path = self.directory / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        self.log = open(self.directory / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([require_binary("/usr/sbin/Orthanc"), str(config_path)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **TCP_ENV})
        wait_port(self.dicom_port)
        wait_for(lambda: self._alive(), HANG_TIMEOUT, message="Orthanc REST API")
        return self

    def _alive(self) -> bool:
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes | str | dict) -> object:
        data = json.dumps(body).encode() if isinstance(body, dict | list) else (
            body.encode() if isinstance(body, str) else body)
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")

    def upload(self, path: Path) -> object:
        return self.post("/instances", path.read_bytes())

    def instances(self) -> list[str]:
        return list(self.get("/instances"))  # type: ignore[arg-type]

    def sop_instance_uids(self) -> set[str]:
        result = set()
        for orthanc_id in self.instances():
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            result.add(tags["SOPInstanceUID"])  # type: ignore[index]
        return result

    def stop(self) -> None:
        terminate(self.proc, self.log, grace=30)
        self.proc = None


class SimpleStorage:
    """CTN's ``simple_storage``: a fragile Storage SCP (one process, no fork) that exits
    when a TCP connection closes without an association — the peer that a bare TCP
    health probe kills. Received images land under ``directory``."""

    BINARY = "/usr/bin/simple_storage"

    def __init__(self, directory: Path, ae_title: str = "CTN", port: int | None = None) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> SimpleStorage:
        """Started without a port check: a connect-and-close would kill it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [require_binary(self.BINARY), "-s", "-c", self.ae_title, "-x", str(self.directory),
               str(self.port)]
        self.log = open(self.directory.parent / f"simple_storage-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=self.directory, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(self._listening, HANG_TIMEOUT, message=f"simple_storage on port {self.port}")
        return self

    def _listening(self) -> bool:
        """Whether the port is in LISTEN state, read from /proc (no connection made)."""
        wanted = f":{self.port:04X} "
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            if any(wanted in line.split(None, 3)[1] + " " and line.split()[3] == "0A"
                   for line in lines):
                return True
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def stop(self) -> None:
        terminate(self.proc, self.log, grace=10)
        self.proc = None


class PixelMedSCP:
    """PixelMed's ``StorageSOPClassSCPDispatcher`` (``pixelmed-apps``, Java): a Storage
    SCP run as ``<port> <AE title> <folder>``; it stores each instance under
    ``folder`` (named by its SOP Instance UID). Without a fourth argument it logs
    nothing; its LDAP-discovery timer prints a stack trace at start (harmless)."""

    CLASS = "com.pixelmed.network.StorageSOPClassSCPDispatcher"
    JAR = "/usr/share/java/pixelmed.jar"  # its manifest names the dependencies' jars

    def __init__(self, directory: Path, ae_title: str = "PIXELMED", port: int | None = None) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> PixelMedSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.path.exists(self.JAR):
            require_binary(self.JAR)
        cmd = [require_binary("/usr/bin/java"), "-cp", self.JAR, self.CLASS, str(self.port),
               self.ae_title, str(self.directory)]
        self.log = open(self.directory.parent / f"pixelmed-scp-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=self.directory.parent, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def files(self) -> list[Path]:
        """Stored instances (PixelMed writes each to a temporary name first: hidden)."""
        return sorted(p for p in self.directory.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def stop(self) -> None:
        terminate(self.proc, self.log, grace=10)
        self.proc = None
