"""A corpus of malformed, hostile and unsafe "DICOM" files, generated on the fly.

``build(directory)`` writes each case into ``directory`` and returns what the filter
must say about it (a substring of the quarantine reason). Used by the header tests,
the daemon tests and the end-to-end test, so every one of them sees the same zoo.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from tests.helpers import make_dataset


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # a substring of the quarantine reason


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.preamble = b"\0" * 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _valid() -> bytes:
    return _bytes(make_dataset())


def _set_uid(value: str, meta_too: bool = True) -> bytes:
    ds = make_dataset()
    ds.SOPInstanceUID = value
    if meta_too:
        ds.file_meta.MediaStorageSOPInstanceUID = value
    return _bytes(ds)


def _no_instance_uid() -> bytes:
    ds = make_dataset()
    del ds.SOPInstanceUID
    return _bytes(ds)


def _no_pixels() -> bytes:
    ds = make_dataset()
    del ds.PixelData
    return _bytes(ds)


def _class_mismatch() -> bytes:
    ds = make_dataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    return _bytes(ds)


def _element(group: int, element: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    length = len(value) if length is None else length
    return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<L", length) + value


def _meta_prefix() -> bytes:
    """A valid preamble and file meta of a small CT (explicit VR little endian)."""
    data = _valid()
    ds_start = data.index(b"\x08\x00")  # first group-0008 element after the meta
    while data[ds_start + 2:ds_start + 4] == b"\x02\x00" or ds_start < 132:
        ds_start = data.index(b"\x08\x00", ds_start + 1)
    return data[:ds_start]


def _deep_nesting(depth: int = 40) -> bytes:
    ds = make_dataset()
    body = _bytes(ds)
    pixel = body.rindex(b"\xe0\x7f\x10\x00")
    nested = b""
    for _ in range(depth):
        nested += struct.pack("<HH", 0x0040, 0x0275) + b"SQ\0\0" + b"\xff\xff\xff\xff"
        nested += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    for _ in range(depth):
        nested += struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return body[:pixel] + nested + body[pixel:]


def _huge_length() -> bytes:
    body = _valid()
    pixel = body.rindex(b"\xe0\x7f\x10\x00")
    return body[:pixel] + _element(0x0009, 0x1010, b"UN", b"xx", length=0x7FFFFFF0) + body[pixel:]


def _testdata(name: str) -> Callable[[], bytes]:
    return lambda: Path(get_testdata_file(name)).read_bytes()


FILE_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty.dcm": (lambda: b"", "zero bytes"),
    "text.txt": (lambda: b"hello, I am not DICOM\n" * 10, "not a DICOM Part-10 file"),
    "random.bin": (lambda: os.urandom(4096), "not a DICOM Part-10 file"),
    "dicm-only.dcm": (lambda: b"\0" * 128 + b"DICM", "file meta"),
    "dicm-garbage.dcm": (lambda: b"\0" * 128 + b"DICM" + os.urandom(300), ""),
    "no-meta.dcm": (_testdata("no_meta.dcm"), "not a DICOM Part-10 file"),
    "meta-no-syntax.dcm": (_testdata("meta_missing_tsyntax.dcm"), "TransferSyntaxUID"),
    "truncated-pixels.dcm": (lambda: _valid()[:-100], "truncated"),
    "truncated-header.dcm": (lambda: _valid()[:603], "truncated"),
    "pydicom-truncated.dcm": (_testdata("MR_truncated.dcm"), "truncated"),
    "no-instance-uid.dcm": (_no_instance_uid, "SOP Instance UID"),
    "bad-uid.dcm": (lambda: _set_uid("1.2.3/../../../etc/passwd"), "invalid SOP Instance UID"),
    "long-uid.dcm": (lambda: _set_uid("1." + "2" * 70), "invalid SOP Instance UID"),
    "uid-mismatch.dcm": (lambda: _set_uid("1.2.3.4", meta_too=False), "does not match"),
    "class-mismatch.dcm": (_class_mismatch, "does not match"),
    "image-no-pixels.dcm": (_no_pixels, "without pixel data"),
    "deep-nesting.dcm": (_deep_nesting, "nested deeper"),
    "huge-length.dcm": (_huge_length, "truncated"),
}


def build(directory: Path) -> list[Case]:
    """Write every case into ``directory``; return the expectations."""
    directory.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (make, expect) in FILE_CASES.items():
        (directory / name).write_bytes(make())
        cases.append(Case(name, expect))
    valid = directory.parent / f".{directory.name}-valid-target.dcm"
    valid.write_bytes(_valid())
    os.symlink("/etc/shadow", directory / "shadow-link.dcm")
    os.symlink(valid, directory / "valid-link.dcm")
    os.symlink(directory / "nowhere", directory / "dangling-link.dcm")
    os.mkfifo(directory / "fifo.dcm")
    (directory / "a-directory").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), directory / "a-directory" / "inside.dcm")
    cases += [Case("shadow-link.dcm", "symbolic link"), Case("valid-link.dcm", "symbolic link"),
              Case("dangling-link.dcm", "symbolic link"), Case("fifo.dcm", "FIFO"),
              Case("a-directory", "directory")]
    return cases
