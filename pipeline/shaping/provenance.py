"""What a shaped file says about its shaping: the Original Attributes Sequence item
(PS3.3 C.12.1) inside the data set, and the "shaped for" mark in its file meta.

* **Original Attributes.** Every attribute an operation changed or removed is kept, with
  its previous value, in a new item of the Original Attributes Sequence (0400,0561): its
  Modified Attributes Sequence (0400,0550) holds them, beside Attribute Modification
  DateTime, Modifying System, Source of Previous Values (the calling AE title the file
  came from) and Reason for the Attribute Modification ``COERCE``. An attribute an
  operation *added* is listed there with an empty value (it had none). The Modifying
  System names the stage: our AE title for the global ``[coerce]`` of router.ini,
  ``<AE title>:<endpoint>`` for an endpoint's — so a file that already carries a stage's
  item is never coerced by that stage again (a redo after a crash, a copy dropped back
  into ``incoming/``): no ``SITEA-SITEA-…``.
* **Shaped for.** A copy the filter shaped for an endpoint carries, in its file meta,
  Private Information Creator UID (0002,0100) = :data:`SHAPED_MARK_UID` and Private
  Information (0002,0102) = ``shaped for <endpoint>``. The file meta never travels over
  DICOM (C-STORE sends the data set), and the sender reads the meta anyway: the sender of
  a shaping endpoint sends only files marked for it and hands any other file back to the
  filter (README, Shaping), so a retried or hand-moved original never goes out unshaped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

ORIGINAL_ATTRIBUTES = 0x04000561
MODIFIED_ATTRIBUTES = 0x04000550
REASON = "COERCE"
#: a UUID-derived UID (PS3.5 B.2) naming DicomFlow as the author of (0002,0102)
SHAPED_MARK_UID = "2.25.120509663902470898025727226617216227351"
PRIVATE_CREATOR_UID = 0x00020100
PRIVATE_INFORMATION = 0x00020102
_LO_MAX = 64

Original = RawDataElement | DataElement | None


def modifying_system(ae_title: str, endpoint: str | None) -> str:
    """The Modifying System (LO) of a stage: ``AE`` (global) or ``AE:endpoint``."""
    name = ae_title.strip() if endpoint is None else f"{ae_title.strip()}:{endpoint}"
    return name[:_LO_MAX]


def carries_item(ds: Dataset, system: str) -> bool:
    """Does ``ds`` already carry an Original Attributes item of this stage?"""
    element = ds.get(ORIGINAL_ATTRIBUTES)
    if element is None or not isinstance(element.value, Sequence):
        return False
    for item in element.value:
        if (str(item.get("ModifyingSystem", "")).strip() == system
                and str(item.get("ReasonForTheAttributeModification", "")).strip() == REASON):
            return True
    return False


def original_attributes_item(originals: Iterable[tuple[int, Original]], system: str, source: str,
                             load: Callable[[RawDataElement], RawDataElement]) -> Dataset:
    """One Original Attributes item for ``originals`` (tag → previous element, None
    when the attribute was added); ``load`` reads a deferred value from the file."""
    modified = Dataset()
    for tag, element in originals:
        if element is None:
            modified[tag] = DataElement(tag, _vr_of_added(tag), None)
        elif isinstance(element, RawDataElement):
            modified[tag] = load(element) if element.value is None and element.length else element
        else:
            modified[tag] = element
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([modified])
    item.AttributeModificationDateTime = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime())
    item.ModifyingSystem = system
    item.SourceOfPreviousValues = source[:_LO_MAX]
    item.ReasonForTheAttributeModification = REASON
    return item


def _vr_of_added(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def append_item(ds: Dataset, item: Dataset) -> None:
    """Add ``item`` to the data set's Original Attributes Sequence (made if absent)."""
    element = ds.get(ORIGINAL_ATTRIBUTES)
    if element is None or not isinstance(element.value, Sequence):
        ds.OriginalAttributesSequence = Sequence([item])
    else:
        element.value.append(item)


def shaped_mark(endpoint: str) -> bytes:
    """The Private Information (OB, even length) of a copy shaped for ``endpoint``."""
    text = f"shaped for {endpoint}".encode("ascii")
    return text + b"\0" if len(text) % 2 else text


def shaped_for(meta_values: dict[int, bytes]) -> str | None:
    """The endpoint a file was shaped for, from its raw file meta values (None: not ours)."""
    creator = meta_values.get(PRIVATE_CREATOR_UID, b"").rstrip(b"\0 ").decode("ascii", "replace")
    if creator != SHAPED_MARK_UID:
        return None
    text = meta_values.get(PRIVATE_INFORMATION, b"").rstrip(b"\0").decode("ascii", "replace")
    return text.removeprefix("shaped for ") if text.startswith("shaped for ") else None
