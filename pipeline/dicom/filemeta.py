"""The Part-10 file meta: the one reader of it, and the writer that records who sent a file.

Reading (:func:`read_meta_group`): every component that needs a file's meta — the
sender's presentation-context planning, the receiver's intake checks, the filter's
header reader — reads it here, in one bounded ``pread`` with element and byte limits
checked before anything is held (a hostile file cannot make us allocate by declaring).

Writing: pynetdicom's chunked receive writes the preamble and a file meta at the head of its
temp file, then appends the dataset bytes as they arrive. We make that file meta our
own: three AE-title elements — (0002,0016) Source, (0002,0017) Sending and
(0002,0018) Receiving AE Title — are added with 16 blank characters each, and once
the dataset is complete the real titles are written over the blanks in place (AE is
a fixed 16-byte slot, trailing spaces are insignificant). The dataset itself is
never re-encoded and never copied a second time.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
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

from pipeline.errors import MetaCutShort, MetaError, MetaOverLimit, PermanentError
from pipeline.log import escape
from pipeline.names import is_valid_uid
from pipeline.shaping import provenance

AE_SLOT = 16
_BLANK = b" " * AE_SLOT
_TAGS = {
    "source": b"\x02\x00\x16\x00AE\x10\x00",
    "sending": b"\x02\x00\x17\x00AE\x10\x00",
    "receiving": b"\x02\x00\x18\x00AE\x10\x00",
}
_STAMP_HEAD = 4096  # the file meta we write is ~250 bytes; UIDs are at most 64 characters


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


def received_file_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                       calling: object, called: object) -> bytes:
    """The preamble and file meta of a received file, as pynetdicom's chunked receive
    writes them with :func:`install_ae_slots` and :func:`stamp_ae_titles` fills them in
    afterwards — byte for byte — for the receive data path, which knows the titles
    before the first byte (:mod:`pipeline.dicom.store_receive`)."""
    meta = _SlottedMeta(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                        transfer_syntax=transfer_syntax)
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    _write_file_meta_info(out, meta)
    head = bytearray(out.getvalue())
    values = {"source": calling, "sending": calling, "receiving": called}
    for slot, tag in _TAGS.items():
        offset = head.find(tag + _BLANK, 132)
        if offset < 0:
            raise ValueError(f"no blank {slot} AE title slot in the file meta")
        head[offset + len(tag): offset + len(tag) + AE_SLOT] = clean_ae_title(values[slot])
    return bytes(head)


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
        head = os.pread(fd, _STAMP_HEAD, 0)
        values = {"source": calling, "sending": calling, "receiving": called}
        for slot, tag in _TAGS.items():
            offset = head.find(tag + _BLANK, 132)
            if offset < 0:
                raise ValueError(f"no blank {slot} AE title slot in the file meta of {path.name}")
            os.pwrite(fd, clean_ae_title(values[slot]), offset + len(tag))
    finally:
        os.close(fd)


# -- reading a file meta --------------------------------------------------------------

PREAMBLE = 132                 # 128-byte preamble + b"DICM"
MAX_META_ELEMENT = 64 * 1024   # a file meta element larger than this is hostile (as header.py)
_HEAD = 16 * 1024              # read at once: the whole meta of every ordinary file
#: explicit VRs with a reserved 2 bytes and a 4-byte length (PS3.5 §7.1.2); header.py and
#: intake.py walk data sets with it too
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                      b"UV"})


@dataclass(frozen=True)
class MetaGroup:
    """A Part-10 file meta group: the raw value of each element, and where the data set
    starts (the first byte after the group)."""

    values: dict[int, bytes]
    end: int
    count: int = 0  # elements read (a repeated tag counts each time)

    @property
    def held(self) -> int:
        """Bytes of element headers and values (what a reader keeps of it)."""
        return self.end - PREAMBLE

    def text(self, tag: int) -> str:
        """A UI/AE value as text, its padding (NUL or space) removed."""
        return self.values.get(tag, b"").strip(b"\0 ").decode("ascii", "replace")


class _Head:
    """The file's first ``_HEAD`` bytes from one ``pread``; anything further on is read
    when asked for."""

    def __init__(self, read_at: Callable[[int, int], bytes]) -> None:
        self.read_at = read_at
        self.head = read_at(0, _HEAD)

    def get(self, offset: int, count: int) -> bytes:
        if offset + count <= len(self.head) or len(self.head) < _HEAD:
            return self.head[offset: offset + count]
        return self.read_at(offset, count)


def read_meta_group(read_at: Callable[[int, int], bytes], size: int,
                    max_elements: int | None = None, max_bytes: int | None = None) -> MetaGroup:
    """The one reader of a Part-10 file meta group (the sender's spool files, the
    receiver's temp files, the filter's headers): ``read_at(offset, count)`` reads the
    file of ``size`` bytes. Explicit VR little endian only, every element within the
    file and at most ``MAX_META_ELEMENT`` bytes, at most ``max_elements`` elements and
    ``max_bytes`` bytes of headers and values (hostile input: checked before anything
    is held); anything else raises :class:`MetaError` (a caller that accepts unusual
    files then asks pydicom)."""
    buf = _Head(read_at)
    if size < PREAMBLE or buf.get(128, 4) != b"DICM":
        raise MetaError("not a DICOM Part-10 file (no 'DICM' prefix)")
    values: dict[int, bytes] = {}
    offset, count = PREAMBLE, 0
    while offset + 8 <= size:
        header = buf.get(offset, 8)
        group, element = struct.unpack_from("<HH", header)
        if group != 0x0002:
            break
        vr = header[4:6]
        if vr in LONG_VRS:
            extra = buf.get(offset + 8, 4)
            if offset + 12 > size or len(extra) < 4:
                raise MetaCutShort("file meta is cut short")
            length, start = struct.unpack("<L", extra)[0], offset + 12
        elif vr.isalpha() and vr.isupper():
            length, start = struct.unpack_from("<H", header, 6)[0], offset + 8
        else:
            raise MetaError(f"file meta element with an unknown VR at byte {offset}")
        if length > MAX_META_ELEMENT:
            raise MetaError(f"file meta element of {length} bytes at byte {offset}")
        count += 1
        if max_elements is not None and count > max_elements:
            raise MetaOverLimit("elements", max_elements)
        if max_bytes is not None and start + length - PREAMBLE > max_bytes:
            raise MetaOverLimit("bytes", max_bytes)
        if start + length > size:
            raise MetaCutShort("file meta is cut short")
        values[group << 16 | element] = buf.get(start, length)
        offset = start + length
    return MetaGroup(values, offset, count)


def read_meta_file(path: Any) -> MetaGroup:
    """:func:`read_meta_group` of a file (one ``pread`` for an ordinary one; symbolic
    links are not followed). FileNotFoundError passes; another OSError opening it is a
    :class:`MetaError` (the caller's fallback reports it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise MetaError(f"cannot open the file: {exc.strerror or exc}") from exc
    try:
        return read_meta_group(lambda offset, count: os.pread(fd, count, offset),
                               os.fstat(fd).st_size)
    finally:
        os.close(fd)


# -- what the sender reads of a file ------------------------------------------------------

@dataclass(frozen=True)
class FileMeta:
    """What the sender needs to know of a file before sending it (from its meta only)."""

    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID
    source_ae: str | None
    size: int
    #: the endpoint the filter shaped this copy for (None: not a shaped copy)
    shaped_for: str | None = None


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
                             UID(str(fm.TransferSyntaxUID)), str(source) if source else None, size,
                             provenance.shaped_for(provenance.meta_values(fm))))


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
    try:
        group = read_meta_file(path)
    except MetaError:
        return None
    uids = [group.values.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")
            for tag in (0x00020002, 0x00020003, 0x00020010)]
    if not all(uids):
        return None
    source = group.text(0x00020016)
    return FileMeta(UID(uids[0]), UID(uids[1]), UID(uids[2]), source or None, size,
                    provenance.shaped_for(group.values))
