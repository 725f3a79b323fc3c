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
odil       odil's Python library (``/usr/bin/odil``)    call (thorough: more, see below)
PixelMed   ``com.pixelmed.network.StorageSOPClassSCU``  call (thorough: more, see below)
=========  ===========================================  ===============================

Notes per stack, as found with the Debian packages here:

* GDCM's ``gdcmscu`` prints nothing about the store unless ``-D``; then it dumps the
  C-STORE response, whose (0000,0900) Status is read. It proposes only what it can
  send and exits through an uncaught exception (status 134, after an A-ABORT), so its
  exit code says nothing.
* CTN's ``send_image`` prints each response ("Status: 0000 …"); without ``-r`` it goes
  on after a failure status, and it stops at the first file it cannot negotiate.
* odil's ``odil store`` command prints nothing for a failure *status* (only for an
  exception), so the wrapper runs the same steps as that command (one association)
  through odil's library with the system Python and prints each response's status.
  ``odil store`` proposes only the two uncompressed transfer syntaxes; driven
  ``thorough``, the wrapper proposes each SOP class's own first (as ``storescu`` is told
  to in the interoperability suite), so that compressed files are tested too. A file
  odil cannot read is
  reported failed and left out (odil's own command would stop there); the script
  stops at the first exception (the association is gone).
* PixelMed's ``StorageSOPClassSCU`` with ``-`` reads file names from stdin and sends
  them all on one association; it reports ``Send <file> succeeded|failed`` at debug
  level (java.util.logging FINE), switched on with a logging properties file, but
  never the status. A file it cannot parse (e.g. pydicom's SC_rgb_jpeg.dcm) ends the
  whole call before it associates ("Cannot get Abstract or Transfer Syntax …"): the
  wrapper reports that file failed and sends the rest again.

odil and PixelMed put every file of a call on one association and choose a file's
presentation context by its SOP class alone. Driven ``thorough`` (the interoperability
suite; the default is the tool as it is, which hostile-input tests rely on),
:func:`_batches` makes one call per set of files in which each SOP class has one
transfer syntax. One bad file can still end the association and make every later file
look failed, so :func:`_in_calls` sends
the files that have no outcome yet again, on a new call, until each has its own: a
file is reported failed without a status only when it was the first file of its
association (else it is sent again, first); a file with a status (or PixelMed's
"succeeded") is never sent twice. Each call has a time bound; a call that overruns
it is killed and what it printed so far counts.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom

from tests.helpers import require_binary
from tests.peers import TCP_ENV

SYSTEM_PYTHON = "/usr/bin/python3"  # odil's bindings are a Debian package, not in the venv
PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
# pixelmed.jar's manifest lists its dependencies' jars by absolute path (Debian); the
# store SCU needs slf4j-api and a binding (slf4j-jdk14) from libslf4j-java and
# commons-codec from libcommons-codec-java, which the manifest names.
PIXELMED_CLASS = "com.pixelmed.network.StorageSOPClassSCU"
TIMEOUT = 300.0
CALL_TIMEOUT = 60.0          # one call of a one-association sender, plus the time below
CALL_BYTES_PER_S = 5e6       # … for its bytes (a 100 MB object gets 20 s more)


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
    """Run a tool; one that overruns ``timeout`` is killed, and what it printed so far
    is returned with exit status -9 (a hang is reported, not waited out)."""
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, errors="replace",
                              timeout=timeout, env={**os.environ, **TCP_ENV, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        said = [_text(exc.stdout), _text(exc.stderr) + f"\nerror: killed after {timeout:.0f}s\n"]
        return subprocess.CompletedProcess(cmd, -9, *said)


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


@dataclass
class Call:
    """What one call of a one-association sender reported."""

    said: dict[Path, Outcome]          # files the tool reported on
    unreadable: dict[Path, Outcome]    # files the tool could not read (never sent)
    detail: str                        # its last error, for the files it did not report
    associated: bool = True            # False: it ended before associating


def _in_calls(files: list[Path], call, confirm: bool = True) -> list[Outcome]:
    """Send ``files`` with ``call`` (one association per call) until each has its own
    outcome: see the module's docstring. Without ``confirm`` (the tool as it is), a call
    is repeated only when it ended before associating (a file it cannot read)."""
    outcomes: dict[Path, Outcome] = {}
    left = list(files)
    while left:
        result: Call = call(left)
        outcomes.update(result.unreadable)
        sent = [p for p in left if p not in result.unreadable]
        for path in sent:
            said = result.said.get(path)
            if said is not None and (said.ok or said.status is not None or not confirm):
                outcomes[path] = said
            elif not confirm and result.associated:
                outcomes[path] = Outcome(path, False, None, result.detail or "not sent")
        rest = [p for p in sent if p not in outcomes]
        if rest and rest[0] == sent[0] and result.associated:
            first = rest.pop(0)  # the first file of a fresh association: its own failure
            outcomes[first] = result.said.get(first) or Outcome(
                first, False, None, result.detail or "not sent")
        left = rest
    return [outcomes[p] for p in files]


def _in_batches(files: list[Path], call, thorough: bool) -> list[Outcome]:
    """``thorough``: :func:`_in_calls` for each of :func:`_batches`, in the files'
    order; else one association for all, as the tool does it."""
    if not thorough:
        return _in_calls(files, call, confirm=False)
    outcomes = {o.path: o for batch in _batches(files) for o in _in_calls(batch, call)}
    return [outcomes[p] for p in files]


def _batches(files: list[Path]) -> list[list[Path]]:
    """The files in batches where each SOP class has one transfer syntax.

    odil and PixelMed choose a presentation context by SOP class alone, so two files of
    one class in two transfer syntaxes on one association would put one of them on the
    other's context (PixelMed sends it as it is, mislabelled). A file pydicom cannot
    read goes in the first batch (the tool reports it)."""
    batches: list[tuple[dict[str, str], list[Path]]] = []
    for path in files:
        sop_class, syntax = _sop_class_and_syntax(path)
        batch = next((b for b in batches if b[0].get(sop_class, syntax) == syntax), None)
        if batch is None:
            batch = ({}, [])
            batches.append(batch)
        batch[0][sop_class] = syntax
        batch[1].append(path)
    return [paths for _, paths in batches]


def _sop_class_and_syntax(path: Path) -> tuple[str, str]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return str(ds.get("SOPClassUID", "")), str(ds.file_meta.get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - any unreadable file: the tool's verdict is wanted
        return "", ""


def _call_timeout(files: list[Path]) -> float:
    return CALL_TIMEOUT + sum(p.stat().st_size for p in files) / CALL_BYTES_PER_S


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

host, port, calling, called, own_first, *files = sys.argv[1:]
uncompressed = [odil.registry.ExplicitVRLittleEndian, odil.registry.ImplicitVRLittleEndian]
datasets = []
own = {}  # SOP class -> the transfer syntax of its files in this call (one: see _batches)
for name in files:
    try:
        with odil.open(name) as stream:
            meta, ds = odil.Reader.read_file(stream)
        sop_class = ds.as_string("SOPClassUID")[0]
        own[sop_class] = meta.as_string("TransferSyntaxUID")[0]
        datasets.append((name, ds, sop_class, ds.as_string("SOPInstanceUID")[0]))
    except Exception as exc:
        print("UNREADABLE", name, "odil cannot read it:", repr(exc).replace("\n", " "), flush=True)
role = odil.AssociationParameters.PresentationContext.Role.SCU
contexts = [odil.AssociationParameters.PresentationContext(
                2 * i + 1, uid, ([own[uid]] if own_first == "1" else [])
                + [t for t in uncompressed if own_first != "1" or t != own[uid]], role)
            for i, uid in enumerate(sorted(own))]
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
    except Exception as exc:  # the association is gone: the rest go on a new call
        print("FAILED", name, repr(exc).replace("\n", " "), flush=True)
        break
else:
    try:
        association.release()
    except Exception:
        pass
"""


class Odil:
    """odil's store SCU (the steps of ``odil store``), one association per call.

    As the tool is (the default: what hostile-input tests rely on), every file on one
    association with the two uncompressed syntaxes proposed; ``thorough`` (the
    interoperability suite): batches, each SOP class's own syntax first, failures
    confirmed on a fresh association (the module's docstring)."""

    name = "odil"

    def __init__(self, thorough: bool = False) -> None:
        require_binary("/usr/bin/odil")
        self.python = require_binary(SYSTEM_PYTHON)
        self.thorough = thorough

    def send(self, port: int, files: list[Path], called: str, calling: str = "ODILSCU",
             host: str = "127.0.0.1") -> list[Outcome]:
        return _in_batches(files, lambda left: self._call(port, left, called, calling, host),
                           self.thorough)

    def _call(self, port: int, files: list[Path], called: str, calling: str, host: str) -> Call:
        result = _run([self.python, "-c", _ODIL_STORE, host, str(port), calling, called,
                       "1" if self.thorough else "0", *map(str, files)],
                      timeout=_call_timeout(files), env={"PYTHONPATH": ""})
        said: dict[Path, Outcome] = {}
        unreadable: dict[Path, Outcome] = {}
        for line in result.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "STATUS":
                code, _, name = rest.partition(" ")
                said[Path(name)] = Outcome(Path(name), _stored(int(code)), int(code))
            elif kind in ("FAILED", "UNREADABLE"):
                name, _, why = rest.partition(" ")
                (said if kind == "FAILED" else unreadable)[Path(name)] = Outcome(
                    Path(name), False, None, why)
        return Call(said, unreadable, _last_error(result))


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
    ``thorough`` as for :class:`Odil` (batches by transfer syntax, failures confirmed);
    without it, PixelMed as it is, mislabelling included.
    """

    name = "pixelmed"

    def __init__(self, workdir: Path, thorough: bool = False) -> None:
        self.thorough = thorough
        self.java = require_binary("/usr/bin/java")
        self.jar = PIXELMED_JAR if os.path.exists(PIXELMED_JAR) else require_binary(PIXELMED_JAR)
        workdir.mkdir(parents=True, exist_ok=True)
        self.properties = workdir / "pixelmed-logging.properties"
        self.properties.write_text(_JUL_PROPERTIES)

    def send(self, port: int, files: list[Path], called: str, calling: str = "PIXELMED",
             host: str = "127.0.0.1") -> list[Outcome]:
        return _in_batches(files, lambda left: self._call(port, left, called, calling, host),
                           self.thorough)

    def _call(self, port: int, files: list[Path], called: str, calling: str, host: str) -> Call:
        """Every file on one association; a file PixelMed cannot read ends the whole call
        before it associates: that file is reported unreadable, the rest are sent again."""
        result = _run([self.java, f"-Djava.util.logging.config.file={self.properties}",
                       "-cp", self.jar, PIXELMED_CLASS, host, str(port), called, calling, "-"],
                      timeout=_call_timeout(files), stdin="".join(f"{p}\n" for p in files))
        said = {Path(found.group(1)): Outcome(Path(found.group(1)), found.group(2) == "succeeded",
                                              None, _pixelmed_detail(found.group(2) == "succeeded", result))
                for found in re.finditer(r"Send (.+?) (succeeded|failed) between", result.stderr)}
        unreadable = re.search(r"Cannot get Abstract or Transfer Syntax to build Presentation "
                               r"Context from file (.+)", result.stderr)
        bad = next((p for p in files if unreadable and str(p) == unreadable.group(1).strip()), None)
        if said or bad is None:
            return Call(said, {}, _pixelmed_detail(None, result))
        why = _pixelmed_read_error(result.stderr) or "no presentation context"
        return Call({}, {bad: Outcome(bad, False, None, f"PixelMed cannot read it: {why}")}, "",
                    associated=False)


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
