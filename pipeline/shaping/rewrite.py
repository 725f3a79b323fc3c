"""Write a shaped copy of a DICOM file: the header rewritten, everything else copied.

A received file is never edited: the shaped copy is a new file, written by the caller
through the spool (hidden temp → fsync → rename → directory fsync). Only the header is
decoded — the elements before the pixel data, read by pydicom with large values
deferred — and of those only the attributes an operation changed (plus the Original
Attributes Sequence, :mod:`pipeline.shaping.provenance`) are re-encoded, in the file's
own transfer syntax and character set; every other element's bytes, the pixel data
(native or encapsulated) and whatever follows it are copied through in 1 MiB chunks
(``copy_file_range`` where the kernel can). Memory is the header's, whatever the size
of the object.

A Deflated Explicit VR Little Endian data set is first inflated into an anonymous temp
file on the spool's disk (in chunks, capped by ``[filter] max_inflated_size``), shaped
from there, and deflated again as it is written.

Usage: ``with ShapingSource.open(path, limits, scratch) as source:`` then
``plan = source.plan(operations, system)`` (applies the operations to the header) and,
if the copy is wanted, ``plan.write(fd, provenance.shaped_mark(endpoint))``.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element

from pipeline import header as header_module
from pipeline.dicom import filemeta
from pipeline.dicom.filemeta import LONG_VRS, PREAMBLE
from pipeline.errors import InflateError, ShapingError
from pipeline.header import DEFLATED, EXPLICIT_BE, HeaderLimits, InflatingReader
from pipeline.header_scan import DEFER_SIZE
from pipeline.names import is_valid_uid
from pipeline.shaping import provenance
from pipeline.shaping.layout import LayoutRecorder, Span, pixel_element_start

CHUNK = 1024 * 1024
EXPLICIT_LE = "1.2.840.10008.1.2.1"
#: previous values kept in one Original Attributes item at most (a private blob of
#: hundreds of MiB deleted by ``delete private`` would otherwise be held in memory)
MAX_ORIGINAL_BYTES = 16 * 1024 * 1024
UNDEFINED = 0xFFFFFFFF
#: what may follow the pixel data and is copied as it is: Digital Signatures Sequence,
#: Data Set Trailing Padding
TRAILING_OK = frozenset({0xFFFAFFFA, 0xFFFCFFFC})


class _Operations(Protocol):
    """What :mod:`pipeline.shaping.operations` offers (structural, to keep this module
    free of the grammar)."""

    def apply(self, ds: Dataset) -> _Changes: ...

    @property
    def deletes_private(self) -> bool: ...


class _Changes(Protocol):
    originals: dict
    records: list

    def __bool__(self) -> bool: ...


@dataclass
class Plan:
    """The operations applied to one file's header, ready to be written."""

    source: ShapingSource
    changes: _Changes | None
    dirty: set[int] = field(default_factory=set)
    #: file meta elements to change (de-identification: the AE titles blanked, the Media
    #: Storage SOP Instance UID): None = zero length if present, bytes = this value
    meta_changes: dict[int, bytes | None] = field(default_factory=dict)
    #: de-identification: the only elements of the original file meta the copy keeps
    #: (an allow-list; :meth:`ShapingSource.write`), None = all of them
    meta_keep: frozenset[int] | None = None

    @property
    def changed(self) -> bool:
        return bool(self.dirty)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.source.dataset.get("SOPInstanceUID", ""))

    def write(self, fd: int, mark: bytes | None = None) -> None:
        """Write the shaped file to the open descriptor ``fd`` (at its position), with
        ``mark`` as its file meta's Private Information (:mod:`provenance`)."""
        self.source.write(fd, self.dirty, mark, self.meta_changes, self.meta_keep)


