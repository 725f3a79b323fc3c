"""Safe, bounded reading of a DICOM file's header (everything before the pixel data).

Anything in ``incoming/`` may be hostile or half-broken, so reading follows three rules:

* **Never follow, never block.** A file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and
  must be a regular file (``fstat``): a symlink to ``/etc/shadow`` is never read, a FIFO
  never blocks the filter, a device or directory is refused.
* **Bounded memory.** pydicom stops before the pixel data and defers any other large
  value (which is then dropped), so a 1 GiB object costs what a small one costs.
* **Complete or refused.** pydicom silently accepts files cut short almost anywhere, so
  a seek-only walk over the element structure checks that every element (pixel data
  and its fragments included) lies inside the file before anything is routed.

Every refusal is a :class:`QuarantineError` whose message is the quarantine reason.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.errors import QuarantineError
from pipeline.names import escape, is_valid_uid

DEFER_SIZE = 64 * 1024          # larger non-pixel values are not read (nor needed by rules)
MAX_META_ELEMENT = 64 * 1024    # a file meta element larger than this is hostile
MAX_DEPTH = 16                  # nested sequences deeper than this are hostile
PREAMBLE = 132                  # 128-byte preamble + b"DICM"

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


@dataclass(frozen=True)
class Header:
    """What the filter needs to know about a file, read without its pixel data."""

    dataset: Dataset
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int


# -- opening -------------------------------------------------------------------------

def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only if, and only if, it is a non-empty regular file.

    Returns the descriptor and its ``fstat``; the caller closes it. Raises
    QuarantineError for symlinks, FIFOs, sockets, devices, directories and empty files;
    FileNotFoundError if it vanished.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise QuarantineError(f"a symbolic link ({_link_target(path)}), never followed") from None
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket
            raise QuarantineError("not a regular file (a socket)") from None
        raise
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind:
            raise QuarantineError(f"not a regular file ({kind})")
        if st.st_size == 0:
            raise QuarantineError("zero bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _kind(mode: int) -> str | None:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISDIR: "a directory", stat.S_ISSOCK: "a socket", stat.S_ISLNK: "a symbolic link"}
    for test, name in kinds.items():
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _link_target(path: Path) -> str:
    try:
        return "-> " + escape(os.readlink(path))
    except OSError:
        return "target unreadable"


# -- reading -------------------------------------------------------------------------

def quiet_pydicom() -> None:
    """pydicom logs untrusted values unescaped (forged log lines): silence it in daemons."""
    pydicom_logger = logging.getLogger("pydicom")
    pydicom_logger.handlers[:] = [logging.NullHandler()]
    pydicom_logger.propagate = False


def read_header(path: Path) -> Header:
    """Open ``path`` safely and read its header (the dry run and tests use this)."""
    fd, st = open_regular(path)
    try:
        return read_header_fd(fd, st.st_size)
    finally:
        os.close(fd)


def read_header_fd(fd: int, size: int) -> Header:
    """Read and validate the header of an open regular file of ``size`` bytes."""
    with os.fdopen(fd, "rb", closefd=False) as fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings echo untrusted values unescaped
        fp.seek(0)
        try:
            ds = dcmread(fp, stop_before_pixels=True, defer_size=DEFER_SIZE)
        except InvalidDicomError:
            raise QuarantineError("not a DICOM Part-10 file (no 'DICM' prefix or file meta)") from None
        except Exception as exc:  # pydicom raises many types on garbage
            raise QuarantineError(f"unreadable DICOM header: {_describe(exc)}") from None
        _drop_deferred(ds)
        header = _validate(ds, size)
        check_complete(fp, size, header.transfer_syntax, header.sop_class_uid)
    return header


def _describe(exc: BaseException) -> str:
    return escape(f"{type(exc).__name__}: {exc}", limit=300)


def _drop_deferred(ds: Dataset) -> None:
    """Remove values pydicom deferred: they are large, and the descriptor is about to close."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length not in (0, _UNDEFINED):
            del ds[tag]


def _validate(ds: Dataset, size: int) -> Header:
    try:
        meta = ds.file_meta
        syntax = str(meta.get("TransferSyntaxUID") or "")
        meta_instance = str(meta.get("MediaStorageSOPInstanceUID") or "")
        meta_class = str(meta.get("MediaStorageSOPClassUID") or "")
        instance = str(ds.get("SOPInstanceUID") or "")
        sop_class = str(ds.get("SOPClassUID") or "")
    except Exception as exc:
        raise QuarantineError(f"unreadable header attributes: {_describe(exc)}") from None
    if not syntax:
        raise QuarantineError("file meta has no TransferSyntaxUID (0002,0010)")
    if not meta_instance or not meta_class:
        raise QuarantineError("file meta lacks MediaStorageSOPClassUID/MediaStorageSOPInstanceUID")
    if not instance:
        raise QuarantineError("no SOP Instance UID (0008,0018)")
    if not is_valid_uid(instance):
        raise QuarantineError(f"invalid SOP Instance UID {escape(instance, 80)!r}")
    if instance != meta_instance:
        raise QuarantineError(
            f"SOP Instance UID {escape(instance, 80)} does not match the file meta's "
            f"MediaStorageSOPInstanceUID {escape(meta_instance, 80)}"
        )
    if sop_class and sop_class != meta_class:
        raise QuarantineError(
            f"SOP Class UID {escape(sop_class, 80)} does not match the file meta's "
            f"MediaStorageSOPClassUID {escape(meta_class, 80)}"
        )
    if not is_valid_uid(meta_class):
        raise QuarantineError(f"invalid SOP Class UID {escape(meta_class, 80)!r}")
    return Header(ds, instance, meta_class, syntax, size)


