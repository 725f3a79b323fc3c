"""Recording who sent a file in its Part-10 file meta, without copying the dataset.

pynetdicom's chunked receive writes the preamble and a file meta at the head of its
temp file, then appends the dataset bytes as they arrive. We make that file meta our
own: three AE-title elements — (0002,0016) Source, (0002,0017) Sending and
(0002,0018) Receiving AE Title — are added with 16 blank characters each, and once
the dataset is complete the real titles are written over the blanks in place (AE is
a fixed 16-byte slot, trailing spaces are insignificant). The dataset itself is
never re-encoded and never copied a second time.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom.dimse_messages as dimse_messages
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta

from pipeline.errors import PermanentError
from pipeline.log import escape
from pipeline.names import is_valid_uid

AE_SLOT = 16
_BLANK = b" " * AE_SLOT
_TAGS = {
    "source": b"\x02\x00\x16\x00AE\x10\x00",
    "sending": b"\x02\x00\x17\x00AE\x10\x00",
    "receiving": b"\x02\x00\x18\x00AE\x10\x00",
}
_HEAD = 4096  # the file meta we write is ~250 bytes; UIDs are at most 64 characters


def _create_file_meta_with_slots(**kwargs: object) -> FileMetaDataset:
    meta = create_file_meta(**kwargs)  # type: ignore[arg-type]
    meta.SourceApplicationEntityTitle = " " * AE_SLOT
    meta.SendingApplicationEntityTitle = " " * AE_SLOT
    meta.ReceivingApplicationEntityTitle = " " * AE_SLOT
    return meta


class _SlottedMeta:
    """The values of the file meta of a received file, encoded without pydicom.

    pynetdicom's chunked receive built a ``FileMetaDataset`` and wrote it with
    pydicom's general writer for every C-STORE (about a quarter of the receive daemon's
    Python time, issue 7); the layout is fixed, so :func:`_write_file_meta_info` writes
    the same bytes directly (explicit VR little endian, UIDs padded with NUL, the
    version name with a space, three blank AE-title slots).
    """

    def __init__(self, sop_class_uid: object, sop_instance_uid: object, transfer_syntax: object,
                 implementation_uid: object = PYNETDICOM_IMPLEMENTATION_UID,
                 implementation_version: object = PYNETDICOM_IMPLEMENTATION_VERSION) -> None:
        self.values = (sop_class_uid, sop_instance_uid, transfer_syntax, implementation_uid,
                       implementation_version)

    def encode(self) -> bytes | None:
        """The encoded group (group length included), or None for unusual values."""
        sop_class, instance, syntax, impl_uid, impl_version = self.values
        parts = [b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"]
        for element, value in ((0x0002, sop_class), (0x0003, instance), (0x0010, syntax),
                               (0x0012, impl_uid)):
            body = _text(value, b"\0")
            if body is None or not body:
                return None
            parts.append(struct.pack("<HH2sH", 0x0002, element, b"UI", len(body)) + body)
        body = _text(impl_version, b" ")
        if body is None:
            return None
        if body:
            parts.append(struct.pack("<HH2sH", 0x0002, 0x0013, b"SH", len(body)) + body)
        for element in (0x0016, 0x0017, 0x0018):
            parts.append(struct.pack("<HH2sH", 0x0002, element, b"AE", AE_SLOT) + _BLANK)
        group = b"".join(parts)
        return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(group)) + group


def _text(value: object, pad: bytes) -> bytes | None:
    if value is None:
        return b""
    if not isinstance(value, str):
        return None
    try:
        body = value.encode("ascii")
    except UnicodeEncodeError:
        return None
    if len(body) > 0xFFFE or b"\\" in body:
        return None
    return body + pad if len(body) % 2 else body


def _create_slotted_meta(**kwargs: Any) -> _SlottedMeta:
    return _SlottedMeta(**kwargs)


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """pydicom's ``write_file_meta_info``, short-cut for the meta our receive builds."""
    if isinstance(file_meta, _SlottedMeta):
        encoded = file_meta.encode()
        if encoded is not None:
            fp.write(encoded)
            return
        sop_class, instance, syntax, impl_uid, impl_version = file_meta.values
        file_meta = _create_file_meta_with_slots(
            sop_class_uid=sop_class, sop_instance_uid=instance, transfer_syntax=syntax,
            implementation_uid=impl_uid, implementation_version=impl_version)
    _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def install_ae_slots() -> None:
    """Make pynetdicom's chunked receive write our file meta (with AE-title slots).

    This replaces the ``create_file_meta`` and ``write_file_meta_info`` names
    pynetdicom's DIMSE decoder uses (nothing else there uses them); it is process-wide,
    so only the receive daemon calls it. pynetdicom is pinned to 3.0.4.
    """
    dimse_messages.create_file_meta = _create_slotted_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[assignment]