@dataclass
class ShapingSource:
    """One file opened for shaping: its meta, the layout of its header, the header."""

    work: BinaryIO          # the file (or its inflated copy) the layout refers to
    meta: FileMetaDataset
    meta_end: int           # where the file meta group ends (the data set starts)
    syntax: str
    spans: list[Span]
    header_end: int         # where the pixel data element (or the end of the data set) is
    size: int               # of ``work``
    dataset: FileDataset
    implicit: bool
    little: bool
    deflate: bool           # the output's data set is deflated again
    #: top-level tags after the pixel data (copied through)
    trailing: list[int] = field(default_factory=list)
    #: the Original Attributes items the plans made, encoded (written after the file's)
    new_items: list[bytes] = field(default_factory=list)
    #: where the elements after the pixel data start (None: there are none)
    trailing_start: int | None = None
    #: a de-identifying plan ran: no Original Attributes Sequence is written at all, nor
    #: what follows the pixel data (a digital signature of the original, padding)
    deidentified: bool = False

    @classmethod
    @contextmanager
    def open(cls, path: Path, limits: HeaderLimits, scratch: Path) -> Iterator[ShapingSource]:
        """Open ``path`` safely and read what shaping needs; ``scratch``: a folder on the
        spool's disk for the inflated copy of a deflated data set.

        Raises :class:`~pipeline.errors.QuarantineError` for a file that is not a complete,
        readable DICOM file, :class:`ShapingError` for one that cannot be shaped.
        """
        fd, st = header_module.open_regular(path)
        with os.fdopen(fd, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings echo untrusted values
            meta, syntax, sop_class = header_module.read_meta_dataset(fp, st.st_size, limits)
            if syntax in DEFLATED:
                with _inflated(fp, st.st_size, limits, scratch) as work:
                    yield cls._read(work, os.fstat(work.fileno()).st_size, meta, syntax, sop_class,
                                    limits, deflate=True)
            else:
                yield cls._read(fp, st.st_size, meta, syntax, sop_class, limits, deflate=False)

    @classmethod
    def _read(cls, work: BinaryIO, size: int, meta: FileMetaDataset, syntax: str, sop_class: str,
              limits: HeaderLimits, deflate: bool) -> ShapingSource:
        recorder = LayoutRecorder()
        walked_as = EXPLICIT_LE if deflate else syntax
        structure = header_module.check_complete(work, size, walked_as, sop_class, limits=limits,
                                                 recorder=recorder)
        little = syntax != EXPLICIT_BE
        header_end = structure.end
        if structure.pixel_data_at is not None:
            header_end = pixel_element_start(structure.pixel_data_at, structure.explicit, little,
                                             lambda at, n: os.pread(work.fileno(), n, at))
        dataset = _read_header(work, meta, recorder.dataset_start, not structure.explicit, little)
        return cls(work, meta, recorder.dataset_start, syntax, recorder.spans(header_end),
                   header_end, size, dataset, not structure.explicit, little, deflate,
                   recorder.trailing, trailing_start=recorder.trailing_start)

    # -- planning ----------------------------------------------------------------------

    def plan(self, operations: _Operations | None, system: str, *,
             keep_originals: bool = True) -> Plan:
        """Apply ``operations`` to the header for the stage ``system`` (Modifying
        System): the changed attributes, and a new Original Attributes item — unless
        ``keep_originals`` is false (de-identification: the previous values are the
        identity; no Original Attributes Sequence is written then, not even the file's)."""
        ds = self.dataset
        if operations is None:
            return Plan(self, None)
        self._check_trailing(operations, deidentifying=not keep_originals)
        original_uid = str(ds.get("SOPInstanceUID", ""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            changes = operations.apply(ds)
        plan = Plan(self, changes, set(changes.originals))
        if not keep_originals:
            self.deidentified = True
            self.new_items.clear()
            plan.dirty.add(provenance.ORIGINAL_ATTRIBUTES)
        if not changes:
            return plan
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid != original_uid and not is_valid_uid(uid):
            raise ShapingError("SOPInstanceUID: the new value is not a valid UID (digits and dots, "
                               "at most 64 characters)")
        if self.deidentified:
            return plan
        if provenance.ORIGINAL_ATTRIBUTES in changes.originals:
            raise ShapingError("operations may not change the Original Attributes Sequence")
        source_ae = str(self.meta.get("SourceApplicationEntityTitle", "") or "").strip()
        self.new_items.append(self._item(changes.originals, system, source_ae))
        plan.dirty.add(provenance.ORIGINAL_ATTRIBUTES)
        return plan

    def _check_trailing(self, operations: _Operations, deidentifying: bool = False) -> None:
        """Elements after the pixel data are copied, never reached: refuse a file where
        that would leave what the operations mean to change — a public attribute out of
        place there (an operation could not see it: two values would travel), or a
        private one under ``delete private``. A de-identified copy ends with the pixel
        data (:meth:`write`): a private element there is left out, not a reason to fail."""
        for tag in self.trailing:
            group = tag >> 16
            private_kept = group % 2 and not operations.deletes_private
            if tag in TRAILING_OK or group == 0x7FE0 or private_kept or (group % 2 and deidentifying):
                continue
            kind = "a private element" if group % 2 else "an attribute"
            raise ShapingError(f"{kind} ({group:04X},{tag & 0xFFFF:04X}) follows the pixel data, "
                               f"where operations cannot reach it: not shaped")

    # -- the Original Attributes item, encoded here ------------------------------------

    def _item(self, originals: dict, system: str, source: str) -> bytes:
        """One Original Attributes item: the previous elements exactly as the file holds
        them (their spans: encoding, character set and all, valid or not), an added
        attribute as an empty element, and the item's own attributes."""
        budget = MAX_ORIGINAL_BYTES
        parts = []
        for tag in sorted(originals):
            if originals[tag] is None:
                parts.append(self._element(DataElement(tag, provenance.vr_of_added(tag), None)))
                continue
            span = self._span(tag)
            budget -= span.end - span.start
            if budget < 0:
                raise ShapingError(f"the previous values of the changed attributes exceed "
                                   f"{MAX_ORIGINAL_BYTES // (1024 * 1024)} MiB: not kept, not shaped")
            parts.append(self._read_exactly(span.start, span.end - span.start))
        modified = self._sequence(provenance.MODIFIED_ATTRIBUTES, self._items([b"".join(parts)]))
        stamp = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime())
        own = [DataElement(0x04000562, "DT", stamp), DataElement(0x04000563, "LO", system),
               DataElement(0x04000564, "LO", source[:64]),
               DataElement(0x04000565, "CS", provenance.REASON)]
        return modified + b"".join(self._element(element) for element in own)

    def _span(self, tag: int) -> Span:
        found = [span for span in self.spans if span.tag == tag]
        if not found:
            raise ShapingError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): not found where the walk saw "
                               f"the file's elements: not shaped")
        return found[-1]  # a repeated tag: the last one, as pydicom

    def _read_exactly(self, offset: int, count: int) -> bytes:
        data = os.pread(self.work.fileno(), count, offset)
        if len(data) != count:
            raise ShapingError("the file changed while it was shaped")
        return data

    def _element(self, element: DataElement) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = self.little, self.implicit
        write_data_element(buffer, element, self.dataset._character_set)
        return buffer.getvalue()

    def _pack(self, fmt: str, *values: int) -> bytes:
        return struct.pack(("<" if self.little else ">") + fmt, *values)

    def _items(self, contents: list[bytes]) -> bytes:
        """Sequence items of undefined length around each encoded content."""
        return b"".join(self._pack("HHL", 0xFFFE, 0xE000, UNDEFINED) + content
                        + self._pack("HHL", 0xFFFE, 0xE00D, 0) for content in contents)

    def _sequence(self, tag: int, items: bytes) -> bytes:
        """A sequence element of undefined length holding the encoded ``items``."""
        head = self._pack("HH", tag >> 16, tag & 0xFFFF)
        head += self._pack("L", UNDEFINED) if self.implicit else b"SQ\0\0" + self._pack("L", UNDEFINED)
        return head + items + self._pack("HHL", 0xFFFE, 0xE0DD, 0)

    def _original_attributes(self) -> bytes:
        """The Original Attributes Sequence: the file's items, byte for byte, then ours."""
        existing = (self._existing_items() if provenance.ORIGINAL_ATTRIBUTES in self.dataset
                    else b"")
        return self._sequence(provenance.ORIGINAL_ATTRIBUTES, existing + self._items(self.new_items))

    def _existing_items(self) -> bytes:
        """The items of the file's own Original Attributes Sequence, as they are."""
        span = self._span(provenance.ORIGINAL_ATTRIBUTES)
        data = self._read_exactly(span.start, span.end - span.start)
        header = 8 if self.implicit else 12
        length = struct.unpack(("<" if self.little else ">") + "L", data[header - 4:header])[0]
        value = data[header:]
        if length != UNDEFINED:
            return value[:length]
        if value[-8:] != self._pack("HHL", 0xFFFE, 0xE0DD, 0):
            raise ShapingError("the file's Original Attributes Sequence does not end as it should")
        return value[:-8]

    # -- writing -----------------------------------------------------------------------

    def write(self, fd: int, dirty: set[int], mark: bytes | None,
              meta_changes: dict[int, bytes | None] | None = None,
              meta_keep: frozenset[int] | None = None) -> None:
        out = _Output(fd)
        # a preamble is free-form (an application's own bytes: it may name the patient)
        preamble = bytes(128) if self.deidentified else os.pread(self.work.fileno(), 128, 0)
        out.write(preamble + b"DICM")
        out.write(self._meta_bytes(mark, meta_changes or {}, meta_keep))
        if self.deflate:
            out.start_deflate()
        for kind, tag, start, end in self._pieces(dirty):
            if kind == "copy":
                out.copy(self.work.fileno(), start, end)
            elif tag == provenance.ORIGINAL_ATTRIBUTES:
                out.write(self._original_attributes())
            else:
                out.write(self._encode(tag))
        end = self.size
        if self.deidentified and self.trailing_start is not None:
            end = self.trailing_start  # the table removes signatures and trailing padding
        out.copy(self.work.fileno(), self.header_end, end)
        out.finish()

    def _meta_bytes(self, mark: bytes | None, changes: dict[int, bytes | None],
                    keep: frozenset[int] | None = None) -> bytes:
        """The file meta group of the copy: the original's elements, byte for byte (only
        those in ``keep`` when given: a de-identified copy, which also gets our own
        Implementation Class UID and Version Name), but for Media Storage SOP Instance UID
        (following a coerced SOP Instance UID), the ``changes`` (None: zero length if
        present; bytes: that value), the "shaped for" mark, and the group length. A
        de-identified copy keeps no Private Information of the original's (the mark, or
        nothing)."""
        elements = _meta_elements(os.pread(self.work.fileno(), self.meta_end - PREAMBLE, PREAMBLE))
        if keep is not None:
            elements = {tag: element for tag, element in elements.items() if tag in keep}
            elements.update(_own_implementation())
        for tag, value in changes.items():
            if value is None and tag not in elements:
                continue
            vr = elements[tag][4:6] if tag in elements else dictionary_VR(tag).encode()
            elements[tag] = _meta_element(tag, vr, _padded(value or b"", b"\0" if vr == b"UI" else b" "))
        if self.deidentified and mark is None:
            elements.pop(provenance.PRIVATE_CREATOR_UID, None)
            elements.pop(provenance.PRIVATE_INFORMATION, None)
        uid = str(self.dataset.get("SOPInstanceUID", ""))
        if uid and uid != str(self.meta.get("MediaStorageSOPInstanceUID", "")):
            elements[0x00020003] = _meta_element(0x00020003, b"UI", _padded(uid.encode(), b"\0"))
        if mark is not None:
            elements[provenance.PRIVATE_CREATOR_UID] = _meta_element(
                provenance.PRIVATE_CREATOR_UID, b"UI",
                _padded(provenance.SHAPED_MARK_UID.encode(), b"\0"))
            elements[provenance.PRIVATE_INFORMATION] = _meta_element(
                provenance.PRIVATE_INFORMATION, b"OB", mark)
        elements.pop(0x00020000, None)
        group = b"".join(elements[tag] for tag in sorted(elements))
        return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(group)) + group

    def _pieces(self, dirty: set[int]) -> list[tuple[str, int, int, int]]:
        """The data set in tag order: byte ranges to copy (adjacent ones joined) and the
        tags to encode."""
        kept = [("copy", span.tag, span.start, span.end) for span in self.spans
                if span.tag not in dirty]
        originals = provenance.ORIGINAL_ATTRIBUTES
        encoded = [("encode", tag, 0, 0) for tag in dirty
                   if (tag in self.dataset or tag == originals)
                   and not (tag == originals and self.deidentified)]
        pieces = sorted(kept + encoded, key=lambda piece: piece[1])
        joined: list[tuple[str, int, int, int]] = []
        for piece in pieces:
            last = joined[-1] if joined else None
            if last and piece[0] == last[0] == "copy" and last[3] == piece[2]:
                joined[-1] = ("copy", last[1], last[2], piece[3])
            else:
                joined.append(piece)
        return joined

    def _encode(self, tag: int) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = self.little, self.implicit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a value pydicom would mangle is refused
                for note in _CHARSET_NOTES:  # the reader made the same choice
                    warnings.filterwarnings("ignore", message=note)
                write_data_element(buffer, self.dataset[tag], self.dataset._character_set)
        except Exception as exc:  # pydicom raises many types; the value is never named
            name = self.dataset[tag].keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            raise ShapingError(f"{name}: cannot be encoded in the file's transfer syntax and "
                               f"character set ({type(exc).__name__})") from None
        return buffer.getvalue()