# -- completeness --------------------------------------------------------------------

class _Truncated(Exception):
    pass


def check_complete(fp: BinaryIO, size: int, transfer_syntax: str, sop_class_uid: str = "") -> None:
    """Walk the element structure by seeking; refuse a file cut short or malformed.

    Deflated transfer syntaxes cannot be walked without inflating them; pydicom's read
    has to do for those.
    """
    walker = _Walker(fp, size)
    try:
        fp.seek(PREAMBLE)
        walker.meta()
        if transfer_syntax in DEFLATED:
            return
        walker.little = transfer_syntax != EXPLICIT_BE
        walker.explicit = walker.sniff_explicit(transfer_syntax != IMPLICIT_LE)
        walker.dataset(depth=0, until_item_end=False)
    except _Truncated as exc:
        raise QuarantineError(f"truncated or corrupt: {exc}") from None
    if walker.pixel_data_at is None and _is_image_class(sop_class_uid):
        raise QuarantineError("truncated: an image without pixel data")


def _is_image_class(sop_class_uid: str) -> bool:
    name = UID_dictionary.get(sop_class_uid, ("",))[0]
    return name.endswith("Image Storage")


class _Walker:
    """A seek-only reader of element headers; holds nothing but offsets."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp, self.size = fp, size
        self.little, self.explicit = True, True
        self.pixel_data_at: int | None = None

    def sniff_explicit(self, expected: bool) -> bool:
        """Like pydicom, trust the first element's bytes over a wrong transfer syntax."""
        start = self.fp.tell()
        head = self.fp.read(6)
        self.fp.seek(start)
        if len(head) < 6:
            return expected
        looks_explicit = head[4:6].isalpha() and head[4:6].isupper()
        return looks_explicit

    def _read(self, count: int) -> bytes:
        offset = self.fp.tell()
        data = self.fp.read(count)
        if len(data) != count:
            raise _Truncated(f"file ends at byte {self.size} inside an element header at {offset}")
        return data

    def _skip(self, length: int, what: str) -> None:
        start = self.fp.tell()
        if start + length > self.size:
            raise _Truncated(
                f"{what} at byte {start} needs {length} bytes but the file ends at {self.size}")
        self.fp.seek(start + length)

    def _tag(self) -> int:
        group, element = struct.unpack("<HH" if self.little else ">HH", self._read(4))
        return group << 16 | element

    def _element(self, tag: int) -> tuple[bytes | None, int]:
        """The VR (explicit syntaxes) and length following a tag."""
        end = "<" if self.little else ">"
        if tag >> 16 == 0xFFFE or not self.explicit:
            return None, struct.unpack(end + "L", self._read(4))[0]
        vr = self._read(2)
        if vr in _LONG_VRS:
            self._read(2)
            return vr, struct.unpack(end + "L", self._read(4))[0]
        if not vr.isalpha() or not vr.isupper():
            raise _Truncated(f"invalid VR {vr!r} for tag {tag:08X} at byte {self.fp.tell() - 6}")
        return vr, struct.unpack(end + "H", self._read(2))[0]

    def meta(self) -> None:
        """The file meta group: explicit VR little endian, small elements only."""
        while self.fp.tell() < self.size:
            position = self.fp.tell()
            if self._tag() >> 16 != 0x0002:
                self.fp.seek(position)
                return
            _, length = self._element(0x00020000)
            if length > MAX_META_ELEMENT:
                raise _Truncated(f"file meta element of {length} bytes at byte {position}")
            self._skip(length, "file meta element")

    def dataset(self, depth: int, until_item_end: bool) -> None:
        if depth > MAX_DEPTH:
            raise _Truncated(f"sequences nested deeper than {MAX_DEPTH}")
        while self.fp.tell() < self.size or until_item_end:
            tag = self._tag()
            vr, length = self._element(tag)
            if depth == 0 and tag in _PIXEL_TAGS:
                self.pixel_data_at = self.fp.tell()
            if tag == _ITEM_END:
                if until_item_end:
                    return
                raise _Truncated(f"item delimiter outside an item at byte {self.fp.tell() - 8}")
            if length != _UNDEFINED:
                self._skip(length, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            else:
                self._items(depth + 1, implicit_inside=vr == b"UN")

    def _items(self, depth: int, implicit_inside: bool) -> None:
        """An undefined-length sequence or encapsulated pixel data, to its delimiter."""
        saved = self.explicit
        if implicit_inside:
            self.explicit = False
        try:
            while True:
                tag = self._tag()
                _, length = self._element(tag)
                if tag == _SEQ_END:
                    return
                if tag != _ITEM:
                    raise _Truncated(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
                if length == _UNDEFINED:
                    self.dataset(depth, until_item_end=True)
                else:
                    self._skip(length, "sequence item or fragment")
        finally:
            self.explicit = saved
