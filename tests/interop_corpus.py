"""The interoperability corpus: every complete pydicom test file and a few made here.

Built once per test session in a temporary directory (:func:`build`):

* pydicom's test files that are complete DICOM files (file meta with a transfer
  syntax, a SOP Class, not truncated, no bad VR) — CT, MR in every encoding pydicom
  ships (implicit, big endian, RLE, JPEG-LS, JPEG 2000), secondary captures in RGB and
  YBR, JPEG baseline/extended, multi-frame ultrasound, RT Dose/Plan, SR, segmentation,
  an ECG waveform, a deflated data set;
* ``rtstruct.dcm`` (pydicom ships it without file meta) given one, so that an RT
  Structure Set is in;
* DCMTK-compressed variants of CT_small (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``);
* a large uncompressed multi-frame object: 100 MB × ``DICOMFLOW_TEST_SCALE``, written
  a frame at a time (never whole in memory).

Several pydicom files share a SOP Instance UID (MR_small in nine encodings); DicomFlow
names and de-duplicates by it, so each repeat gets a distinct UID of the same length,
replaced in the file's bytes (no re-encoding: the file stays as pydicom ships it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.helpers import dcmtk, dicom_files, require_binary

SCALE = float(os.environ.get("DICOMFLOW_TEST_SCALE", "1") or 1)
BIG_SIZE = int(100 * 1024 * 1024 * SCALE)
# Not complete files: truncated, a bad VR, no file meta or no transfer syntax in it,
# or no SOP Class (nothing can route them).
INCOMPLETE = frozenset({
    "MR_truncated", "rtplan_truncated", "badVR", "ExplVR_BigEndNoMeta", "ExplVR_LitEndNoMeta",
    "no_meta", "no_meta_group_length", "meta_missing_tsyntax", "UN_sequence",
    "empty_charset_LEI", "nested_priv_SQ", "priv_SQ", "rtstruct",
})
DCMTK_VARIANTS = {"CT_small_dcmcjpeg": ("dcmcjpeg", "+ua"), "CT_small_dcmcjpls": ("dcmcjpls", "+ua"),
                  "CT_small_dcmcrle": ("dcmcrle", "+ua")}
FRAME = 512
# storescu proposes only uncompressed syntaxes unless told; one option per compression
PROPOSE = {
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
}


def pydicom_files() -> list[Path]:
    """pydicom's complete test files, by name."""
    folder = Path(get_testdata_file("CT_small.dcm")).parent
    return sorted(p for p in folder.glob("*.dcm") if p.stem not in INCOMPLETE)


def _unique_uid(path: Path, index: int) -> None:
    """Give ``path`` a new SOP Instance UID of the same length, in its bytes."""
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    parts = uid.split(".")
    at = max(i for i, part in enumerate(parts) if len(part) >= 4)  # its first digit stays
    parts[at] = f"{parts[at][:-3]}{index % 1000:03d}"
    new = ".".join(parts)
    raw = path.read_bytes()
    assert uid.encode() in raw, f"{path.name}: UID not found in its bytes (deflated?)"
    path.write_bytes(raw.replace(uid.encode(), new.encode()))


def _rtstruct(directory: Path) -> Path:
    """pydicom's rtstruct.dcm (a bare data set) written as a file with a file meta."""
    ds = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = directory / "rtstruct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dcmtk_variant(source: Path, target: Path, tool: str, *options: str) -> Path:
    subprocess.run([dcmtk(tool), *options, str(source), str(target)], check=True,
                   capture_output=True, timeout=120)
    return target


def big_object(path: Path, size: int = BIG_SIZE) -> Path:
    """An uncompressed Multi-frame Grayscale Word SC image of about ``size`` bytes,
    its pixel data streamed a frame at a time after a header pydicom writes."""
    frame_bytes = FRAME * FRAME * 2
    frames = max(1, size // frame_bytes)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "INTEROP^BIG", "BIG0001", "OT"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20261201", "", "", ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.PatientSex = "1", 1, 1, "O"
    ds.PatientBirthDate, ds.ConversionType = "", "WSD"
    ds.Laterality, ds.PatientOrientation, ds.BurnedInAnnotation = "", "", "NO"
    ds.PresentationLUTShape, ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = (
        "IDENTITY", "0", "1", "US")
    ds.Rows = ds.Columns = FRAME
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer, ds.FrameTime = (0x0018, 0x1063), 100
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as out:
        out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (frames * frame_bytes).to_bytes(4, "little"))
        for index in range(frames):
            out.write(_frame(index, frame_bytes))
    return path


