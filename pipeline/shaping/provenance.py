"""What a shaped file says about its shaping: the Original Attributes Sequence item
(PS3.3 C.12.1) inside the data set, and the "shaped for" mark in its file meta.

* **Original Attributes.** Every attribute an operation changed or removed is kept, with
  its previous value, in a new item of the Original Attributes Sequence (0400,0561): its
  Modified Attributes Sequence (0400,0550) holds them, beside Attribute Modification
  DateTime, Modifying System, Source of Previous Values (the calling AE title the file
  came from) and Reason for the Attribute Modification ``COERCE``. An attribute an
  operation *added* is listed there with an empty value (it had none). The Modifying
  System names the stage: our AE title for the global ``[coerce]`` of router.ini,
  ``<AE title>:<endpoint>`` for an endpoint's. The item is written byte for byte from
  the file (:meth:`pipeline.shaping.rewrite.ShapingSource.plan`): previous values keep
  their encoding and character set, valid or not.
* **Coerced here.** A file the global ``[coerce]`` changed carries, in its file meta,
  Private Information (0002,0102) = ``coerced by <spool id>`` (the spool's own random
  id, ``run/spool-id``): it is never coerced globally again (a redo after a crash, a
  copy dropped back into ``incoming/``: no ``SITEA-SITEA-…``). The file meta is ours —
  the receiver writes it; nothing that comes over the network can carry the mark, so
  an item forged by a sender (or written by another router with our AE title) does not
  stop a coercion.
* **Shaped for.** A copy the filter shaped for an endpoint carries, in its file meta,
  Private Information Creator UID (0002,0100) = :data:`SHAPED_MARK_UID` and Private
  Information (0002,0102) = ``shaped for <endpoint>``. The file meta never travels over
  DICOM (C-STORE sends the data set), and the sender reads the meta anyway: the sender of
  a shaping endpoint sends only files marked for it and hands any other file back to the
  filter (README, Shaping), so a retried or hand-moved original never goes out unshaped.
  An endpoint copy is always shaped from the accepted file; a copy already made is
  recognised by its name (:mod:`pipeline.shaping.copies`), not by an item.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

ORIGINAL_ATTRIBUTES = 0x04000561
MODIFIED_ATTRIBUTES = 0x04000550
REASON = "COERCE"
#: a UUID-derived UID (PS3.5 B.2) naming DicomFlow as the author of (0002,0102)
SHAPED_MARK_UID = "2.25.120509663902470898025727226617216227351"
PRIVATE_CREATOR_UID = 0x00020100
PRIVATE_INFORMATION = 0x00020102
PATIENT_IDENTITY_REMOVED = 0x00120062
_LO_MAX = 64


def modifying_system(ae_title: str, endpoint: str | None) -> str:
    """The Modifying System (LO) of a stage: ``AE`` (global) or ``AE:endpoint``."""
    name = ae_title.strip() if endpoint is None else f"{ae_title.strip()}:{endpoint}"
    return name[:_LO_MAX]


def vr_of_added(tag: int) -> str:
    """The VR of an attribute an operation added (its empty previous value's)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr if len(vr) == 2 else "UN"


def shaped_mark(endpoint: str) -> bytes:
    """The Private Information (OB, even length) of a copy shaped for ``endpoint``."""
    return _even(f"shaped for {endpoint}".encode("ascii"))


def coerced_mark(spool_id: str) -> bytes:
    """The Private Information of a file the global ``[coerce]`` of this spool changed."""
    return _even(f"coerced by {spool_id}".encode("ascii"))


def _even(text: bytes) -> bytes:
    return text + b"\0" if len(text) % 2 else text


def _mark(meta_values: dict[int, bytes], prefix: str) -> str | None:
    creator = meta_values.get(PRIVATE_CREATOR_UID, b"").rstrip(b"\0 ").decode("ascii", "replace")
    if creator != SHAPED_MARK_UID:
        return None
    text = meta_values.get(PRIVATE_INFORMATION, b"").rstrip(b"\0").decode("ascii", "replace")
    return text.removeprefix(prefix) if text.startswith(prefix) else None


def shaped_for(meta_values: dict[int, bytes]) -> str | None:
    """The endpoint a file was shaped for, from its raw file meta values (None: not ours)."""
    return _mark(meta_values, "shaped for ")


def coerced_here(meta_values: dict[int, bytes], spool_id: str) -> bool:
    """Did this spool's global ``[coerce]`` change this file?"""
    return _mark(meta_values, "coerced by ") == spool_id


def meta_values(meta: Dataset) -> dict[int, bytes]:
    """The two mark elements of a pydicom file meta, as raw bytes."""
    values = {}
    for tag in (PRIVATE_CREATOR_UID, PRIVATE_INFORMATION):
        if tag in meta:
            value = meta[tag].value
            values[tag] = value if isinstance(value, bytes) else str(value).encode("ascii", "replace")
    return values


def says_identity_removed(path: Path) -> bool:
    """Does the file's data set say Patient Identity Removed (0012,0062) = YES? The sender
    of a de-identifying endpoint sends nothing else. Any read error is a no (the file is
    handed back to the filter, which decides what it is); values above 4 KiB are not read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, defer_size=4096,
                     specific_tags=[PATIENT_IDENTITY_REMOVED])
        return str(ds.get(PATIENT_IDENTITY_REMOVED).value).strip().upper() == "YES"
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on garbage
        return False
