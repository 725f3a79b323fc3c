"""Cheap checks of a received data set before the receiver acknowledges it.

A C-STORE success tells the modality it may delete its copy. A data set that the filter
can only quarantine (cut short, encoded in another transfer syntax than its presentation
context says, not the instance the command announced) must therefore be refused with a
failure status *before* it is acknowledged, the way DCMTK's ``storescp`` refuses it —
not acknowledged and then quarantined.

Everything here reads element headers and a few short values by seeking, never the
pixel data, so it costs next to nothing for ordinary files:

* the structure walk of :func:`pipeline.header.check_complete` (every element inside
  the file);
* pixel data encapsulated (undefined length) although the context's transfer syntax is
  native — compressed pixel data sent in an uncompressed context;
* the data set's SOP Class and SOP Instance UIDs against the C-STORE command's (which
  pynetdicom wrote into the temp file's meta) — e.g. a file sent on another file's
  presentation context;
* for the deflated transfer syntaxes, the same checks on the inflated stream, inflated
  incrementally (bounded memory) up to :data:`MAX_INFLATED` bytes; an odd-length
  deflated stream is then padded to even length (:func:`pad_deflated`).

Each refusal is a :class:`Refusal` carrying the DIMSE status and an Error Comment.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.uid import UID

from pipeline.errors import QuarantineError
from pipeline.header import DEFLATED, EXPLICIT_BE, IMPLICIT_LE, PREAMBLE, check_complete
from pipeline.names import escape

STATUS_DOES_NOT_MATCH = 0xA900   # PS3.4 B.2.3: Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000
MAX_INFLATED = 1024 ** 3         # a deflated data set inflating beyond this is refused
EXPLICIT_LE = "1.2.840.10008.1.2.1"
INFLATE_CHUNK = 256 * 1024
LOOKBACK = 64 * 1024             # how far the walk may seek back in an inflated stream
SCAN_LIMIT = 64                  # top-level elements read while looking for the SOP UIDs
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


class Refusal(Exception):
    """A received data set that must not be acknowledged: status and Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(status, comment)
        self.status = status
        self.comment = comment

    def __str__(self) -> str:
        return f"0x{self.status:04X} {self.comment}"