def _frame(index: int, size: int) -> bytes:
    """A frame of 12-bit values that differs from every other frame."""
    seed = os.urandom(4096)
    values = bytes(b if i % 2 == 0 else (b & 0x0F) for i, b in enumerate(seed))
    return (values * (size // len(values) + 1))[:size - 2] + (index & 0x0FFF).to_bytes(2, "little")


def build(directory: Path) -> list[Path]:
    """The whole corpus in ``directory`` (every file a distinct SOP Instance UID)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [Path(shutil.copy(p, directory / p.name)) for p in pydicom_files()]
    files.append(_rtstruct(directory))
    ct = directory / "CT_small.dcm"
    files += [_dcmtk_variant(ct, directory / f"{name}.dcm", *command)
              for name, command in DCMTK_VARIANTS.items()]
    seen: set[str] = set()
    for index, path in enumerate(files):
        if instance_uid(path) in seen:
            _unique_uid(path, index)
        seen.add(instance_uid(path))
    files.append(big_object(directory / "big_multiframe.dcm"))
    assert len({instance_uid(p) for p in files}) == len(files)
    return files


def instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def storescu_option(path: Path) -> tuple[str, ...]:
    """The ``storescu`` option that makes it propose the file's own transfer syntax."""
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return (PROPOSE[syntax],) if syntax in PROPOSE else ()


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's error lines. It does not inflate a deflated data set (it stops at the
    file meta), so a deflated file is checked on an inflated copy (DCMTK ``dcmconv``)."""
    if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == DEFLATED:
        inflated = path.parent / f".inflated-{path.name}"
        subprocess.run([dcmtk("dcmconv"), "+te", str(path), str(inflated)], check=True,
                       capture_output=True, timeout=300)
        path = inflated
    result = subprocess.run([require_binary("/usr/bin/dciodvfy"), str(path)], capture_output=True,
                            text=True, errors="replace", timeout=300)
    return {line.strip() for line in (result.stdout + result.stderr).splitlines()
            if re.match(r"\s*Error", line)}


@cache
def source_errors(path: Path) -> frozenset[str]:
    """:func:`dciodvfy_errors` of a corpus file, once per run (every pair compares to it)."""
    return frozenset(dciodvfy_errors(path))


# -- what the run found: peer limits and findings, printed by tests/conftest.py --------

FOUND: list[str] = []


def record(line: str) -> None:
    """A peer limit, a finding or a count, for the run's summary."""
    FOUND.append(line)


def summary_lines() -> list[str]:
    return list(FOUND)


def uid_or_name(path: Path) -> str:
    """A file's SOP Instance UID, or its name when it does not parse (quarantined)."""
    try:
        return instance_uid(path)
    except Exception:  # noqa: BLE001 - a quarantined file may not parse
        return path.name


def set_aside(spool: Path, stages: tuple[str, ...]) -> dict[str, tuple[Path, str]]:
    """Files in the dead-end ``stages`` of ``spool`` by SOP Instance UID, with the
    reason from their sidecar ("stage: reason"; empty reason when there is none)."""
    found = {}
    for stage in stages:
        for path in dicom_files(spool / stage):
            sidecars = [s for s in (Path(f"{path}.reason"), Path(f"{path}.error")) if s.exists()]
            reason = sidecars[0].read_text(errors="replace").strip() if sidecars else ""
            found[uid_or_name(path)] = (path, f"{stage}: {reason}")
    return found


_BUILT: list[Path] = []


def session_corpus(tmp_path_factory) -> list[Path]:
    """The corpus built once per test session, whichever interop module asks first
    (the 100 MB object takes a while to write)."""
    if not _BUILT:
        _BUILT.extend(build(tmp_path_factory.mktemp("interop-corpus")))
    return list(_BUILT)
