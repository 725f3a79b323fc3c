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
* **Bounded before it is parsed.** The same walk runs *before* pydicom and counts what
  pydicom would hold in memory (elements and bytes before the pixel data,
  :class:`HeaderLimits`): a file of a million empty elements is refused, not parsed.
  A Deflated Explicit VR Little Endian data set is inflated in chunks with a cap
  (:class:`InflatingReader`); pydicom itself would inflate the whole file at once.
* **Only what the rules read.** With a :class:`~pipeline.header_scan.Wanted` set of
  tags (the filter's), the walk notes where those elements are and the data set is built
  from them alone (:mod:`pipeline.header_scan`, identical for every rule); pydicom's
  full read stays for everything unusual and with ``DICOMFLOW_FASTPATH=0``.
* **Trailing padding.** Up to :data:`MAX_TRAILING_PAD` zero bytes after the last
  complete element (fewer than an element header) are tolerated, as DCMTK's storescp
  tolerates the single pad byte some SCUs add to an odd-length data set; any other
  trailing bytes are refused.

Every refusal is a :class:`QuarantineError` whose message is the quarantine reason.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from pydicom import dcmread
from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset

from pipeline import header_scan
from pipeline.config_keys import ROUTER, default
from pipeline.dicom.filemeta import LONG_VRS, PREAMBLE, MetaGroup, read_meta_group
from pipeline.errors import InflateError, InflateLimit, MetaError, MetaOverLimit, QuarantineError
from pipeline.header_scan import DEFER_SIZE
from pipeline.names import escape, is_valid_uid

MAX_DEPTH = 16                  # nested sequences deeper than this are hostile

MAX_TRAILING_PAD = 7            # zero bytes tolerated after the last element (< one header)
MiB, GiB = 1024**2, 1024**3

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
#: The data set itself is deflated (PS3.5 A.5). Deflated Image Frame Compression
#: (1.2.840.10008.1.2.8.1) deflates pixel frames only: its data set is walked as usual.
DEFLATED = ("1.2.840.10008.1.2.1.99",)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


@dataclass(frozen=True)
class HeaderLimits:
    """Bounds on reading one file's header; router.ini ``[filter]`` sets them.

    ``max_header_elements`` and ``max_header_bytes`` count what pydicom keeps in memory
    before the pixel data: every element (those inside sequences included) and the
    bytes of the values it reads (top-level values larger than 64 KiB are skipped
    unread and not counted). ``max_inflated_size`` caps the inflated size of a
    deflated data set, pixel data included.
    """

    max_header_elements: int = default(ROUTER, "filter", "max_header_elements")
    max_header_bytes: int = default(ROUTER, "filter", "max_header_bytes")
    max_inflated_size: int = default(ROUTER, "filter", "max_inflated_size")


DEFAULT_LIMITS = HeaderLimits()


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


def read_header(path: Path, limits: HeaderLimits = DEFAULT_LIMITS) -> Header:
    """Open ``path`` safely and read its header (the dry run and tests use this)."""
    fd, st = open_regular(path)
    try:
        return read_header_fd(fd, st.st_size, limits)
    finally:
        os.close(fd)


def read_header_fd(fd: int, size: int, limits: HeaderLimits = DEFAULT_LIMITS,
                   wanted: header_scan.Wanted | None = None, checked: bool = False) -> Header:
    """Read and validate the header of an open regular file of ``size`` bytes.

    Order matters: the file meta is bounded and its UIDs validated, then the seek-only
    walk checks completeness *and* the limits, and only then does pydicom parse. With
    ``wanted`` (the filter), the data set holds only those elements when the walk could
    locate them (:mod:`pipeline.header_scan`); else pydicom reads it all. ``checked``:
    a file this very code validated before (the filter's own ``accepted/``, read again
    after a restart): the UID checks are not repeated, the walk and the bounds are.
    """
    with os.fdopen(fd, "rb", closefd=False) as fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings echo untrusted values unescaped
        meta = _read_meta(fp, size, limits)
        dataset_start = fp.tell()  # where pydicom's meta reader stopped
        syntax, sop_class = _meta_uids(meta) if checked else _check_meta(meta)
        recorder = header_scan.recorder_for(wanted, syntax)
        structure = check_complete(fp, size, syntax, sop_class, limits=limits, recorder=recorder,
                                   dataset_start=dataset_start)
        try:
            ds: Dataset | None = None
            if recorder is not None:
                ds = header_scan.build(recorder, lambda offset, count: os.pread(fd, count, offset),
                                       structure.explicit, syntax, meta)
            if ds is None:
                ds = _read_dataset(fp, meta, syntax, limits)
        except QuarantineError:
            raise
        except Exception as exc:  # pydicom raises many types on garbage
            raise QuarantineError(f"unreadable DICOM header: {_describe(exc)}") from None
        _drop_deferred(ds)
        if checked:
            return Header(ds, str(meta.MediaStorageSOPInstanceUID), sop_class, syntax, size)
        return _validate(ds, size)


def read_meta_dataset(fp: BinaryIO, size: int,
                      limits: HeaderLimits = DEFAULT_LIMITS) -> tuple[FileMetaDataset, str, str]:
    """The file meta as pydicom's ``FileMetaDataset``, bounded and with its UIDs checked,
    and its transfer syntax and SOP class (the shaping writer reads files with it)."""
    meta = _read_meta(fp, size, limits)
    syntax, sop_class = _check_meta(meta)
    return meta, syntax, sop_class


def _read_meta(fp: BinaryIO, size: int, limits: HeaderLimits) -> FileMetaDataset:
    """The file meta group as pydicom's ``FileMetaDataset``, once the one reader
    (:func:`read_meta`) has bounded it."""
    fp.seek(0)
    if fp.read(PREAMBLE)[128:] != b"DICM":
        raise QuarantineError("not a DICOM Part-10 file (no 'DICM' prefix or file meta)")
    read_meta(fp, size, limits)
    fp.seek(PREAMBLE)
    try:
        return _read_file_meta_info(fp)
    except Exception as exc:  # pydicom raises many types on garbage
        raise QuarantineError(f"unreadable DICOM header: {_describe(exc)}") from None


def read_meta(fp: BinaryIO, size: int, limits: HeaderLimits = DEFAULT_LIMITS) -> MetaGroup:
    """The file meta group through :func:`pipeline.dicom.filemeta.read_meta_group` (the
    one reader of it), within ``limits``; a :class:`QuarantineError` says why not."""
    def read_at(offset: int, count: int) -> bytes:
        fp.seek(offset)
        return fp.read(count)
    try:
        return read_meta_group(read_at, size, limits.max_header_elements, limits.max_header_bytes)
    except MetaOverLimit as exc:
        raise QuarantineError(_over_limit(exc.what, limits)) from None
    except MetaError as exc:
        raise QuarantineError(f"truncated or corrupt: {exc}") from None


def _over_limit(what: str, limits: HeaderLimits) -> str:
    if what == "elements":
        return (f"header has more than {limits.max_header_elements} elements before the pixel "
                f"data (limit: [filter] max_header_elements)")
    return (f"header holds more than {_size_text(limits.max_header_bytes)} before the pixel data "
            f"(limit: [filter] max_header_bytes)")


def _check_meta(meta: FileMetaDataset) -> tuple[str, str]:
    """The file meta's UIDs must be UIDs (PS3.5 §9.1): they name contexts and paths."""
    try:
        syntax = str(meta.get("TransferSyntaxUID") or "")
        meta_class = str(meta.get("MediaStorageSOPClassUID") or "")
        meta_instance = str(meta.get("MediaStorageSOPInstanceUID") or "")
    except Exception as exc:
        raise QuarantineError(f"unreadable file meta attributes: {_describe(exc)}") from None
    if not syntax:
        raise QuarantineError("file meta has no TransferSyntaxUID (0002,0010)")
    if not meta_instance or not meta_class:
        raise QuarantineError("file meta lacks MediaStorageSOPClassUID/MediaStorageSOPInstanceUID")
    for name, tag, value in (("Transfer Syntax UID", "(0002,0010)", syntax),
                             ("SOP Class UID", "(0002,0002)", meta_class),
                             ("SOP Instance UID", "(0002,0003)", meta_instance)):
        if not is_valid_uid(value):
            raise QuarantineError(f"invalid {name} {escape(value, 80)!r} in the file meta {tag}: "
                                  f"a UID is digits and dots, at most 64 characters")
    return syntax, meta_class


def _meta_uids(meta: FileMetaDataset) -> tuple[str, str]:
    """Transfer syntax and SOP class of a file meta validated before (``checked``)."""
    try:  # by tag: pydicom's keyword look-up is most of the cost of two attributes
        return str(meta[0x00020010].value), str(meta[0x00020002].value)
    except KeyError as exc:  # not what we validated: then refuse it as usual
        raise QuarantineError(f"file meta attributes missing: {_describe(exc)}") from None


def _read_dataset(fp: BinaryIO, meta: FileMetaDataset, syntax: str,
                  limits: HeaderLimits) -> Dataset:
    """pydicom's read up to the pixel data; a deflated data set through the capped reader."""
    if syntax not in DEFLATED:
        fp.seek(0)
        try:
            return dcmread(fp, stop_before_pixels=True, defer_size=DEFER_SIZE)
        except InvalidDicomError:
            raise QuarantineError("not a DICOM Part-10 file (no 'DICM' prefix or file meta)") from None
    fp.seek(PREAMBLE)
    _read_file_meta_info(fp)  # to the start of the deflated data set
    reader = InflatingReader(fp, limits.max_inflated_size)
    try:
        # read_dataset wants a BinaryIO; it uses only read/seek/tell, which the reader has
        ds = read_dataset(cast(BinaryIO, reader), False, True, stop_when=at_pixel_data,
                          defer_size=DEFER_SIZE)
    except InflateError as exc:
        raise QuarantineError(str(exc)) from None
    result = FileDataset("", ds, preamble=b"\0" * 128, file_meta=meta, is_implicit_VR=False,
                         is_little_endian=True)
    result.set_original_encoding(False, True, ds._character_set)
    return result


def at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    """pydicom's ``stop_when``: the header ends at the first pixel data element."""
    return tag in _PIXEL_TAGS


def _describe(exc: BaseException) -> str:
    return escape(f"{type(exc).__name__}: {exc}", limit=300)


def _drop_deferred(ds: Dataset) -> None:
    """Remove values pydicom deferred: they are large, and the descriptor is about to close."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length not in (0, _UNDEFINED):
            del ds[tag]


def _validate(ds: Dataset, size: int) -> Header:
    """The data set's own UIDs against the file meta (checked already by _check_meta)."""
    try:
        meta = ds.file_meta
        syntax = str(meta.get("TransferSyntaxUID") or "")
        meta_instance = str(meta.get("MediaStorageSOPInstanceUID") or "")
        meta_class = str(meta.get("MediaStorageSOPClassUID") or "")
        instance = str(ds.get("SOPInstanceUID") or "")
        sop_class = str(ds.get("SOPClassUID") or "")
    except Exception as exc:
        raise QuarantineError(f"unreadable header attributes: {_describe(exc)}") from None
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
    return Header(ds, instance, meta_class, syntax, size)


# -- inflating -----------------------------------------------------------------------


def _size_text(count: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (1024, "KiB")):
        if count >= unit and count % unit == 0:
            return f"{count // unit} {name}"
    return f"{count} bytes"


class InflatingReader:
    """A forward-only binary file object over a raw-deflate stream, inflated on demand.

    pydicom inflates a Deflated Explicit VR Little Endian data set with one
    ``zlib.decompress`` of the whole file (a 2 MiB file can become 2 GiB in memory);
    this inflates at most :attr:`OUT` bytes per step, keeps only what has not been
    read yet plus :attr:`KEEP` bytes behind the position (pydicom rewinds at most
    12), and raises :class:`InflateLimit` as soon as more than ``cap`` bytes came out.
    Seeking forward inflates and discards; seeking further back is an error.
    """

    CHUNK = 64 * 1024      # compressed bytes read per step
    OUT = 1024 * 1024      # inflated bytes produced per step at most
    KEEP = 64

    def __init__(self, raw: BinaryIO, cap: int, what: str = "[filter] max_inflated_size") -> None:
        self._raw, self._cap, self._what = raw, cap, what
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._start = 0        # stream offset of _buffer[0]
        self._pos = 0
        self._produced = 0
        self.eof = False       # the deflate stream has ended (everything inflated)
        self.name = getattr(raw, "name", "")

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = {os.SEEK_SET: offset, os.SEEK_CUR: self._pos + offset}.get(whence)
        if target is None or target < self._start:
            raise OSError("cannot seek backwards in an inflating stream")
        self._pos = target
        return target

    def read(self, count: int = -1) -> bytes:
        end = self._pos + count if count >= 0 else None
        self._fill(end)
        available = self._start + len(self._buffer)
        stop = available if end is None else min(end, available)
        data = bytes(self._buffer[self._pos - self._start:stop - self._start]) if stop > self._pos else b""
        if data:
            self._pos = stop
        return data

    def available_to(self, end: int) -> int:
        """Inflate up to stream offset ``end`` (or the stream's end); return how far it goes."""
        self._fill(end)
        return self._start + len(self._buffer)

    def _fill(self, end: int | None) -> None:
        while not self.eof and (end is None or self._start + len(self._buffer) < end):
            self._trim()
            data = self._inflater.unconsumed_tail or self._raw.read(self.CHUNK)
            if not data:
                raise InflateError("truncated: the deflated data set ends before its deflate "
                                   "stream does")
            try:
                out = self._inflater.decompress(data, self.OUT)
            except zlib.error as exc:
                raise InflateError(f"corrupt deflated data set: {exc}") from None
            self._produced += len(out)
            if self._produced > self._cap:
                raise InflateLimit(f"deflated data set inflates to more than "
                                   f"{_size_text(self._cap)} (limit: {self._what})")
            self._buffer += out
            self.eof = self._inflater.eof

    def _trim(self) -> None:
        drop = min(len(self._buffer), max(0, self._pos - self.KEEP - self._start))
        if drop:
            del self._buffer[:drop]
            self._start += drop


# -- completeness and limits ---------------------------------------------------------

class _Truncated(Exception):
    pass


class _OverLimit(Exception):
    pass


@dataclass(frozen=True)
class Structure:
    """What the walk saw of a complete file: where its top-level pixel data starts
    (None for objects without) and whether that pixel data is encapsulated (undefined
    length: compressed frames) — which only an encapsulated transfer syntax allows."""

    pixel_data_at: int | None
    encapsulated_pixel_data: bool
    explicit: bool = True  # the data set's VR encoding as the walk found it
    #: where the last top-level element ends (trailing padding, if any, follows); in the
    #: inflated stream for a deflated data set
    end: int = 0


def check_complete(fp: BinaryIO, size: int, transfer_syntax: str, sop_class_uid: str = "", *,
                   limits: HeaderLimits = DEFAULT_LIMITS,
                   recorder: header_scan.ElementRecorder | None = None,
                   dataset_start: int | None = None) -> Structure:
    """Walk the element structure by seeking; refuse a file cut short, malformed or
    beyond ``limits``.

    ``fp`` holds a Part-10 file (preamble and file meta) of ``size`` bytes. A deflated
    data set is inflated in chunks, never more than ``limits.max_inflated_size``;
    everything else is only seeked over, so this is cheap enough to run before a
    C-STORE is acknowledged. Unless the ``scan`` switch is off, the top level of a plain
    file is parsed from blocks read where its elements are (up to 64 KiB while they lie
    close together, 4 KiB after a jump over a large value, which stays unread). A
    ``recorder`` is told of every top-level element before the pixel data
    (``dataset_start``: where pydicom's meta reader stopped).
    """
    meta = read_meta(fp, size, limits)
    walker = _Walker(_FileSource(fp, size), limits)
    walker.fast_top = header_scan.enabled()
    if recorder is not None:
        recorder.starts_at(meta.end, meta.end if dataset_start is None else dataset_start)
        walker.recorder = recorder
    walker.elements, walker.header_bytes = meta.count, meta.held  # counted by the reader
    try:
        fp.seek(meta.end)
        if transfer_syntax in DEFLATED:
            walker.src = _InflatedSource(InflatingReader(fp, limits.max_inflated_size))
        walker.little = transfer_syntax != EXPLICIT_BE
        walker.explicit = walker.sniff_explicit(transfer_syntax != IMPLICIT_LE)
        walker.dataset(depth=0, until_item_end=False)
    except _Truncated as exc:
        raise QuarantineError(f"truncated or corrupt: {exc}") from None
    except _OverLimit as exc:
        raise QuarantineError(str(exc)) from None
    except InflateError as exc:
        raise QuarantineError(str(exc)) from None
    if walker.pixel_data_at is None and _is_image_class(sop_class_uid):
        raise QuarantineError("truncated: an image without pixel data")
    return Structure(walker.pixel_data_at, walker.encapsulated_pixel_data, walker.explicit,
                     walker.src.tell())


def _is_image_class(sop_class_uid: str) -> bool:
    name = UID_dictionary.get(sop_class_uid, ("",))[0]
    return name.endswith("Image Storage")


class _Source(Protocol):
    def tell(self) -> int: ...
    def read(self, count: int) -> bytes: ...
    def rewind(self, position: int) -> None: ...
    def skip(self, length: int, what: str) -> None: ...
    def at_end(self) -> bool: ...
    def short_tail(self) -> bytes | None: ...
    def ends_at(self) -> str: ...


class _FileSource:
    """A plain file of known size: skipping is a seek, nothing is read."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp, self.size = fp, size

    def tell(self) -> int:
        return self.fp.tell()

    def read(self, count: int) -> bytes:
        return self.fp.read(count)

    def rewind(self, position: int) -> None:
        self.fp.seek(position)

    def skip(self, length: int, what: str) -> None:
        start = self.fp.tell()
        if start + length > self.size:
            raise _Truncated(f"{what} at byte {start} needs {length} bytes but the file ends at {self.size}")
        self.fp.seek(start + length)

    def at_end(self) -> bool:
        return self.fp.tell() >= self.size

    def short_tail(self) -> bytes | None:
        """The bytes left if there are at most MAX_TRAILING_PAD of them."""
        left = self.size - self.fp.tell()
        if not 0 < left <= MAX_TRAILING_PAD:
            return None
        position = self.fp.tell()
        tail = self.fp.read(left)
        self.fp.seek(position)
        return tail

    def ends_at(self) -> str:
        return f"file ends at byte {self.size}"


class _InflatedSource:
    """The inflated data set of a deflated file, through a capped InflatingReader."""

    def __init__(self, reader: InflatingReader) -> None:
        self.reader = reader

    def tell(self) -> int:
        return self.reader.tell()

    def read(self, count: int) -> bytes:
        return self.reader.read(count)

    def rewind(self, position: int) -> None:
        self.reader.seek(position)

    def skip(self, length: int, what: str) -> None:
        start = self.reader.tell()
        self.reader.seek(start + length)  # first: what lies before the target is dropped
        reached = self.reader.available_to(start + length)
        if reached < start + length:
            raise _Truncated(f"{what} at inflated byte {start} needs {length} bytes but the "
                             f"inflated data set ends at {reached}")
        self.reader.seek(start + length)

    def at_end(self) -> bool:
        return self.reader.available_to(self.reader.tell() + 1) <= self.reader.tell()

    def short_tail(self) -> bytes | None:
        position = self.reader.tell()
        left = self.reader.available_to(position + MAX_TRAILING_PAD + 1) - position
        if not 0 < left <= MAX_TRAILING_PAD:
            return None
        tail = self.reader.read(left)
        self.reader.seek(position)
        return tail

    def ends_at(self) -> str:
        return f"inflated data set ends at byte {self.reader.available_to(self.reader.tell() + 8)}"


_BLOCK = 64 * 1024       # the most _Walker._fast_top reads at a time (elements close together)
_SMALL_BLOCK = 4 * 1024  # what it reads at an element after a jump over a large value
_UNPACK_TAG = struct.Struct("<HH").unpack_from
_UNPACK_SHORT = struct.Struct("<H").unpack_from
_UNPACK_LONG = struct.Struct("<L").unpack_from


class _Walker:
    """A seek-only reader of element headers; holds nothing but offsets and counts.

    Until the pixel data it also counts what pydicom's read would keep in memory:
    every element at the top level and inside undefined-length sequences (pydicom
    parses those eagerly), and the bytes of the values it would read — top-level
    values above DEFER_SIZE are skipped unread, values inside sequences are not.
    """

    def __init__(self, src: _Source, limits: HeaderLimits) -> None:
        self.src = src
        self.limits = limits
        self.little, self.explicit = True, True
        self.pixel_data_at: int | None = None
        self.encapsulated_pixel_data = False
        self.elements = 0
        self.header_bytes = 0
        self.recorder: header_scan.ElementRecorder | None = None
        self._block, self._block_at = b"", 0   # the file bytes _fast_top last read
        self._block_size = _BLOCK               # how much it reads next (see _next_block)
        #: the block-parsing loop for the top level of a plain file (off with the
        #: ``scan`` switch: see :mod:`pipeline.header_scan`)
        self.fast_top = True

    def sniff_explicit(self, expected: bool) -> bool:
        """Like pydicom, trust the first element's bytes over a wrong transfer syntax."""
        start = self.src.tell()
        head = self.src.read(6)
        self.src.rewind(start)
        if len(head) < 6:
            return expected
        looks_explicit = head[4:6].isalpha() and head[4:6].isupper()
        return looks_explicit

    def _count(self, header: int, value: int) -> None:
        if self.pixel_data_at is not None:
            return  # pydicom stops before the pixel data: nothing after it is held
        self.elements += 1
        self.header_bytes += header + value
        if self.elements > self.limits.max_header_elements:
            raise _OverLimit(_over_limit("elements", self.limits))
        if self.header_bytes > self.limits.max_header_bytes:
            raise _OverLimit(_over_limit("bytes", self.limits))

    def _read(self, count: int) -> bytes:
        offset = self.src.tell()
        data = self.src.read(count)
        if len(data) != count:
            raise _Truncated(f"{self.src.ends_at()} inside an element header at {offset}")
        return data

    def _skip(self, length: int, what: str) -> None:
        self.src.skip(length, what)

    def _tag(self) -> int:
        group, element = struct.unpack("<HH" if self.little else ">HH", self._read(4))
        return group << 16 | element

    def _element(self, tag: int) -> tuple[bytes | None, int, int]:
        """The VR (explicit syntaxes), length and header size following a tag."""
        end = "<" if self.little else ">"
        if tag >> 16 == 0xFFFE or not self.explicit:
            return None, struct.unpack(end + "L", self._read(4))[0], 8
        vr = self._read(2)
        if vr in LONG_VRS:
            self._read(2)
            return vr, struct.unpack(end + "L", self._read(4))[0], 12
        if not vr.isalpha() or not vr.isupper():
            raise _Truncated(f"invalid VR {vr!r} for tag {tag:08X} at byte {self.src.tell() - 6}")
        return vr, struct.unpack(end + "H", self._read(2))[0], 8

    def _padding_only(self) -> bool:
        """At the top level: only a few zero bytes left (tolerated trailing padding)?"""
        tail = self.src.short_tail()
        return tail is not None and not tail.strip(b"\0")

    def dataset(self, depth: int, until_item_end: bool, end: int | None = None) -> None:
        """Elements to the end of the file, an item delimiter, or offset ``end``."""
        if depth > MAX_DEPTH:
            raise _Truncated(f"sequences nested deeper than {MAX_DEPTH}")
        fast = depth == 0 and end is None and not until_item_end and self.little and self.fast_top
        while True:
            if fast and self._fast_top():
                return
            if end is not None:
                if self.src.tell() >= end:
                    return
            elif not until_item_end and (self.src.at_end() or (depth == 0 and self._padding_only())):
                return
            tag = self._tag()
            vr, length, header = self._element(tag)
            if depth == 0 and self.pixel_data_at is None:
                if tag in _PIXEL_TAGS:
                    self.pixel_data_at = self.src.tell()
                    self.encapsulated_pixel_data = length == _UNDEFINED
                elif self.recorder is not None:
                    self.recorder.element(tag, vr, length, self.src.tell())
            elif depth == 0 and self.recorder is not None:
                self.recorder.after_pixel_data(tag, self.src.tell() - header)
            if tag == _ITEM_END:
                if until_item_end:
                    return
                raise _Truncated(f"item delimiter outside an item at byte {self.src.tell() - 8}")
            if length != _UNDEFINED:
                held = 0 if depth == 0 and length > DEFER_SIZE else length
                self._count(header, held)
                if end is not None and self.src.tell() + length > end:
                    raise _Truncated(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte "
                                     f"{self.src.tell() - header} overruns its item")
                self._skip(length, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            else:
                self._count(header, 0)
                fragments = tag in _PIXEL_TAGS or (vr is not None and vr not in (b"SQ", b"UN"))
                self._items(depth + 1, implicit_inside=vr == b"UN", fragments=fragments)

    def _fast_top(self) -> bool:
        """Top-level elements of defined length, parsed from a block of the file in memory.

        The same checks, counts and messages as the loop in :meth:`dataset` — which
        gets the element whenever anything is unusual (an undefined length, an item tag,
        a bad VR, a header that would cross the end of the file, the last few bytes):
        this returns False there, positioned at that element, and True at the end of the
        file. The element-by-element reads of the general loop cost ~8 µs per element;
        a CT header has a few hundred. Blocks are read only where elements are
        (:meth:`_next_block`): a large value is jumped over, not read.
        """
        src = self.src
        if not isinstance(src, _FileSource):
            return False
        size, explicit, recorder = src.size, self.explicit, self.recorder
        block, start = self._block, self._block_at
        pos = src.tell()
        try:
            while True:
                if pos >= size:
                    return True
                if size - pos <= MAX_TRAILING_PAD:
                    return False
                at = pos - start
                if at < 0 or at + 12 > len(block):
                    if pos + 12 > size:
                        return False
                    block, start, at = self._next_block(pos, at, len(block)), pos, 0
                    if len(block) < 12:
                        return False
                group, element = _UNPACK_TAG(block, at)
                if group == 0xFFFE:
                    return False
                if explicit:
                    vr: bytes | None = block[at + 4:at + 6]
                    if vr in LONG_VRS:
                        length, header = _UNPACK_LONG(block, at + 8)[0], 12
                    elif vr.isalpha() and vr.isupper():  # type: ignore[union-attr]
                        length, header = _UNPACK_SHORT(block, at + 6)[0], 8
                    else:
                        return False
                else:
                    vr, length, header = None, _UNPACK_LONG(block, at + 4)[0], 8
                if length == _UNDEFINED:
                    return False
                tag = group << 16 | element
                value_at = pos + header
                if self.pixel_data_at is None:
                    if tag in _PIXEL_TAGS:
                        self.pixel_data_at = value_at
                        self.encapsulated_pixel_data = False
                    elif recorder is not None:
                        recorder.element(tag, vr, length, value_at)
                elif recorder is not None:
                    recorder.after_pixel_data(tag, pos)
                self._count(header, 0 if length > DEFER_SIZE else length)
                if value_at + length > size:
                    raise _Truncated(f"element ({group:04X},{element:04X}) at byte {value_at} needs "
                                     f"{length} bytes but the file ends at {size}")
                pos = value_at + length
        finally:
            src.fp.seek(pos)

    def _next_block(self, pos: int, at: int, had: int) -> bytes:
        """The file from ``pos`` on, for :meth:`_fast_top` (``at``: ``pos`` relative to
        the last block of ``had`` bytes).

        Elements that ran to the end of the last block are dense: the block grows (to
        :data:`_BLOCK`). A value that jumped past it is large: only a small block is read
        at the next element, so a file of large values is seeked over as by the element
        walk, not read whole (``tests/test_header.py``, the bytes-read test).
        """
        if not had:
            self._block_size = _BLOCK  # the first block: the header starts dense
        elif 0 <= at <= had:
            self._block_size = min(_BLOCK, self._block_size * 2)
        else:
            self._block_size = _SMALL_BLOCK
        src = cast(_FileSource, self.src)
        src.fp.seek(pos)
        block = src.fp.read(self._block_size)
        self._block, self._block_at = block, pos
        return block

    def _items(self, depth: int, implicit_inside: bool, fragments: bool) -> None:
        """An undefined-length sequence or encapsulated pixel data, to its delimiter.

        Items of a sequence are walked (pydicom parses them at once, so they count);
        fragments of pixel data are only skipped.
        """
        saved = self.explicit
        if implicit_inside:
            self.explicit = False
        try:
            while True:
                tag = self._tag()
                _, length, header = self._element(tag)
                if tag == _SEQ_END:
                    return
                if tag != _ITEM:
                    raise _Truncated(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
                self._count(header, 0)
                if fragments:
                    if length == _UNDEFINED:
                        raise _Truncated("a pixel data fragment of undefined length")
                    self._count(0, length)
                    self._skip(length, "pixel data fragment")
                    continue
                self._item(depth, length)
        finally:
            self.explicit = saved

    def _item(self, depth: int, length: int) -> None:
        """One sequence item; like pydicom, an item in an explicit data set may be implicit."""
        inner = self.explicit
        if self.explicit and length != 0:
            self.explicit = self.sniff_explicit(True)
        try:
            if length == _UNDEFINED:
                self.dataset(depth, until_item_end=True)
            else:
                self.dataset(depth, until_item_end=False, end=self.src.tell() + length)
        finally:
            self.explicit = inner
