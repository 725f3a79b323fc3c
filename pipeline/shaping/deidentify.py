"""De-identification: PS3.15 Annex E's Basic Application Level Confidentiality Profile.

An endpoint with ``[deidentify] profile = basic`` gets copies whose header went through
Table E.1-1 (:mod:`pipeline.shaping.deid_table`) for its options, on the data set and in
every sequence item, by the same streaming writer as coercion
(:mod:`pipeline.shaping.rewrite`; pixel data copied through). Then:

* private elements are removed, but for those the endpoint names in ``safe_private``
  (with ``retain_safe_private``) and their creators;
* UIDs become keyed pseudonyms (:mod:`pipeline.shaping.pseudonyms`), the same wherever
  they occur, so references resolve across a study; well-known UIDs (every
  ``1.2.840.10008.*`` UID: SOP classes, transfer syntaxes, coding schemes…, and those
  pydicom knows) are kept. A UI attribute the table does not list is treated as ``U``
  unless its keyword names a class, syntax, scheme, context, creator, mapping, template
  or registry (:data:`_CLASS_LIKE`);
* Patient's Name and Patient ID get pseudonyms (a dummy value, as ``Z``/``D`` allow);
* a date the table does not list is treated as the table treats dates (emptied; kept
  with full dates; shifted with modified dates); an unlisted URL (UR: Retrieve URL,
  Storage URL…) is removed, and so are command (0000,xxxx) and file meta (0002,xxxx)
  elements inside the data set and public attributes pydicom's dictionary does not know;
* an overlay whose Overlay Data the table removes is removed whole (its other elements
  would describe a missing plane);
* Patient Identity Removed = YES, De-identification Method (and Code Sequence, CID 7050)
  and Longitudinal Temporal Information Modified are set;
* no Original Attributes Sequence travels (the table removes it; the writer adds none);
* the file meta is rebuilt from an allow-list (:meth:`Deidentifier.meta_keep`): its AE
  titles (0002,0016–0018) are blanked and its presentation addresses dropped unless
  ``retain_device_identity``; the preamble is zeros.

Coercion operations of the same endpoint run afterwards on the de-identified header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR, get_entry, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from pipeline.errors import ShapingError
from pipeline.shaping import deid_values
from pipeline.shaping.deid_table import ActionTable
from pipeline.shaping.operations import Change, Changes
from pipeline.shaping.pseudonyms import Pseudonyms

PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020
ORIGINAL_ATTRIBUTES = 0x04000561
#: the file meta elements blanked unless Retain Device Identity (Source, Sending, Receiving AE)
META_AE_TITLES = (0x00020016, 0x00020017, 0x00020018)
#: Source, Sending and Receiving Presentation Address: dropped unless Retain Device Identity
META_ADDRESSES = (0x00020026, 0x00020027, 0x00020028)
MEDIA_INSTANCE_UID = 0x00020003
#: the file meta elements a de-identified copy keeps (version, class, instance, syntax,
#: implementation class and version — the last two are replaced by ours)
META_KEPT = frozenset({0x00020001, 0x00020002, MEDIA_INSTANCE_UID, 0x00020010, 0x00020012,
                       0x00020013})
#: UI attributes that name a class, syntax, scheme or context, not an instance: kept
_CLASS_LIKE = re.compile(r"Class|Syntax|Scheme|Context|Creator|Mapping|Template|Registry")
_DATE_VRS = frozenset({"DA", "DT"})

#: the options, in the names of ``[deidentify] options`` → their CID 7050 code
OPTION_CODES: dict[str, tuple[str, str]] = {
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_modified_dates": ("113107",
                              "Retain Longitudinal Temporal Information Modified Dates Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
#: the values whose parts Clean Descriptors removes from text
_IDENTITY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "PatientBirthDate",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName", "RequestingPhysician",
    "StationName", "DeviceSerialNumber", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
)


@dataclass(frozen=True)
class SafePrivate:
    """One private element kept by Retain Safe Private: its creator, group, element byte."""

    creator: str
    group: int
    element: int  # the low byte (the ``ee`` of ``(gggg,xxee)``)


@dataclass(frozen=True)
class DeidentifyConfig:
    """An endpoint's ``[deidentify]``: validated options, the key, the safe privates."""

    options: frozenset[str]
    key: bytes = field(repr=False)
    allow_burned_in: bool = False
    safe_private: tuple[SafePrivate, ...] = ()

    @property
    def retains_device_identity(self) -> bool:
        return "retain_device_identity" in self.options


