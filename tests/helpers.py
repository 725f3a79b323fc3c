"""Shared test helpers: configuration writers, daemon subprocesses, waiting, data.

Tests wait on conditions with generous timeouts (hang detection), never on fixed
sleeps and never assert a speed (README, Design notes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
HANG_TIMEOUT = 60.0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(path: str) -> str:
    """A real peer's binary; a missing one fails in CI (never a silent skip)."""
    if os.access(path, os.X_OK):
        return path
    if IN_CI:
        pytest.fail(f"{path} is required in CI (see .ci/run for the packages to install)")
    pytest.skip(f"{path} not installed")


def dcmtk(tool: str) -> str:
    """DCMTK tools by absolute path: pynetdicom's pip package shadows storescu/storescp."""
    return require_binary(f"/usr/bin/{tool}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = HANG_TIMEOUT,
             interval: float = 0.05, message: str = "condition") -> object:
    """Poll ``predicate`` until truthy; fail the test after ``timeout`` (a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = HANG_TIMEOUT) -> None:
    def is_open() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(is_open, timeout, message=f"port {port} to listen")


def _ini(sections: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = str(value)
            if "\n" in text:
                text = "\n    ".join(text.splitlines())
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def write_conf(base: Path, router: dict | None = None, filter_: dict | None = None,
               endpoints: dict[str, dict[str, dict]] | None = None, tls: dict | None = None,
               web: dict | None = None) -> Path:
    """Write ``base/conf`` with a router.ini (free port, spool in ``base/spool``; a
    ``[web]`` section when ``web`` is given)."""
    conf = base / "conf"
    (conf / "endpoints").mkdir(parents=True, exist_ok=True)
    router_values = {"ae_title": "DICOMFLOW", "bind": "127.0.0.1", "port": free_port(),
                     "spool": str(base / "spool"), "log_level": "DEBUG"}
    router_values.update(router or {})
    sections: dict[str, dict] = {"router": router_values}
    if filter_:
        sections["filter"] = filter_
    if tls:
        sections["tls"] = tls
    if web is not None:
        sections["web"] = web
    (conf / "router.ini").write_text(_ini(sections))
    for name, ep_sections in (endpoints or {}).items():
        (conf / "endpoints" / f"{name}.ini").write_text(_ini(ep_sections))
    return conf


#: the pseudonym key tests write for a de-identifying endpoint (``write_key``)
TEST_KEY = b"dicomflow-test-key-0123456789abcdef"


def write_key(conf: Path, relative: str = "keys/research.key", key: bytes = TEST_KEY) -> Path:
    """A de-identifying endpoint's key file in ``conf`` (mode 0600, as the loader demands)."""
    path = conf / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key)
    path.chmod(0o600)
    return path


def router_port(conf: Path) -> int:
    from pipeline.config import load_router

    return load_router(conf).port


class Daemon:
    """A ``dicomflow`` daemon as a real subprocess, its stderr captured to a file."""

    def __init__(self, conf: Path, *args: str, env: dict | None = None,
                 log_name: str | None = None) -> None:
        self.conf = conf
        self.args = args
        name = log_name or "-".join(args)
        self.log_path = conf.parent / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "services.cli", *self.args, "--conf", str(self.conf)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = HANG_TIMEOUT) -> None:
        def found() -> bool:
            if not self.alive() and text not in self.log():
                raise AssertionError(f"daemon {self.args} exited:\n{self.log()[-3000:]}")
            return text in self.log()

        wait_for(found, timeout, message=f"{text!r} in {self.log_path.name}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = HANG_TIMEOUT) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.args} ignored signal {sig} for {timeout}s") from None
        self.log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Pipeline:
    """``dicomflow receive`` + ``filter`` + ``send dest`` as subprocesses, delivering to
    ``peer`` (anything with ``port`` and ``ae_title``); ``endpoint`` and ``retry`` add
    keys to those sections of ``dest.ini``, ``env`` to the daemons' environment."""

    STAGES_IN_FLIGHT = ("incoming", "accepted", "outbox/dest")
    DEAD_ENDS = ("failed/dest", "quarantine", "rejected")

    def __init__(self, base: Path, peer: Any, endpoint: dict | None = None,
                 retry: dict | None = None, env: dict | None = None) -> None:
        sections = {"endpoint": {"host": "127.0.0.1", "port": peer.port, "ae_title": peer.ae_title,
                                 **(endpoint or {})},
                    "retry": dict(retry or {})}
        self.conf = write_conf(base, router={"log_level": "INFO"}, endpoints={"dest": sections})
        self.port = router_port(self.conf)
        self.spool = base / "spool"
        self.daemons = [Daemon(self.conf, "receive", env=env), Daemon(self.conf, "filter", env=env),
                        Daemon(self.conf, "send", "dest", env=env)]

    def start(self) -> Pipeline:
        for daemon in self.daemons:
            daemon.start()
        self.daemons[0].wait_log("listening as")
        return self

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()

    def logs(self) -> str:
        return "\n".join(daemon.log()[-3000:] for daemon in self.daemons)

    def settled(self) -> bool:
        """Nothing left in incoming/, accepted/ or the outbox."""
        return all(dicom_files(self.spool / stage) == [] for stage in self.STAGES_IN_FLIGHT)

    def dead_end_paths(self) -> list[Path]:
        """Files in failed/, quarantine/ or rejected/."""
        return [path for stage in self.DEAD_ENDS for path in dicom_files(self.spool / stage)]


def run_cli(conf: Path, *args: str, timeout: float = HANG_TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "services.cli", *args, "--conf", str(conf)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def make_dataset(sop_class: str = "1.2.840.10008.5.1.4.1.1.2", modality: str = "CT",
                 rows: int = 16, cols: int = 16, patient_name: str = "TEST^PATIENT",
                 patient_id: str = "PID0001", study_uid: str | None = None,
                 **attrs: object) -> Dataset:
    """A small synthetic image with fresh UIDs (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.StudyDate = "20261128"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(rows * cols * 2)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_files(directory: Path, count: int, **kwargs: object) -> list[Path]:
    """``count`` synthetic files in ``directory`` (one study)."""
    from pydicom.uid import generate_uid as new_uid

    study = kwargs.pop("study_uid", None) or new_uid()
    paths = []
    for index in range(count):
        ds = make_dataset(study_uid=study, **kwargs)
        ds.InstanceNumber = index + 1
        paths.append(write_dataset(ds, directory / f"img{index:05d}.dcm"))
    return paths


def dicom_files(directory: Path) -> list[Path]:
    """Visible DICOM files of a stage (no hidden names, no sidecars)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if not p.name.startswith(".") and not p.name.endswith((".error", ".reason"))
                  and p.is_file())


def tmp_leftovers(spool: Path) -> list[Path]:
    """Files in any hidden ``.tmp`` of the spool."""
    return [p for p in spool.rglob(".tmp/*")]


def has_dcmtk() -> bool:
    return shutil.which("/usr/bin/storescu") is not None


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM, by ``openssl``), for HTTPS tests."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return cert, key
