"""Transcoding fallback: decompress a file for a destination that will not take its
transfer syntax (DESIGN.md §6, §8).

The spool copy is never modified: the file is read into memory, decompressed with
pydicom's pixel decoders (python-gdcm, pylibjpeg-openjpeg, pydicom's RLE — no GPL
codecs) *keeping its SOP Instance UID*, and the resulting dataset is sent instead.
Decoding holds every frame in memory, hence the size bound.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pipeline.errors import PermanentError

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
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise PermanentError(f"cannot read the file for transcoding: {exc}") from exc
    source = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    if not source.is_transfer_syntax:
        raise PermanentError(f"unknown transfer syntax {source!r}: cannot transcode")
    if source.is_compressed:
        _decompress(ds, source, max_size)
    elif source == ExplicitVRBigEndian:
        raise PermanentError("cannot convert Explicit VR Big Endian (retired) for this destination")
    ds.file_meta.TransferSyntaxUID = target
    ds.set_original_encoding(target.is_implicit_VR, True, ds.original_character_set)
    return ds


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
