"""Cheap checks of a received data set before the receiver acknowledges it.

A C-STORE success tells the modality it may delete its copy. A data set that the filter
can only quarantine (cut short, encoded in another transfer syntax than its presentation
context says, not the instance the command announced) must therefore be refused with a
failure status *before* it is acknowledged, the way DCMTK's ``storescp`` refuses it —
not acknowledged and then quarantined.

Everything here reads element headers and a few short values by seeking, never the
pixel data, so it costs next to nothing for ordinary files:

* the structure walk of :func:`pipeline.header.check_complete` with the filter's own
  limits (every element inside the file; a deflated data set inflated in chunks up to
  ``[filter] max_inflated_size``), so the receiver refuses exactly what the filter
  would quarantine;
* pixel data encapsulated (undefined length) although the context's transfer syntax is
  native — compressed pixel data sent in an uncompressed context;
* the data set's SOP Class and SOP Instance UIDs against the C-STORE command's (which
  pynetdicom wrote into the temp file's meta) — e.g. a file sent on another file's
  presentation context.

An odd-length deflated stream is padded to even length (:func:`pad_deflated`).

Each refusal is a :class:`Refusal` carrying the DIMSE status and an Error Comment.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.uid import UID

from pipeline.dicom.filemeta import LONG_VRS, read_meta_group
from pipeline.errors import InflateError, MetaError, QuarantineError, Refusal
from pipeline.header import (
    DEFAULT_LIMITS,
    DEFLATED,
    EXPLICIT_BE,
    HeaderLimits,
    InflatingReader,
    check_complete,
)
from pipeline.names import escape

STATUS_DOES_NOT_MATCH = 0xA900   # PS3.4 B.2.3: Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000
SCAN_LIMIT = 64                  # top-level elements read while looking for the SOP UIDs
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Command:
    """What the C-STORE request announced and what its presentation context says."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def check_received(path: os.PathLike | str, command: Command,
                   limits: HeaderLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`Refusal` if the received Part-10 temp file cannot be routed."""
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        head_len = _dataset_offset(fp, size)
        if command.transfer_syntax in DEFLATED:
            _check_deflated_uids(fp, head_len, command, limits)
        else:
            _check_uids(fp, head_len, command, little=command.transfer_syntax != EXPLICIT_BE)
        _check_structure(fp, size, command, limits)


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
    """Where the data set starts: after the file meta group (the one reader of it,
    :func:`pipeline.dicom.filemeta.read_meta_group`)."""
    def read_at(offset: int, count: int) -> bytes:
        fp.seek(offset)
        return fp.read(count)
    try:
        return read_meta_group(read_at, size).end
    except MetaError as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, str(exc)) from None


def _check_structure(fp: BinaryIO, size: int, command: Command, limits: HeaderLimits) -> None:
    syntax = command.transfer_syntax
    try:
        structure = check_complete(fp, size, syntax, command.sop_class_uid, limits=limits)
    except QuarantineError as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"data set {exc}") from None
    if structure.encapsulated_pixel_data and not UID(syntax).is_encapsulated:
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
        elif raw[4:6] in LONG_VRS:
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


# -- deflated transfer syntaxes ------------------------------------------------------------

def _check_deflated_uids(fp: BinaryIO, head_len: int, command: Command, limits: HeaderLimits) -> None:
    """The SOP UID check on the start of the inflated data set (inflated on demand,
    bounded like the structure walk that follows)."""
    fp.seek(head_len)
    reader = InflatingReader(fp, limits.max_inflated_size)
    try:
        _check_uids(reader, 0, command, little=True)  # type: ignore[arg-type]
    except InflateError as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"data set {exc}") from None


__all__ = ["Command", "Refusal", "check_received", "pad_deflated"]