class Deidentifier:
    """Table E.1-1 for one endpoint; offers what the writer expects of operations."""

    deletes_private = True

    def __init__(self, config: DeidentifyConfig) -> None:
        self.config = config
        self.table = ActionTable(config.options)
        self.pseudonyms = Pseudonyms(config.key)
        self._safe = {(s.creator, s.group, s.element) for s in config.safe_private}

    def apply(self, ds: Dataset) -> Changes:
        """De-identify ``ds`` in place; ShapingError (no value named) if it cannot be."""
        run = _Run(self, ds)
        try:
            run.start()
            run.dataset(ds, "", None)
            run.add_method_attributes()
        except ShapingError:
            raise
        except Exception as exc:  # pydicom raises many types on garbage; values are PHI
            where = "a value of this file" if run.at is None else _name(run.at)
            raise ShapingError(f"de-identification: {where} cannot be decoded or written "
                               f"({type(exc).__name__})") from None
        return run.changes

    def meta_changes(self, meta: Dataset, ds: Dataset) -> dict[int, bytes | None]:
        """The file meta elements to change (None: zero length): the Media Storage SOP
        Instance UID is always the copy's SOP Instance UID — the pseudonym of the meta's
        own when the data set has none — and the AE titles are blanked."""
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if not uid:
            uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
            if uid and "retain_uids" not in self.config.options and not well_known_uid(uid):
                uid = self.pseudonyms.uid(uid)
        changes: dict[int, bytes | None] = {MEDIA_INSTANCE_UID: uid.encode()} if uid else {}
        if not self.config.retains_device_identity:
            changes.update(dict.fromkeys(META_AE_TITLES))
        return changes

    def meta_keep(self) -> frozenset[int]:
        """The file meta allow-list: the Media Storage SOP Class and Instance UIDs, the
        transfer syntax, the version, the implementation (replaced by ours), the AE
        titles (blanked) — and the presentation addresses with Retain Device Identity.
        Anything else (RTV elements, unknown ones, the original's Private Information)
        could identify; the caller adds our own mark."""
        keep = META_KEPT | set(META_AE_TITLES)
        if self.config.retains_device_identity:
            keep |= set(META_ADDRESSES)
        return frozenset(keep)

    def keeps_private(self, ds: Dataset, tag: int) -> bool:
        """Retain Safe Private: is this private element (or creator) one the endpoint names?"""
        if "retain_safe_private" not in self.config.options or not self._safe:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        if 0x0010 <= element <= 0x00FF:
            creator = _text(ds, tag)
            return any(c == creator and g == group for c, g, _ in self._safe)
        if element < 0x1000:
            return False
        creator = _text(ds, (group << 16) | (element >> 8))
        return (creator, group, element & 0xFF) in self._safe


def _text(ds: Dataset, tag: int) -> str:
    element = ds.get(tag)
    return "" if element is None or element.value is None else str(element.value).strip()