#: pydicom's warnings about a Specific Character Set it corrects ("ISO IR 100" read as
#: "ISO_IR 100"), does not know ("ISO_IR100": its default is used) or partly ignores:
#: the header was decoded with the same choice, so encoding with it loses nothing. A
#: value it cannot encode ("Failed to encode…", replacement characters) stays an error.
_CHARSET_NOTES = ("Incorrect value for Specific Character Set", "Unknown encoding",
                  "Value '.*' for Specific Character Set", "Value '.*' cannot be used as code")


def _meta_elements(group: bytes) -> dict[int, bytes]:
    """Each element of a file meta group (explicit VR little endian, as
    :func:`pipeline.header.read_meta_dataset` checked), encoded, by tag."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(group):
        tag_group, element = struct.unpack_from("<HH", group, offset)
        vr = group[offset + 4:offset + 6]
        if vr in LONG_VRS:
            length, header = struct.unpack_from("<L", group, offset + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", group, offset + 6)[0], 8
        end = offset + header + length
        elements[tag_group << 16 | element] = group[offset:end]
        offset = end
    return elements


def _own_implementation() -> dict[int, bytes]:
    """Implementation Class UID and Version Name (0002,0012–0013): the ones our receiver
    writes (a de-identified copy does not tell which software made the original)."""
    uid = str(filemeta.PYNETDICOM_IMPLEMENTATION_UID).encode()
    version = str(filemeta.PYNETDICOM_IMPLEMENTATION_VERSION).encode()
    return {0x00020012: _meta_element(0x00020012, b"UI", _padded(uid, b"\0")),
            0x00020013: _meta_element(0x00020013, b"SH", _padded(version, b" "))}


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _read_header(work: BinaryIO, meta: FileMetaDataset, start: int, implicit: bool,
                 little: bool) -> FileDataset:
    """pydicom's data set of the elements before the pixel data, values above 64 KiB
    deferred (read again from the open file, through ``/proc/self/fd``, only if an
    operation needs them)."""
    work.seek(start)
    try:
        ds = read_dataset(work, implicit, little, stop_when=header_module.at_pixel_data,
                          defer_size=DEFER_SIZE)
    except Exception as exc:  # pydicom raises many types on garbage
        raise ShapingError(f"unreadable header: {type(exc).__name__}") from None
    result = FileDataset(f"/proc/self/fd/{work.fileno()}", ds, preamble=b"\0" * 128,
                         file_meta=meta, is_implicit_VR=implicit, is_little_endian=little)
    result.set_original_encoding(implicit, little, ds._character_set)
    return result


@contextmanager
def _inflated(fp: BinaryIO, size: int, limits: HeaderLimits, scratch: Path) -> Iterator[BinaryIO]:
    """An anonymous temp file holding the file meta and the inflated data set (gone
    when closed, even after a kill -9)."""
    meta_end = header_module.read_meta(fp, size, limits).end
    with tempfile.TemporaryFile(dir=scratch) as work:
        work.write(os.pread(fp.fileno(), meta_end, 0))
        fp.seek(meta_end)
        reader = InflatingReader(fp, limits.max_inflated_size)
        try:
            while chunk := reader.read(CHUNK):
                work.write(chunk)
        except InflateError as exc:
            raise ShapingError(str(exc)) from None
        work.flush()
        yield cast(BinaryIO, work)


class _Output:
    """Unbuffered writes to the copy's descriptor, deflating after the file meta when
    asked; byte ranges of the source are copied in the kernel when nothing is deflated."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.deflater: zlib._Compress | None = None
        self.kernel_copy = True

    def start_deflate(self) -> None:
        self.deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)

    def write(self, data: bytes) -> None:
        if self.deflater is not None:
            data = self.deflater.compress(data)
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def copy(self, src: int, start: int, end: int) -> None:
        offset = start
        while offset < end:
            count = min(CHUNK * 8, end - offset)
            if self.deflater is None and self.kernel_copy:
                try:
                    copied = os.copy_file_range(src, self.fd, count, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self.kernel_copy = False
                    continue
                if copied == 0:
                    raise ShapingError("the file got shorter while it was shaped")
                offset += copied
                continue
            chunk = os.pread(src, min(CHUNK, end - offset), offset)
            if not chunk:
                raise ShapingError("the file got shorter while it was shaped")
            self.write(chunk)
            offset += len(chunk)

    def finish(self) -> None:
        if self.deflater is not None:
            tail = self.deflater.flush()
            self.deflater = None
            self.write(tail)
