"""The filter's short cut through a header: only the elements its rules read.

pydicom's ``dcmread`` turns every element before the pixel data into a raw element
(and parses undefined-length sequences at once), although the filter's rules look at a
handful of attributes. The completeness walk (:func:`pipeline.header.check_complete`)
visits every top-level element anyway, so it notes where the wanted ones are
(:class:`Recorder`); their values are then read with one ``pread`` and handed to
pydicom as :class:`~pydicom.dataelem.RawDataElement` objects, converted lazily exactly
as in a ``dcmread`` data set (:func:`build`). The result is identical for every rule
(``tests/test_header_scan.py`` compares it with pydicom's read over the whole corpus).

What is wanted (:func:`wanted_for`) is computed once per configuration: the tags every
condition (global and per endpoint) names, plus what the filter itself reads — SOP
Instance UID, SOP Class UID (the SOP lists' attribute) and Specific Character Set (text
values are decoded with it); a private tag brings its private creator (its VR comes from
the private dictionary through the creator: as pydicom, the creator of (gggg,eexx) is
(gggg,00ee) whenever the group is odd and ``ee`` is not 00). File-meta attributes (``CallingAETitle``,
``(0002,eeee)``) come from the file meta as before.

pydicom's full read is used instead whenever the short cut could differ from it:

* a big endian, deflated or registered private transfer syntax, or a data set whose
  first element contradicts its transfer syntax (explicit vs implicit VR);
* an undefined-length element (a sequence, or pixel-data-like bytes) anywhere at the top
  level before the pixel data — pydicom parses those its own way and may find elements
  inside their bytes that the walk does not (a forged copy of a wanted tag after a fake
  delimiter: pydicom keeps the last copy), so such a file is pydicom's to read;
* command-set elements (group 0000) opening the data set, an item tag (FFFE,eeee) at
  the top level, or a file meta whose end pydicom sees elsewhere than our meta reader;
* a Specific Character Set larger than pydicom's defer size;
* a rule on an attribute whose VR pydicom settles from other elements (``US or SS``,
  ``OB or OW``): no configuration with such a rule takes the short cut.

Values above pydicom's defer size (64 KiB) are left out, as pydicom's deferred ones are
dropped (:func:`pipeline.header._drop_deferred`).

The same switch covers the walk's own short cut: the top level of a plain file is parsed
from 64 KiB blocks in memory (``header._Walker._fast_top``, same checks and messages)
instead of element by element through the file object — the walk was most of the
header read's CPU, in the receiver's pre-acknowledgement check too.

Switch (README, Performance): ``DICOMFLOW_FASTPATH=0`` or ``DICOMFLOW_PATCHES_OFF=scan``
in a daemon's environment gives pydicom's full read for every file and the element-by-
element walk (the filter and the receiver read ``os.environ``; they install no
pynetdicom patch for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pydicom import uid as pydicom_uid
from pydicom._private_dict import private_dictionaries
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag

from pipeline import switches
from pipeline.rules import RuleSet

SWITCH = "scan"
CHARSET, SOP_CLASS, SOP_INSTANCE = 0x00080005, 0x00080016, 0x00080018
#: what the filter reads itself (``header._validate``, ``rules.sop_class_of``) and the
#: character set every text value is decoded with
FILTER_TAGS = frozenset({CHARSET, SOP_CLASS, SOP_INSTANCE})
#: pydicom's defer size in the header read (pipeline.header imports it): larger top-level
#: values are not read (nor needed by rules)
DEFER_SIZE = 64 * 1024
SPAN = 256 * 1024                # values this close together are read with one pread
UNDEFINED = 0xFFFFFFFF
IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """On unless ``DICOMFLOW_FASTPATH=0`` or ``scan`` is in ``DICOMFLOW_PATCHES_OFF``."""
    return switches.is_on(SWITCH, environ)


@dataclass(frozen=True)
class Wanted:
    """The top-level data-set tags a configuration's rules and the filter read."""

    tags: frozenset[int]


def wanted_for(rule_sets: Iterable[RuleSet]) -> Wanted | None:
    """The tags to scan for, or None if some rule needs pydicom's full read."""
    tags = set(FILTER_TAGS)
    for rules in rule_sets:
        for condition in rules.conditions:
            tag = condition.tag
            if tag is None or tag >> 16 == 0x0002:
                continue  # read from the file meta
            if _ambiguous(tag):
                return None
            tags.add(tag)
            creator = _private_creator(tag)
            if creator is not None:
                tags.add(creator)
    return Wanted(frozenset(tags))


def plan(rule_sets: Iterable[RuleSet], environ: Mapping[str, str] | None = None,
         extra: Iterable[int] = ()) -> Wanted | None:
    """What the filter scans for with these rules (and the ``extra`` top-level tags it
    reads itself, e.g. the study UIDs); None: pydicom's full read (switched off, or a
    rule the scan cannot serve)."""
    if not enabled(environ):
        return None
    wanted = wanted_for(rule_sets)
    return None if wanted is None else Wanted(wanted.tags | frozenset(extra))


def _private_creator(tag: int) -> int | None:
    """The private creator element of a private data element (PS3.5 §7.8.1).

    The rule pydicom applies when it looks a private VR up (``hooks._private_vr_for_tag``):
    any element of an odd group whose high byte is not 0 — (gggg,0100)-(gggg,0FFF)
    included, although PS3.5 reserves blocks 10-FF — has its creator at (gggg,00ee).
    """
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 0 or not element & 0xFF00:
        return None
    return group << 16 | element >> 8