class _Run:
    """One file's de-identification: its context (date shift, identity tokens), the changes."""

    def __init__(self, deid: Deidentifier, ds: Dataset) -> None:
        self.deid = deid
        self.ds = ds
        self.changes = Changes()
        #: the element being read (named in an error, never its value)
        self.at: int | None = None
        self.shift = 0
        self.cleaner = deid_values.TextCleaner(())
        options = deid.config.options
        self.dates = ("K" if "retain_full_dates" in options
                      else "C" if "retain_modified_dates" in options else "Z")

    def start(self) -> None:
        """Read the file's context: the date shift, the identity tokens for cleaning."""
        ds = self.ds
        self.at = PATIENT_ID
        self.shift = self.deid.pseudonyms.date_shift_days(_text(ds, PATIENT_ID))
        tokens: list[str] = []
        for tag in map(_tag, _IDENTITY_KEYWORDS):
            if tag in ds:
                self.at = tag
                tokens += [str(value) for value in _values(ds[tag].value)]
        self.at = None
        self.cleaner = deid_values.TextCleaner(deid_values.identity_tokens(t for t in tokens if t))

    # -- walking -------------------------------------------------------------------

    def dataset(self, ds: Dataset, prefix: str, top: int | None) -> None:
        removed_overlays = {tag >> 16 for tag in ds.keys()
                            if (tag >> 16) & 0xFF01 == 0x6000 and tag & 0xFFFF == 0x3000
                            and self.deid.table.action(tag) == "X"}
        for tag in list(ds.keys()):
            here = tag if top is None else top
            self.at = tag
            if tag >> 16 in removed_overlays:
                self.remove(ds, tag, prefix, here, "overlay plane removed")
            else:
                self.element(ds, tag, prefix, here)

    def element(self, ds: Dataset, tag: int, prefix: str, top: int) -> None:
        group = tag >> 16
        if tag & 0xFFFF == 0 and group != 0x0002:
            self.remove(ds, tag, prefix, top, "group length")
            return
        if group % 2 or group in (0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF):
            if not self.deid.keeps_private(ds, tag):
                self.remove(ds, tag, prefix, top, "private")
            return
        vr = _vr(ds, tag)
        action = self.deid.table.action(tag)
        if tag == ORIGINAL_ATTRIBUTES:
            action = "X"
        if action is None and (group in (0x0000, 0x0002) or not _known(tag)):
            # a command element, a file meta element out of place, or one nobody can
            # say what it holds: it may hold anything
            self.remove(ds, tag, prefix, top, "unknown attribute removed")
            return
        if action is None:
            action = self.unlisted(tag, vr)
        if tag in (PATIENT_NAME, PATIENT_ID) and action in ("Z", "D"):
            self.pseudonym(ds, tag, prefix, top)
            return
        handler = {"X": self.remove_action, "Z": self.empty, "D": self.dummy, "K": self.keep,
                   "C": self.clean, "U": self.uid}[action]
        handler(ds, tag, vr, prefix, top)

    def unlisted(self, tag: int, vr: str) -> str:
        """An attribute Table E.1-1 does not list: kept, but UIDs, dates and URLs (module
        docstring)."""
        if vr == "UI" and not _CLASS_LIKE.search(keyword_for_tag(tag) or ""):
            return "U"
        if vr == "UR":
            return "X"  # Retrieve URL, Storage URL…: host names and the original UIDs
        if vr in _DATE_VRS:
            return self.dates
        return "K"

    # -- changing ------------------------------------------------------------------

    def touch(self, top: int, added: bool = False) -> None:
        self.changes.originals.setdefault(top, None if added else self.ds.get_item(top))

    def record(self, path: str, action: str, old: object, new: object, note: str = "") -> None:
        self.changes.records.append(Change(path, action, _shown(old), _shown(new), note,
                                           new_shown=True))

    def remove(self, ds: Dataset, tag: int, prefix: str, top: int, note: str = "") -> None:
        self.touch(top)
        self.record(prefix + _name(tag), "removed", _old(ds, tag), None, note)
        del ds[tag]

    def remove_action(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        self.remove(ds, tag, prefix, top)

    def replace(self, ds: Dataset, tag: int, vr: str, value: object, prefix: str, top: int) -> None:
        old = _old(ds, tag)
        self.touch(top)
        ds[tag] = DataElement(tag, vr, value)
        self.record(prefix + _name(tag), "changed", old, value)

    def empty(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        current = ds[tag].value
        if current in (None, "", b"") or (vr == "SQ" and not current):
            return
        self.replace(ds, tag, vr, Sequence() if vr == "SQ" else None, prefix, top)

    def dummy(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        if vr == "SQ":
            self.keep(ds, tag, vr, prefix, top)  # each item de-identified, attribute by attribute
        elif vr == "UI":
            self.uid(ds, tag, vr, prefix, top)
        elif vr in _DATE_VRS and self.dates == "C":
            self.shift_dates(ds, tag, vr, prefix, top)
        else:
            self.replace(ds, tag, vr, deid_values.dummy(vr), prefix, top)

    def keep(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        if vr != "SQ":
            return
        for index, item in enumerate(ds[tag].value or ()):
            self.dataset(item, f"{prefix}{_name(tag)}[{index}].", top)

    def clean(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        if vr == "SQ":
            self.keep(ds, tag, vr, prefix, top)
        elif vr in _DATE_VRS:
            self.shift_dates(ds, tag, vr, prefix, top)
        elif vr == "TM":
            return  # dates move by whole days: times are kept
        elif vr in deid_values.TEXT_VRS:
            self.clean_text(ds, tag, vr, prefix, top)
        else:
            self.remove(ds, tag, prefix, top, "cannot be cleaned: removed")

    def clean_text(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        values = _values(ds[tag].value)
        cleaned = [self.cleaner.clean(str(v)) for v in values]
        if cleaned == [str(v) for v in values]:
            return
        kept = [c for c in cleaned if c]
        value: object = None if not kept else kept[0] if len(kept) == 1 else kept
        self.replace(ds, tag, vr, value, prefix, top)

    def shift_dates(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        shift = (deid_values.shift_date if vr == "DA" else deid_values.shift_datetime)
        values = [str(v) for v in _values(ds[tag].value)]
        if not values:
            return
        shifted = [shift(v, self.shift) for v in values]
        kept = [s for s in shifted if s]
        value: object = None if not kept else kept[0] if len(kept) == 1 else kept
        self.replace(ds, tag, vr, value, prefix, top)

    def uid(self, ds: Dataset, tag: int, vr: str, prefix: str, top: int) -> None:
        if vr == "SQ":
            self.keep(ds, tag, vr, prefix, top)
            return
        if vr != "UI":
            self.remove(ds, tag, prefix, top, "not a UID: removed")
            return
        values = [str(v) for v in _values(ds[tag].value)]
        new = [v if well_known_uid(v) else self.deid.pseudonyms.uid(v) for v in values]
        if new != values:
            self.replace(ds, tag, vr, new[0] if len(new) == 1 else new, prefix, top)

    def pseudonym(self, ds: Dataset, tag: int, prefix: str, top: int) -> None:
        original = _text(ds, tag)
        maker = (self.deid.pseudonyms.patient_name if tag == PATIENT_NAME
                 else self.deid.pseudonyms.patient_id)
        self.replace(ds, tag, "PN" if tag == PATIENT_NAME else "LO", maker(original), prefix, top)

    # -- what the copy says of itself ----------------------------------------------

    def add_method_attributes(self) -> None:
        options = sorted(self.deid.config.options)
        codes = [BASIC_CODE] + [OPTION_CODES[o] for o in options]
        items = Sequence()
        for code, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
            items.append(item)
        method = ["DICOMFLOW PS3.15 E.1-1 BASIC PROFILE"] + [o.upper() for o in options]
        temporal = {"K": "UNMODIFIED", "C": "MODIFIED", "Z": "REMOVED"}[self.dates]
        added: tuple[tuple[int, str, object], ...] = (
            (0x00120062, "CS", "YES"), (0x00120063, "LO", method), (0x00120064, "SQ", items),
            (0x00280303, "CS", temporal))
        for tag, vr, new in added:
            self.touch(tag, added=tag not in self.ds)
            self.ds[tag] = DataElement(tag, vr, new)
            self.record(_name(tag), "added", None, "…" if vr == "SQ" else new)


def well_known_uid(uid: str) -> bool:
    """A UID DICOM defines (SOP classes, transfer syntaxes, coding schemes, well-known
    frames of reference…) or one pydicom knows: it identifies nobody, it is kept."""
    return uid.startswith("1.2.840.10008.") or uid in UID_dictionary


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def _known(tag: int) -> bool:
    """Is ``tag`` in pydicom's dictionary (repeating groups such as 60xx included)?"""
    try:
        get_entry(tag)
    except KeyError:
        return False
    return True


def _vr(ds: Dataset, tag: int) -> str:
    """The element's VR without reading a deferred value (explicit VR: as written)."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr and vr != "UN":
        return str(vr)
    try:
        known = dictionary_VR(tag)
    except KeyError:
        return str(vr or "UN")
    if len(known) != 2:  # "US or SS", "OB or OW": pydicom resolves it on reading
        return str(ds[tag].VR)
    return known


def _values(value: object) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, MultiValue)):
        return list(value)
    return [value]


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _old(ds: Dataset, tag: int) -> object:
    """The previous value, for ``route --show-values`` (large ones by size, unread)."""
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if getattr(raw, "VR", None) == "SQ":
        return "(sequence)"
    length = getattr(raw, "length", 0) or 0
    if length > 1024:
        return f"({length} bytes)"
    try:
        return ds[tag].value
    except Exception:  # pydicom raises many types on garbage (BytesLengthException…)
        return "(undecodable)"


def _shown(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return str(value)


class DeidentifyThenCoerce:
    """An endpoint's operations when it de-identifies: Table E.1-1, then its ``[coerce]``
    on the de-identified header (a template sees pseudonyms, never the originals)."""

    deletes_private = True

    def __init__(self, deidentifier: Deidentifier, coerce: object | None) -> None:
        self.deidentifier = deidentifier
        self.coerce = coerce

    def apply(self, ds: Dataset) -> Changes:
        changes = self.deidentifier.apply(ds)
        if self.coerce:
            more = self.coerce.apply(ds)  # type: ignore[attr-defined]
            for tag, old in more.originals.items():
                changes.originals.setdefault(tag, old)
            changes.records += more.records
        return changes
