"""Which files may show identity in their pixels (or document), so that no de-identifying
endpoint gets them by default.

De-identification changes the header only: text burned into the pixel data — the
patient's name on an ultrasound frame, a scanned request form, a PDF report — travels
untouched. A file is refused (its copy for that endpoint goes to ``failed/`` with the
reason) when its Burned In Annotation (0028,0301) says ``YES``, or when it is of a SOP
class that commonly carries such text and does not say ``NO``. An endpoint that accepts
the risk (pixel cleaning done downstream, a curated source) sets
``[deidentify] allow_burned_in = true``.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.errors import ShapingError

_US = "1.2.840.10008.5.1.4.1.1."
#: SOP classes whose pixels (or document) commonly hold identifying text, with why
RISKY_SOP_CLASSES: dict[str, str] = {
    _US + "6.1": "Ultrasound Image (annotated frames)",
    _US + "6": "Ultrasound Image, retired (annotated frames)",
    _US + "6.2": "Enhanced US Volume (annotated frames)",
    _US + "3.1": "Ultrasound Multi-frame Image (annotated frames)",
    _US + "3": "Ultrasound Multi-frame Image, retired (annotated frames)",
    _US + "7": "Secondary Capture Image (screenshots, scanned documents)",
    _US + "7.1": "Multi-frame Single Bit Secondary Capture Image (scanned documents)",
    _US + "7.2": "Multi-frame Grayscale Byte Secondary Capture Image (screenshots)",
    _US + "7.3": "Multi-frame Grayscale Word Secondary Capture Image (screenshots)",
    _US + "7.4": "Multi-frame True Color Secondary Capture Image (screenshots)",
    _US + "77.1.1": "VL Endoscopic Image (on-screen overlays)",
    _US + "77.1.1.1": "Video Endoscopic Image (on-screen overlays)",
    _US + "77.1.2": "VL Microscopic Image (slide labels)",
    _US + "77.1.2.1": "Video Microscopic Image (on-screen overlays)",
    _US + "77.1.3": "VL Slide-Coordinates Microscopic Image (slide labels)",
    _US + "77.1.4": "VL Photographic Image (faces, wristbands)",
    _US + "77.1.4.1": "Video Photographic Image (faces, on-screen overlays)",
    _US + "77.1.5.1": "Ophthalmic Photography 8 Bit Image (annotated prints)",
    _US + "77.1.5.2": "Ophthalmic Photography 16 Bit Image (annotated prints)",
    _US + "77.1.6": "VL Whole Slide Microscopy Image (label images)",
    _US + "77.1.7": "Dermoscopic Photography Image (faces, labels)",
    _US + "104.1": "Encapsulated PDF (the document's text)",
    _US + "104.2": "Encapsulated CDA (the document's text)",
}


def check_burned_in(ds: Dataset, meta: Dataset | None = None) -> None:
    """ShapingError (the reason for ``failed/``) if ``ds`` may show identity in its
    pixels or document; the reason names no value of the file. The SOP class is the
    data set's, else the file meta's (``meta``) Media Storage SOP Class UID. Any ``YES``
    of a multi-valued Burned In Annotation is a YES; for a listed class only exactly
    ``NO`` is safe."""
    try:
        said = _burned_in_values(ds)
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        if not sop_class and meta is not None:
            sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "").strip()
    except Exception as exc:  # pydicom raises many types on garbage
        raise ShapingError(f"Burned In Annotation or SOP Class UID cannot be read "
                           f"({type(exc).__name__}): not sent to a de-identifying endpoint") from None
    if "YES" in said:
        raise ShapingError("Burned In Annotation is YES: the pixel data may show the patient's "
                           "identity; not sent to a de-identifying endpoint (allow_burned_in)")
    kind = RISKY_SOP_CLASSES.get(sop_class)
    if kind is not None and said != ["NO"]:
        how = "is missing" if not said else "is not NO"
        raise ShapingError(f"a {kind} whose Burned In Annotation {how}: it may show the "
                           f"patient's identity; not sent to a de-identifying endpoint "
                           f"(allow_burned_in)")


def _burned_in_values(ds: Dataset) -> list[str]:
    """Burned In Annotation's values, upper case, blanks dropped ([] when absent)."""
    value = ds.get("BurnedInAnnotation")
    if value is None or value == "":
        return []
    values = list(value) if isinstance(value, (list, MultiValue)) else [value]
    return [str(v).strip().upper() for v in values if str(v).strip()]
