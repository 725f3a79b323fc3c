"""Where each top-level element of a data set lies in its file, up to the pixel data.

A shaped copy re-encodes only the attributes its operations changed and copies every
other element's bytes unchanged (so a copy differs from its original in exactly those
attributes, and large values are never decoded). The completeness walk
(:func:`pipeline.header.check_complete`) visits every top-level element anyway; this
recorder notes where each one starts, and the elements are contiguous, so each one ends
where the next begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.dicom.filemeta import LONG_VRS
from pipeline.errors import ShapingError

#: the element header of (7FE0,0010) and its kin: OB/OW/OF/OD are long VRs (12 bytes
#: explicit), 8 bytes implicit
_PIXEL_HEADER = {True: 12, False: 8}
_PIXEL_TAG_BYTES = {True: (b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\xe0\x7f\x10\x00"),
                    False: (b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09", b"\x7f\xe0\x00\x10")}


@dataclass(frozen=True)
class Span:
    """One top-level element: its tag and the bytes ``[start, end)`` it occupies."""

    tag: int
    start: int
    end: int


@dataclass
class LayoutRecorder:
    """Told of each top-level element before the pixel data by the completeness walk
    (:class:`pipeline.header_scan.ElementRecorder`)."""

    starts: list[tuple[int, int]] = field(default_factory=list)
    dataset_start: int = 0
    #: top-level tags after the pixel data: copied through, never reached by operations
    trailing: list[int] = field(default_factory=list)
    #: where the first of them starts (None: nothing follows the pixel data)
    trailing_start: int | None = None

    def starts_at(self, meta_end: int, dataset_start: int) -> None:
        self.dataset_start = meta_end  # where our meta reader ended: the layout's own count

    def after_pixel_data(self, tag: int, start: int) -> None:
        if not self.trailing:
            self.trailing_start = start
        self.trailing.append(tag)

    def element(self, tag: int, vr: bytes | None, length: int, value_at: int) -> None:
        header = 12 if vr is not None and vr in LONG_VRS else 8
        self.starts.append((tag, value_at - header))

    def spans(self, header_end: int) -> list[Span]:
        """Each element from its start to the next one's (the last to ``header_end``)."""
        ends = [start for _, start in self.starts[1:]] + [header_end]
        return [Span(tag, start, end) for (tag, start), end in zip(self.starts, ends, strict=True)]


def pixel_element_start(pixel_value_at: int, explicit: bool, little: bool,
                        read_at) -> int:
    """Where the pixel data element's header starts, checked against the file's bytes.

    The walk gives where the value starts; the header is 12 bytes (explicit VR, the
    pixel data VRs are all long) or 8 (implicit). A file whose pixel data element says
    otherwise is unusual enough not to be shaped.
    """
    start = pixel_value_at - _PIXEL_HEADER[explicit]
    if read_at(start, 4) not in _PIXEL_TAG_BYTES[little]:
        raise ShapingError("the pixel data element has an unusual header: not shaped")
    return start