def clean_ae_title(value: object) -> bytes:
    """An AE title from the network as 16 safe bytes (printable ASCII, no backslash)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
    safe = "".join(ch if 0x20 <= ord(ch) < 0x7F and ch != "\\" else "_" for ch in text.strip())
    return safe[:AE_SLOT].ljust(AE_SLOT).encode("ascii")


def stamp_ae_titles(path: Path, calling: object, called: object) -> None:
    """Write the calling/called AE titles into the blank slots of a received file."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        head = os.pread(fd, _HEAD, 0)
        values = {"source": calling, "sending": calling, "receiving": called}
        for slot, tag in _TAGS.items():
            offset = head.find(tag + _BLANK, 132)
            if offset < 0:
                raise ValueError(f"no blank {slot} AE title slot in the file meta of {path.name}")
            os.pwrite(fd, clean_ae_title(values[slot]), offset + len(tag))
    finally:
        os.close(fd)


# -- reading a file meta --------------------------------------------------------------

_META_HEAD = 16 * 1024
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"UV"}


def read_meta_elements(path: Any) -> dict[int, bytes] | None:
    """The raw values of a Part-10 file's meta group (explicit VR little endian), read
    with one ``pread`` — or None when the file is anything but plain (no preamble, an
    odd layout, a meta larger than 16 KiB): the caller then asks pydicom."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        return None
    try:
        head = os.pread(fd, _META_HEAD, 0)
    finally:
        os.close(fd)
    if len(head) < 144 or head[128:132] != b"DICM":
        return None
    values: dict[int, bytes] = {}
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return values
        vr = head[offset + 4: offset + 6]
        if vr in _LONG_VR:
            if offset + 12 > len(head):
                return None
            length = struct.unpack_from("<L", head, offset + 8)[0]
            start = offset + 12
        elif vr.isalpha() and vr.isupper():
            length = struct.unpack_from("<H", head, offset + 6)[0]
            start = offset + 8
        else:
            return None
        if start + length > len(head):
            return None
        values[group << 16 | element] = head[start: start + length]
        offset = start + length
    return None


# -- what the sender reads of a file ------------------------------------------------------

@dataclass(frozen=True)
class FileMeta:
    """What the sender needs to know of a file before sending it (from its meta only)."""

    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID
    source_ae: str | None
    size: int


def read_file_meta(path: Path, size: int) -> FileMeta:
    """The sender's view of a spool file's meta; :class:`PermanentError` (with the reason
    for ``failed/``) when it has none usable. One ``pread`` in the common case, pydicom's
    reader for anything unusual."""
    fast = _read_meta_fast(path, size)
    if fast is not None:
        return _checked(fast)
    try:
        fm = read_file_meta_info(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, it is the file
        raise PermanentError(f"cannot read the DICOM file meta information: {exc}") from exc
    missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                           "TransferSyntaxUID") if not fm.get(k)]
    if missing:
        raise PermanentError(f"file meta information lacks {', '.join(missing)}")
    source = fm.get("SourceApplicationEntityTitle")
    return _checked(FileMeta(UID(str(fm.MediaStorageSOPClassUID)),
                             UID(str(fm.MediaStorageSOPInstanceUID)),
                             UID(str(fm.TransferSyntaxUID)), str(source) if source else None, size))


def _checked(meta: FileMeta) -> FileMeta:
    """The UIDs that go into a presentation context must be UIDs (digits and dots, at
    most 64 characters): pynetdicom refuses anything else for the whole association."""
    for label, uid in (("Media Storage SOP Class UID", meta.sop_class),
                       ("Transfer Syntax UID", meta.transfer_syntax)):
        if not is_valid_uid(str(uid)):
            raise PermanentError(f"the file meta {label} {escape(str(uid), limit=80)!r} is not a "
                                 f"valid UID ({len(str(uid))} characters; a UID is digits and "
                                 f"dots, at most 64)")
    return meta


def _read_meta_fast(path: Path, size: int) -> FileMeta | None:
    """The common case without pydicom (one ``pread``; issue 7): a plain explicit-VR
    file meta with the three UIDs. None sends anything unusual to pydicom's reader."""
    values = read_meta_elements(path)
    if values is None:
        return None
    uids = [values.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")
            for tag in (0x00020002, 0x00020003, 0x00020010)]
    if not all(uids):
        return None
    source = values.get(0x00020016, b"").strip(b"\0 ").decode("ascii", "replace")
    return FileMeta(UID(uids[0]), UID(uids[1]), UID(uids[2]), source or None, size)
