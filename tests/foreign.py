"""Foreign DICOM senders (C-STORE SCUs) for interoperability tests.

Each wrapper runs a real, independently written DICOM stack from its Debian package,
called by absolute path (pip packages shadow some names: python-gdcm puts another
``gdcmscu`` in the virtualenv, pynetdicom a ``storescu``), and reports, per file, what
*the tool* says happened to it — a :class:`Outcome` with the status it saw, or the
failure it printed. A wrapper never decides what a status means for DicomFlow; tests
do. Every run has a time bound.

=========  ===========================================  ===============================
stack      program                                      one association per
=========  ===========================================  ===============================
DCMTK      ``/usr/bin/storescu``                        file
GDCM       ``/usr/bin/gdcmscu --store``                 file (it aborts when it exits)
CTN        ``/usr/bin/send_image``                      file
odil       odil's Python library (``/usr/bin/odil``)    call (all files)
PixelMed   ``com.pixelmed.network.StorageSOPClassSCU``  call (all files)
=========  ===========================================  ===============================

Notes per stack, as found with the Debian packages here:

* GDCM's ``gdcmscu`` prints nothing about the store unless ``-D``; then it dumps the
  C-STORE response, whose (0000,0900) Status is read. It proposes only what it can
  send and exits through an uncaught exception (status 134, after an A-ABORT), so its
  exit code says nothing.
* CTN's ``send_image`` prints each response ("Status: 0000 …"); without ``-r`` it goes
  on after a failure status, and it stops at the first file it cannot negotiate.
* odil's ``odil store`` command prints nothing for a failure *status* (only for an
  exception), so the wrapper runs the same steps as that command (the same two
  proposed transfer syntaxes, one association) through odil's library with the
  system Python and prints each response's status. A file odil cannot read is
  reported failed and left out (odil's own command would stop there).
* PixelMed's ``StorageSOPClassSCU`` with ``-`` reads file names from stdin and sends
  them all on one association; it reports ``Send <file> succeeded|failed`` at debug
  level (java.util.logging FINE), switched on with a logging properties file. A file
  it cannot parse (e.g. pydicom's SC_rgb_jpeg.dcm) ends the whole call before it
  associates ("Cannot get Abstract or Transfer Syntax …"): the wrapper reports that
  file failed and sends the rest again.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import require_binary
from tests.peers import TCP_ENV

SYSTEM_PYTHON = "/usr/bin/python3"  # odil's bindings are a Debian package, not in the venv
PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
# pixelmed.jar's manifest lists its dependencies' jars by absolute path (Debian); the
# store SCU needs slf4j-api and a binding (slf4j-jdk14) from libslf4j-java and
# commons-codec from libcommons-codec-java, which the manifest names.
PIXELMED_CLASS = "com.pixelmed.network.StorageSOPClassSCU"
TIMEOUT = 300.0


@dataclass(frozen=True)
class Outcome:
    """What a sender says about one file."""

    path: Path
    ok: bool                 # the tool reports success (or a warning: stored)
    status: int | None       # the C-STORE status it reported, if it reports one
    detail: str = ""         # the tool's own words, for failure messages


def _stored(status: int | None) -> bool:
    """Success or warning (PS3.4: every warning is stored)."""
    return status is not None and (status == 0 or status in (0x0001, 0x0107, 0x0116)
                                   or status >> 12 == 0xB)


def _run(cmd: list[str], timeout: float = TIMEOUT, stdin: str | None = None,
         env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, errors="replace",
                          timeout=timeout, env={**os.environ, **TCP_ENV, **(env or {})})


class Dcmtk:
    """DCMTK ``storescu``, one file per association; status from its debug output."""

    name = "dcmtk"

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.program = require_binary("/usr/bin/storescu")
        self.extra = extra

    def send(self, port: int, files: list[Path], called: str, calling: str = "STORESCU",
             host: str = "127.0.0.1") -> list[Outcome]:
        outcomes = []
        for path in files:
            result = _run([self.program, "-d", "-aet", calling, "-aec", called, *self.extra,
                           host, str(port), str(path)])
            found = re.search(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", result.stdout + result.stderr)
            status = int(found.group(1), 16) if found else None
            outcomes.append(Outcome(path, _stored(status), status, _last_error(result)))
        return outcomes


class Gdcm:
    """GDCM ``gdcmscu --store`` (``/usr/bin``, not python-gdcm's), one file per call."""

    name = "gdcm"

    def __init__(self) -> None:
        self.program = require_binary("/usr/bin/gdcmscu")

    def send(self, port: int, files: list[Path], called: str, calling: str = "GDCMSCU",
             host: str = "127.0.0.1") -> list[Outcome]:
        outcomes = []
        for path in files:
            result = _run([self.program, "-D", "--store", "--aetitle", calling, "--call", called,
                           "-i", str(path), host, str(port)])
            text = result.stdout + result.stderr
            found = re.search(r"\(0000,0900\) \?\? \(US\) (\d+)", text)
            status = int(found.group(1)) if found else None
            detail = "" if found else _gdcm_reason(text)
            outcomes.append(Outcome(path, _stored(status), status, detail))
        return outcomes


def _gdcm_reason(text: str) -> str:
    if "Faulty Presentation Context" in text:
        return "no accepted presentation context"
    return "no C-STORE response"


class Ctn:
    """CTN ``send_image``, one file per call (it stops at an unnegotiable file)."""

    name = "ctn"

    def __init__(self) -> None:
        self.program = require_binary("/usr/bin/send_image")

    def send(self, port: int, files: list[Path], called: str, calling: str = "CTNSCU",
             host: str = "127.0.0.1") -> list[Outcome]:
        outcomes = []
        for path in files:
            result = _run([self.program, "-q", "-a", calling, "-c", called, host, str(port),
                           str(path)])
            found = re.search(r"^Status:\s+([0-9A-Fa-f]{4})", result.stdout, re.MULTILINE)
            status = int(found.group(1), 16) if found else None
            outcomes.append(Outcome(path, _stored(status), status, _last_error(result)))
        return outcomes


_ODIL_STORE = r"""
import sys
import odil

host, port, calling, called, *files = sys.argv[1:]
syntaxes = [odil.registry.ExplicitVRLittleEndian, odil.registry.ImplicitVRLittleEndian]
datasets = []
for name in files:
    try:
        with odil.open(name) as stream:
            ds = odil.Reader.read_file(stream)[1]
        datasets.append((name, ds, ds.as_string("SOPClassUID")[0], ds.as_string("SOPInstanceUID")[0]))
    except Exception as exc:
        print("FAILED", name, "odil cannot read it:", repr(exc).replace("\n", " "), flush=True)
classes = sorted({sop_class for _, _, sop_class, _ in datasets})
role = odil.AssociationParameters.PresentationContext.Role.SCU
contexts = [odil.AssociationParameters.PresentationContext(2 * i + 1, uid, syntaxes, role)
            for i, uid in enumerate(classes)]
association = odil.Association()
association.set_peer_host(host)
association.set_peer_port(int(port))
association.update_parameters().set_calling_ae_title(calling).set_called_ae_title(
    called).set_presentation_contexts(contexts)
association.associate()
for name, ds, sop_class, sop_instance in datasets:
    try:
        request = odil.messages.CStoreRequest(association.next_message_id(), sop_class,
                                              sop_instance, 0, ds)
        association.send_message(request, sop_class)
        response = odil.messages.CStoreResponse(association.receive_message())
        print("STATUS", response.get_status(), name, flush=True)
    except Exception as exc:
        print("FAILED", name, repr(exc).replace("\n", " "), flush=True)
try:
    association.release()
except Exception:
    pass
"""


class Odil:
    """odil's store SCU (the steps of ``odil store``), all files on one association."""

    name = "odil"

    def __init__(self) -> None:
        require_binary("/usr/bin/odil")
        self.python = require_binary(SYSTEM_PYTHON)

    def send(self, port: int, files: list[Path], called: str, calling: str = "ODILSCU",
             host: str = "127.0.0.1") -> list[Outcome]:
        result = _run([self.python, "-c", _ODIL_STORE, host, str(port), calling, called,
                       *map(str, files)], env={"PYTHONPATH": ""})
        said: dict[str, Outcome] = {}
        for line in result.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "STATUS":
                code, _, name = rest.partition(" ")
                said[name] = Outcome(Path(name), _stored(int(code)), int(code))
            elif kind == "FAILED":
                name, _, why = rest.partition(" ")
                said[name] = Outcome(Path(name), False, None, why)
        return [said.get(str(p), Outcome(p, False, None, _last_error(result) or "not sent"))
                for p in files]


_JUL_PROPERTIES = """\
handlers=java.util.logging.ConsoleHandler
.level=WARNING
com.pixelmed.network.StorageSOPClassSCU.level=FINE
java.util.logging.ConsoleHandler.level=FINE
java.util.logging.SimpleFormatter.format=%4$s %3$s: %5$s%6$s%n
"""


class PixelMed:
    """PixelMed's ``StorageSOPClassSCU``: every file on one association (names on stdin).

    ``workdir`` holds the java.util.logging properties that make it report per file.
    """

    name = "pixelmed"

    def __init__(self, workdir: Path) -> None:
        self.java = require_binary("/usr/bin/java")
        self.jar = PIXELMED_JAR if os.path.exists(PIXELMED_JAR) else require_binary(PIXELMED_JAR)
        workdir.mkdir(parents=True, exist_ok=True)
        self.properties = workdir / "pixelmed-logging.properties"
        self.properties.write_text(_JUL_PROPERTIES)

    def send(self, port: int, files: list[Path], called: str, calling: str = "PIXELMED",
             host: str = "127.0.0.1") -> list[Outcome]:
        """Every file on one association; a file PixelMed cannot read ends the whole call
        before it associates, so that file is set aside and the rest sent again."""
        outcomes: dict[Path, Outcome] = {}
        left = list(files)
        while left:
            result = self._call(port, left, called, calling, host)
            said = {found.group(1): found.group(2) == "succeeded"
                    for found in re.finditer(r"Send (.+?) (succeeded|failed) between", result.stderr)}
            unreadable = re.search(r"Cannot get Abstract or Transfer Syntax to build Presentation "
                                   r"Context from file (.+)", result.stderr)
            bad = next((p for p in left if unreadable and str(p) == unreadable.group(1).strip()), None)
            if said or bad is None:
                outcomes.update((p, Outcome(p, said.get(str(p), False), None,
                                            _pixelmed_detail(said.get(str(p)), result))) for p in left)
                break
            outcomes[bad] = Outcome(bad, False, None, "PixelMed cannot read it: "
                                    + (_pixelmed_read_error(result.stderr) or "no presentation context"))
            left.remove(bad)
        return [outcomes[p] for p in files]

    def _call(self, port: int, files: list[Path], called: str, calling: str,
              host: str) -> subprocess.CompletedProcess:
        return _run([self.java, f"-Djava.util.logging.config.file={self.properties}",
                     "-cp", self.jar, PIXELMED_CLASS, host, str(port), called, calling, "-"],
                    stdin="".join(f"{p}\n" for p in files))


def _pixelmed_read_error(stderr: str) -> str:
    found = re.search(r"DicomException: (.+)", stderr)
    return found.group(1).strip()[:200] if found else ""


def _pixelmed_detail(succeeded: bool | None, result: subprocess.CompletedProcess) -> str:
    if succeeded:
        return ""
    if succeeded is None:
        return "not reported: " + (_last_error(result) or f"exit status {result.returncode}")
    return "PixelMed reports the send failed (it gives no status)"


def _last_error(result: subprocess.CompletedProcess) -> str:
    """The tool's last error-looking line (for a failure message)."""
    lines = [line.strip() for line in (result.stdout + "\n" + result.stderr).splitlines()
             if re.search(r"error|fail|abort|refus|reject|exception|severe", line, re.I)]
    return lines[-1][:300] if lines else ""


def all_senders(workdir: Path) -> list:
    """One instance of every foreign sender (DCMTK included)."""
    return [Dcmtk(), Gdcm(), Ctn(), Odil(), PixelMed(workdir)]