def _ambiguous(tag: int) -> bool:
    """Does pydicom choose this tag's VR from other elements (``US or SS`` …)?"""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        if not element & 0xFF00:
            return False  # a private creator (LO) or a reserved element (UN)
        # the keys datadict.get_private_entry tries, under any creator
        keys = (f"{group:04X}{element:04X}", f"{group:04X}xx{element & 0xFF:02X}",
                f"{group >> 8:02X}xxxx{element & 0xFF:02X}")
        return any(" or " in entries[key][0] for entries in private_dictionaries.values()
                   for key in keys if key in entries)
    try:
        return " or " in dictionary_VR(tag)
    except KeyError:
        return False


class ElementRecorder(Protocol):
    """What the completeness walk tells of the top level before the pixel data (the
    filter's :class:`Recorder`; the shaping writer's layout, :mod:`pipeline.shaping.layout`)."""

    def starts_at(self, meta_end: int, dataset_start: int) -> None: ...

    def element(self, tag: int, vr: bytes | None, length: int, value_at: int) -> None: ...

    def after_pixel_data(self, tag: int, start: int) -> None:
        """A top-level element after the pixel data, starting at byte ``start`` (the
        shaping writer cannot reach it)."""


class Recorder:
    """Filled by the completeness walk: where each wanted top-level element's value is,
    and whether the short cut must give way to pydicom (:attr:`blocked` says why)."""

    __slots__ = ("blocked", "found", "_first", "_wanted")

    def __init__(self, wanted: Wanted) -> None:
        self._wanted = wanted.tags
        self.found: dict[int, tuple[bytes | None, int, int]] = {}
        self.blocked: str | None = None
        self._first = True

    def after_pixel_data(self, tag: int, start: int) -> None:
        """Nothing the rules read is after the pixel data (pydicom stops there too)."""

    def starts_at(self, meta_end: int, dataset_start: int) -> None:
        """Our meta reader and pydicom's must agree where the data set starts."""
        if meta_end != dataset_start:
            self.blocked = "pydicom sees the file meta end elsewhere"

    def element(self, tag: int, vr: bytes | None, length: int, value_at: int) -> None:
        """One top-level element before the pixel data (the walker calls this)."""
        if self._first:
            self._first = False
            if tag >> 16 == 0x0000:
                self.blocked = "command set elements open the data set"
        if tag >> 16 == 0xFFFE:  # an item tag at the top level: read as implicit by the walk
            self.blocked = "an item or delimiter tag at the top level"
        if length == UNDEFINED:
            # even after the last wanted tag: pydicom may read a forged copy of one
            # from inside its bytes (tests/test_header_scan.py, the smuggled PatientID)
            self.blocked = "an undefined-length element before the pixel data"
            return
        if tag not in self._wanted:
            return
        if length > DEFER_SIZE:
            if tag == CHARSET:
                self.blocked = "a Specific Character Set larger than the defer size"
            self.found.pop(tag, None)  # pydicom defers it and the header reader drops it
        else:
            self.found[tag] = (vr, length, value_at)  # a repeated tag: the last one, as pydicom


def recorder_for(wanted: Wanted | None, transfer_syntax: str) -> Recorder | None:
    """A recorder if the scan can serve files of this transfer syntax."""
    if wanted is None or transfer_syntax in (EXPLICIT_BE, DEFLATED):
        return None
    if transfer_syntax in pydicom_uid.PrivateTransferSyntaxes:
        return None
    return Recorder(wanted)


def build(recorder: Recorder, read_at: Callable[[int, int], bytes], explicit: bool,
          transfer_syntax: str, file_meta: FileMetaDataset) -> FileDataset | None:
    """The data set of the recorded elements, as ``dcmread`` would have returned it
    (None: use ``dcmread``). ``explicit``: the VR encoding the walk found."""
    if recorder.blocked is not None or explicit == (transfer_syntax == IMPLICIT_LE):
        return None
    values = _values(recorder.found, read_at)
    if values is None:
        return None
    implicit = not explicit
    raw: dict[BaseTag, RawDataElement] = {}
    for tag, (vr_bytes, length, at) in recorder.found.items():
        vr = vr_bytes.decode(default_encoding) if vr_bytes is not None else None
        value = values[tag] if length else empty_value_for_VR(vr, raw=True)
        key = BaseTag(tag)
        raw[key] = RawDataElement(key, vr, length, value, at, implicit, True)  # type: ignore[arg-type]
    # what pydicom's read_dataset and read_partial do with what they read
    dataset = Dataset(raw, parent_encoding=default_encoding)  # type: ignore[arg-type]
    encoding: str | list[str] = default_encoding
    charset = raw.get(BaseTag(CHARSET))
    if charset is not None:
        encoding = convert_encodings(convert_raw_data_element(charset).value)
    dataset.set_original_encoding(implicit, True, encoding)
    result = FileDataset("", dataset, preamble=b"\0" * 128, file_meta=file_meta,
                         is_implicit_VR=implicit, is_little_endian=True)
    result.set_original_encoding(implicit, True, dataset._character_set)
    return result


def _values(found: dict[int, tuple[bytes | None, int, int]],
            read_at: Callable[[int, int], bytes]) -> dict[int, bytes] | None:
    """Every recorded value, with one read when they lie close together (they do: the
    attributes rules test sit in the first kilobytes); None if the file got shorter."""
    spans = [(at, length, tag) for tag, (_, length, at) in found.items() if length]
    if not spans:
        return {}
    low = min(at for at, _, _ in spans)
    high = max(at + length for at, length, _ in spans)
    values: dict[int, bytes] = {}
    if high - low <= SPAN:
        block = read_at(low, high - low)
        if len(block) != high - low:
            return None
        for at, length, tag in spans:
            values[tag] = block[at - low: at - low + length]
        return values
    for at, length, tag in spans:
        value = read_at(at, length)
        if len(value) != length:
            return None
        values[tag] = value
    return values