@dataclass(frozen=True)
class Command:
    """What the C-STORE request announced and what its presentation context says."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def check_received(path: os.PathLike | str, command: Command) -> None:
    """Raise :class:`Refusal` if the received Part-10 temp file cannot be routed."""
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        head_len = _dataset_offset(fp, size)
        if command.transfer_syntax in DEFLATED:
            _check_deflated(fp, size, head_len, command)
            return
        _check_uids(fp, head_len, command, little=command.transfer_syntax != EXPLICIT_BE)
        _check_structure(fp, size, command.transfer_syntax, command)


def pad_deflated(path: os.PathLike | str, transfer_syntax: str) -> bool:
    """Pad an odd-length deflated data set with one NUL byte; True if it was padded.

    PS3.5 A.5 requires the deflated bitstream to be padded to an even length with a
    single trailing NULL byte; some files and senders (pydicom's ``image_dfl.dcm`` sent
    by GDCM) omit it, and DCMTK then refuses every fragment of it ("Odd Fragment
    Length"), so the file could never be delivered there. Inflating stops at the end
    of the deflate stream: the pad byte changes nothing in the data set.
    """
    if transfer_syntax not in DEFLATED:
        return False
    with open(path, "r+b") as fp:
        size = fp.seek(0, os.SEEK_END)
        if size % 2 == 0:
            return False
        fp.write(b"\0")
    return True


def _dataset_offset(fp: BinaryIO, size: int) -> int:
    """Where the data set starts: after the preamble and the file meta group."""
    fp.seek(PREAMBLE)
    while True:
        position = fp.tell()
        head = fp.read(8)
        if len(head) < 8 or struct.unpack_from("<H", head)[0] != 0x0002:
            return position
        if head[4:6] in _LONG_VRS:
            extra = fp.read(4)
            length = struct.unpack("<L", extra)[0] if len(extra) == 4 else size
        else:
            length = struct.unpack_from("<H", head, 6)[0]
        if fp.tell() + length > size:
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "file meta is cut short")
        fp.seek(fp.tell() + length)


def _check_structure(fp: BinaryIO, size: int, syntax: str, command: Command) -> None:
    spy = _PixelSpy(fp, little=syntax != EXPLICIT_BE)
    try:
        check_complete(spy, size, syntax, command.sop_class_uid)  # type: ignore[arg-type]
    except QuarantineError as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"data set {exc}") from None
    if spy.encapsulated and not UID(syntax).is_encapsulated:
        raise Refusal(STATUS_CANNOT_UNDERSTAND,
                      f"encapsulated (compressed) pixel data in a {_syntax_name(syntax)} context")


def _syntax_name(syntax: str) -> str:
    name = UID(syntax).name
    return escape(name if name != syntax else syntax, 80)


# -- the SOP Class and Instance UIDs of the data set ------------------------------------

def _check_uids(fp: BinaryIO, start: int, command: Command, little: bool) -> None:
    """Compare the data set's SOP UIDs with the command's, as ``storescp`` does.

    Only the first top-level elements are read (the UIDs are in group 0008, near the
    start). If the scan meets something it does not follow (an undefined length before
    the UIDs, an odd VR), it gives up silently: the structure walk judges the rest.
    """
    found = _scan_sop_uids(fp, start, little)
    if found is None:
        return
    sop_class, instance = found
    if not instance:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "no SOP Instance UID in the data set")
    if sop_class and sop_class != command.sop_class_uid:
        raise Refusal(STATUS_DOES_NOT_MATCH,
                      f"data set SOP Class {escape(sop_class, 64)} is not the command's")
    if instance != command.sop_instance_uid:
        raise Refusal(STATUS_DOES_NOT_MATCH,
                      f"data set SOP Instance {escape(instance, 64)} is not the command's")


def _scan_sop_uids(fp: BinaryIO, start: int, little: bool) -> tuple[str, str] | None:
    fp.seek(start)
    head = fp.read(6)
    fp.seek(start)
    explicit = len(head) == 6 and head[4:6].isalpha() and head[4:6].isupper()
    end = "<" if little else ">"
    values: dict[int, str] = {}
    for _ in range(SCAN_LIMIT):
        raw = fp.read(8)
        if len(raw) < 8:
            break
        group, element = struct.unpack(end + "HH", raw[:4])
        tag = group << 16 | element
        if tag > _SOP_INSTANCE:
            break
        if not explicit:
            length = struct.unpack(end + "L", raw[4:])[0]
        elif raw[4:6] in _LONG_VRS:
            extra = fp.read(4)
            if len(extra) < 4:
                return None
            length = struct.unpack(end + "L", extra)[0]
        elif raw[4:6].isalpha() and raw[4:6].isupper():
            length = struct.unpack(end + "H", raw[6:])[0]
        else:
            return None
        if length == _UNDEFINED:
            return None
        if tag in (_SOP_CLASS, _SOP_INSTANCE):
            if length > 128:
                return None
            values[tag] = fp.read(length).decode("ascii", "replace").rstrip("\0 ")
        else:
            fp.seek(fp.tell() + length)
    return values.get(_SOP_CLASS, ""), values.get(_SOP_INSTANCE, "")


# -- encapsulated pixel data -------------------------------------------------------------

class _PixelSpy:
    """A file wrapper that notices the structure walk reading an undefined-length
    (encapsulated) Pixel Data element, at any depth; it reads nothing itself."""

    def __init__(self, fp: BinaryIO, little: bool) -> None:
        self.fp = fp
        self.seek, self.tell = fp.seek, fp.tell  # not wrapped: the walk calls them a lot
        self.pixel_tag = struct.pack("<HH" if little else ">HH", 0x7FE0, 0x0010)
        self.after_tag = -1      # bytes read since the last Pixel Data tag, -1 = none
        self.encapsulated = False

    def read(self, count: int = -1) -> bytes:
        data = self.fp.read(count)
        if data == self.pixel_tag:
            self.after_tag = 0
        elif self.after_tag >= 0:
            self.after_tag += len(data)
            if len(data) == 4 and self.after_tag in (4, 8):  # implicit / explicit OB/OW
                if data == b"\xff\xff\xff\xff":
                    self.encapsulated = True
                self.after_tag = -1
            elif self.after_tag > 8:
                self.after_tag = -1
        return data



# -- deflated transfer syntaxes ------------------------------------------------------------

def _check_deflated(fp: BinaryIO, size: int, head_len: int, command: Command) -> None:
    """Inflate the data set (bounded, incrementally) and check it as explicit VR LE."""
    fp.seek(0)
    head = fp.read(head_len)
    reader = _Inflated(fp, head, size)
    _check_uids(reader, head_len, command, little=True)  # type: ignore[arg-type]
    inflated_end = reader.inflate_all()
    _check_structure(_Inflated(fp, head, size), inflated_end, EXPLICIT_LE,  # type: ignore[arg-type]
                     command)


class _Inflated:
    """A read-only, forward-seeking file over the Part-10 head followed by the inflated
    data set; keeps :data:`LOOKBACK` bytes behind the furthest read for small seeks back.
    """

    def __init__(self, fp: BinaryIO, head: bytes, size: int) -> None:
        self.fp, self.head, self.size = fp, head, size
        fp.seek(len(head))
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.window = bytearray()
        self.window_start = len(head)   # virtual offset of window[0]
        self.produced = len(head)       # virtual offset just after the inflated bytes so far
        self.position = 0
        self.done = False

    def _more(self) -> None:
        if self.done:
            return
        compressed = self.fp.read(INFLATE_CHUNK)
        try:
            if compressed:
                data = self.inflater.decompress(compressed, INFLATE_CHUNK * 64)
                while self.inflater.unconsumed_tail:
                    self._append(data)
                    data = self.inflater.decompress(self.inflater.unconsumed_tail, INFLATE_CHUNK * 64)
            else:
                data = self.inflater.flush()
                self.done = True
        except zlib.error as exc:
            raise Refusal(STATUS_CANNOT_UNDERSTAND, f"deflated data set does not inflate: {exc}") from None
        if self.inflater.eof:
            self.done = True
        self._append(data)

    def _append(self, data: bytes) -> None:
        self.produced += len(data)
        if self.produced - len(self.head) > MAX_INFLATED:
            raise Refusal(STATUS_CANNOT_UNDERSTAND,
                          f"deflated data set inflates beyond {MAX_INFLATED} bytes")
        self.window += data
        keep_from = min(len(self.window), self.position - LOOKBACK - self.window_start)
        if keep_from > 0:
            del self.window[:keep_from]
            self.window_start += keep_from

    def inflate_all(self) -> int:
        """Inflate to the end (bounded); the virtual size of head + inflated data set."""
        while not self.done:
            self.position = self.produced
            self._more()
        return self.produced

    def read(self, count: int = -1) -> bytes:
        if count < 0:
            raise ValueError("unbounded read of an inflated stream")
        start = self.position
        if start < len(self.head):
            data = self.head[start:start + count]
            self.position += len(data)
            if len(data) == count:
                return data
            return data + self.read(count - len(data))
        while self.produced < start + count and not self.done:
            self._more()
        if start < self.window_start:
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "inflated data set needs a seek too far back")
        data = bytes(self.window[start - self.window_start:start - self.window_start + count])
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("only absolute seeks")
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position


__all__ = ["Command", "Refusal", "check_received", "IMPLICIT_LE", "MAX_INFLATED"]
