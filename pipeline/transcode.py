"""Transcoding fallback: decompress a file for a destination that will not take its
transfer syntax (README, Design notes).

The spool copy is never modified: the file is read into memory, decompressed with
pydicom's pixel decoders (python-gdcm, pylibjpeg-openjpeg, pydicom's RLE — no GPL
codecs) *keeping its SOP Instance UID*, and the resulting dataset is sent instead.
Decoding holds every frame in memory, hence the size bound — which also caps what a
deflated data set may inflate to (its file size says nothing about that).

Changing between implicit and explicit VR keeps every value's bytes: an element read
from an Implicit VR file only gains its VR (from the data dictionary; ambiguous ones
such as ``US or SS`` resolved as pydicom's writer does), so nothing is decoded and
re-encoded that need not be; towards implicit VR, sequences are parsed so that their
items are re-encoded too (:func:`parse_sequences`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import dcmread, hooks
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_32

from pipeline.errors import InflateError, PermanentError
from pipeline.header import InflatingReader

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def decoded_size(ds: Dataset) -> int:
    """Bytes the decoded pixel data will take (0 if the dataset has no image)."""
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return (int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel)
                * int(ds.BitsAllocated) // 8 * frames)
    except (AttributeError, TypeError, ValueError):
        return 0


def check_size(path: Path, max_size: int) -> None:
    size = path.stat().st_size
    if size > max_size:
        raise PermanentError(
            f"needs transcoding but is {size} bytes, more than transcode max_size {max_size}"
        )


def load_uncompressed(path: Path, target: UID, max_size: int) -> Dataset:
    """Read ``path`` and return it ready to be sent in ``target`` (an uncompressed
    little-endian transfer syntax); raise PermanentError if it cannot be done."""
    check_size(path, max_size)
    try:
        ds = _read(path, max_size)
    except PermanentError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise PermanentError(f"cannot read the file for transcoding: {exc}") from exc
    source = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    if not source.is_transfer_syntax:
        raise PermanentError(f"unknown transfer syntax {source!r}: cannot transcode")
    if source.is_compressed:
        _decompress(ds, source, max_size)
    elif source == ExplicitVRBigEndian:
        raise PermanentError("cannot convert Explicit VR Big Endian (retired) for this destination")
    if ds.original_encoding[0] != target.is_implicit_VR:
        try:
            (parse_sequences if target.is_implicit_VR else give_vrs)(ds)
        except Exception as exc:  # noqa: BLE001 - a value pydicom cannot resolve is the file's
            raise PermanentError(f"cannot convert {source.name} to {target.name}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    ds.file_meta.TransferSyntaxUID = target
    ds.set_original_encoding(target.is_implicit_VR, True, ds.original_character_set)
    return ds


def _read(path: Path, max_size: int) -> Dataset:
    """The whole file; a deflated data set inflated in chunks, never beyond ``max_size``
    (pydicom would inflate it whole first, whatever it comes to)."""
    with open(path, "rb") as fp:
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            fp.seek(0)
            return dcmread(fp)
        reader = InflatingReader(fp, max_size, what="[transcode] max_size")
        try:
            # A duck-typed binary file (read/seek/tell), not a BinaryIO subclass.
            ds = read_dataset(cast(BinaryIO, reader), False, True)
        except InflateError as exc:
            raise PermanentError(f"needs transcoding, but its {exc}") from exc
    result = FileDataset(os.fspath(path), ds, preamble=preamble, file_meta=meta,
                         is_implicit_VR=False, is_little_endian=True)
    result.set_original_encoding(False, True, ds._character_set)
    return result


def give_vrs(ds: Dataset) -> None:
    """Make a data set read as Implicit VR writable as Explicit VR, in place.

    pydicom writes an element read from an implicit file as it was read — without a
    VR — once the data set is labelled explicit (the bug that sent RT plans to
    ``failed/`` with "Failed to encode the supplied dataset"). Each raw element gets
    its VR and keeps its value bytes (little endian either way); sequences are parsed
    and their items treated alike; ambiguous VRs are resolved from the data set (once,
    from the top: an item's ``US or SS`` may depend on its parent's Pixel Representation).
    """
    _give_vrs(ds)
    correct_ambiguous_vr(ds, True)


def _give_vrs(ds: Dataset) -> None:
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem.VR is None:
            found: dict[str, Any] = {}
            hooks.raw_element_vr(elem, found, encoding=ds._character_set, ds=ds)
            vr = found["VR"]
            if vr == "SQ" or vr in AMBIGUOUS_VR:
                elem = ds[tag]  # parse it (items, numbers): both need more than a VR
            else:
                if elem.length > 0xFFFF and vr not in EXPLICIT_VR_LENGTH_32:
                    vr = "UN"  # too long for a 2-byte length field: keep it, as UN
                ds[tag] = elem._replace(VR=vr, is_implicit_VR=False)
                continue
        if getattr(elem, "VR", None) == "SQ":
            for item in ds[tag].value:
                _give_vrs(item)
                item.set_original_encoding(False, True, item._character_set)


def parse_sequences(ds: Dataset) -> None:
    """Make a data set read as Explicit VR writable as Implicit VR, in place.

    Top-level values are written as read (an implicit element is tag, length, value:
    the same little-endian bytes), but a raw sequence would carry its items' explicit
    encoding into the implicit data set — the destination then misreads them (one of
    CT_small's two Other Patient IDs items was lost). Parsed sequences keep their items'
    explicit origin, so pydicom's writer re-encodes each item.
    """
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem.VR == "SQ":
            ds[tag]  # noqa: B018 - parses the raw sequence in place


def _decompress(ds: Dataset, source: UID, max_size: int) -> None:
    needed = decoded_size(ds)
    if needed > max_size:
        raise PermanentError(
            f"needs decompressing from {source.name} to {needed} bytes, "
            f"more than transcode max_size {max_size}"
        )
    uid = ds.get("SOPInstanceUID")
    try:
        # generate_instance_uid=False: the default would mint a new SOP Instance UID
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise PermanentError(f"cannot decompress {source.name}: {exc}") from exc
    if ds.get("SOPInstanceUID") != uid:  # pragma: no cover - guard against a pydicom change
        raise PermanentError("decompressing changed the SOP Instance UID; refusing to send")
