"""Coercion operations: the lines of ``[coerce] operations``, parsed once, applied per file.

Parsing happens at start-up so that every mistake is a configuration error
(:class:`OperationSyntaxError`, ``line N 'text': what is wrong``; N counts the
non-blank lines of the value, so line 1 is the first operation). Applying changes a
header-only data set in place and returns :class:`Changes`: the original of every
top-level element touched (for the Original Attributes Sequence and for the writer,
which re-encodes exactly those tags and copies every other element's bytes) and one
:class:`Change` per attribute for the dry-run diff. A file that cannot be shaped raises
:class:`~pipeline.errors.ShapingError` with a reason that never holds a value (PHI).

Grammar — one operation per line, applied in order:

``PATH = TEMPLATE``
    Set PATH (added if absent). TEMPLATE is text with ``{Keyword}`` placeholders;
    ``{{`` and ``}}`` are literal braces: ``PatientID = SITEA-{PatientID}``,
    ``IssuerOfPatientID = SITEA``. A placeholder takes the value of that attribute in
    the item the target is in (for ``Seq[*].X``), else in the nearest enclosing item,
    else at the top level; values as text (a person name as written). A placeholder
    whose attribute is absent or empty SKIPS the operation (a ``skipped`` change says
    which): a coercion never writes half a value. A multi-valued placeholder source
    makes the file fail. ``\\`` separates values (except in LT, ST, UT, which are one
    value). An empty TEMPLATE sets an empty value. The result is checked against the
    attribute's VR (length, characters, VM 1) and must be writable in the data set's
    character set (an item inherits it; the default repertoire — no Specific Character
    Set, ISO_IR 6, ISO 2022 IR 6 — is ASCII only). Setting the value already there is
    not a change. Numbers (US, UL, SS, SL, FL, FD…) are written from their text.
``delete PATH``
    Remove PATH (a private element too, by its tag: ``delete (0019,1010)``). An absent
    attribute gives a ``skipped`` change, nothing else.
``delete private`` / ``delete private except CREATOR, CREATOR``
    Remove every private element (odd group), creators included, at the top level and
    in every item of every sequence at any depth; ``except`` keeps the blocks of those
    private creators (exact, case-sensitive; surrounding spaces ignored), whole. Never
    kept: groups 0001, 0003, 0005, 0007 and FFFF (never private), elements without a
    creator, and both blocks of a creator that appears twice in one group.
``replace PATH <d>REGEX<d>REPLACEMENT<d>``
    Python ``re.sub`` on each value (every match; ``\\1``, ``\\g<name>``), sed-like:
    ``<d>`` is the first non-space character after PATH (``/``, ``|``, ``!``, ``~``…;
    not a letter, digit, backslash or one of ``()[],.*``; not ``#`` or ``;`` either,
    which after a space start an INI comment) and may not occur in REGEX or
    REPLACEMENT. ``replace PatientID /^0+//`` strips leading zeros. The result is
    checked as for a set. An absent attribute gives a ``skipped`` change.
``if CONDITION then OPERATION``
    CONDITION in the ``[filter] conditions`` syntax (``Keyword=regex``,
    ``Keyword!=regex``, ``CallingAETitle``, ``CalledAETitle``; full match), ending at
    the first `` then ``; evaluated on the data set as it is when that line runs. Not
    met: nothing happens.

PATH is a keyword (``PatientID``), a tag (``(0010,0020)``) or a sequence path
``SeqKeyword[*].Keyword`` (every item) / ``SeqKeyword[0].Keyword`` (the first item;
items count from 0), nested as deep as needed (``A[*].B[*].C``). An absent or empty
sequence or a missing item: nothing happens (a ``skipped`` change). A set into an item
that lacks the attribute adds it there.

Configuration errors: an unknown operation or keyword; setting (or replacing in) a
sequence, a private tag, an attribute with an ambiguous VR (``US or SS``) or a binary
VR (OB, OW, …, AT, UN); any target in the file meta (group 0002), Specific Character
Set (values keep the file's character set), SOPClassUID, Pixel Data and anything in
groups 7FE0 and above; deleting SOPInstanceUID (setting it is allowed: the writer
follows it in the file meta); ``[…]`` on an attribute that is not a sequence; a bad
regular expression or replacement; a bad condition; nothing before ``=``; unbalanced
braces; a placeholder that is not a keyword (or names a sequence or binary attribute).
"""

from __future__ import annotations

import copy
import re
import struct
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import MAX_VALUE_LEN, validate_value

from pipeline.errors import OperationSyntaxError, RuleSyntaxError, ShapingError
from pipeline.rules import Condition, parse_condition

_SPECIFIC_CHARACTER_SET = 0x00080005
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})
_ONE_VALUE_VRS = frozenset({"LT", "ST", "UT"})  # a backslash is text there, not a separator
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_INT_VRS = frozenset({"SL", "SS", "SV", "UL", "US", "UV"})
_FLOAT_VRS = frozenset({"FD", "FL"})
_NEVER_PRIVATE = frozenset({0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF})
#: What pydicom raises when a value of the file cannot be decoded or re-encoded.
#: what pydicom raises on values it cannot decode or encode (BytesLengthException: a
#: binary VR whose length is no whole number of values); its messages quote the value
_DECODE_ERRORS = (ValueError, TypeError, LookupError, struct.error, NotImplementedError,
                  OverflowError, BytesLengthException)

_TAG_RE = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_STEP_RE = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9]*|\([^)]*\))(?:\[(?P<index>[^\]]*)\])?")
_PATH_CHARS = r"[A-Za-z0-9\[\]\*\.\(\),]+"
_SET_RE = re.compile(r"(?P<path>[^=]*?)\s*=\s*(?P<template>.*)", re.S)
_REPLACE_RE = re.compile(rf"(?P<path>{_PATH_CHARS})\s*(?P<rest>.*)", re.S)
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_KEYWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*")


class _Bad(ValueError):
    """What is wrong with one line; :func:`parse_operations` adds where."""


@dataclass
class Change:
    """One attribute's fate, for the dry-run diff (values are PHI: shown on request)."""

    path: str
    action: str  # "added" | "changed" | "removed" | "skipped"
    old: str | None
    new: str | None
    note: str = ""
    #: the new value is no patient data (a pseudonym, a dummy): shown without --show-values
    new_shown: bool = False


@dataclass
class Changes:
    """What :meth:`Operations.apply` did: originals (first touched first) and records."""

    originals: dict[int, RawDataElement | DataElement | None] = field(default_factory=dict)
    records: list[Change] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.originals)


@dataclass(frozen=True)
class _Step:
    """One sequence to walk: ``name[index]``; ``index`` None means every item."""

    tag: int
    name: str
    index: int | None


@dataclass(frozen=True)
class _Path:
    """A parsed PATH: the sequences to walk, then the attribute."""

    text: str
    steps: tuple[_Step, ...]
    tag: int
    name: str


@dataclass(frozen=True)
class _Target:
    """One place a PATH resolved to in a data set.

    ``chain`` holds the enclosing items, outermost first (empty at the top level);
    ``snapshot`` is the top-level element as it was before this operation read it, so
    that the original of a raw (possibly deferred) element is kept undecoded.
    """

    dataset: Dataset
    tag: int
    path: str
    top_tag: int
    chain: tuple[Dataset, ...]
    snapshot: RawDataElement | DataElement | None


class _Journal:
    """Collects the originals and records of one :meth:`Operations.apply`."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.changes = Changes()

    def before_change(self, target: _Target) -> None:
        """Keep the original of the top-level element ``target`` lives in, once."""
        if target.chain:
            self.before_item_change(target.top_tag)
        else:
            self.before_top_change(target.top_tag, target.snapshot)

    def before_top_change(self, tag: int, snapshot: RawDataElement | DataElement | None) -> None:
        self.changes.originals.setdefault(tag, snapshot)

    def before_item_change(self, top_tag: int) -> None:
        # A change inside a sequence mutates the decoded element: keep a deep copy.
        if top_tag not in self.changes.originals:
            self.changes.originals[top_tag] = copy.deepcopy(self.ds[top_tag])

    def record(self, path: str, action: str, old: str | None, new: str | None, note: str = "") -> None:
        self.changes.records.append(Change(path, action, old, new, note))


class Operation(ABC):
    """One parsed line; ``apply`` changes ``ds`` in place and reports to the journal."""

    line: int
    source: str

    @abstractmethod
    def apply(self, ds: Dataset, journal: _Journal) -> None:
        """Apply this line to ``ds``."""


@dataclass(frozen=True)
class _Placeholder:
    keyword: str
    tag: int


@dataclass(frozen=True)
class _Template:
    """Literal text and placeholders, in order."""

    parts: tuple[str | _Placeholder, ...]

    def render(self, target: _Target, ds: Dataset) -> tuple[str | None, str]:
        """The text, or None and why the operation is skipped."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            text, note = _placeholder_text(part, target, ds)
            if text is None:
                return None, note
            out.append(text)
        return "".join(out), ""


@dataclass(frozen=True)
class SetAttribute(Operation):
    """``PATH = TEMPLATE``."""

    line: int
    source: str
    path: _Path
    vr: str
    vm: str
    template: _Template

    def apply(self, ds: Dataset, journal: _Journal) -> None:
        for found in _resolve(ds, self.path, journal):
            text, note = self.template.render(found, ds)
            if text is None:
                journal.record(found.path, "skipped", None, None, note)
            else:
                _store(journal, found, self.vr, self.vm, text)


@dataclass(frozen=True)
class ReplaceValue(Operation):
    """``replace PATH /REGEX/REPLACEMENT/``."""

    line: int
    source: str
    path: _Path
    vr: str
    vm: str
    pattern: re.Pattern[str]
    replacement: str

    def apply(self, ds: Dataset, journal: _Journal) -> None:
        for found in _resolve(ds, self.path, journal):
            if found.tag not in found.dataset:
                journal.record(found.path, "skipped", None, None, f"{found.path} is absent")
                continue
            value = found.dataset[found.tag].value
            if isinstance(value, bytes | bytearray | Sequence):
                raise ShapingError(f"{found.path}: the value is not text in this file")
            texts = _texts(value) or [""]
            new = "\\".join(self.pattern.sub(self.replacement, text) for text in texts)
            _store(journal, found, self.vr, self.vm, new)


@dataclass(frozen=True)
class DeleteAttribute(Operation):
    """``delete PATH``."""

    line: int
    source: str
    path: _Path

    def apply(self, ds: Dataset, journal: _Journal) -> None:
        for found in _resolve(ds, self.path, journal):
            if found.tag not in found.dataset:
                journal.record(found.path, "skipped", None, None, f"{found.path} is absent")
                continue
            old = _describe(found.dataset, found.tag)
            journal.before_change(found)
            del found.dataset[found.tag]
            journal.record(found.path, "removed", old, None)


@dataclass(frozen=True)
class DeletePrivate(Operation):
    """``delete private [except CREATOR, …]``."""

    line: int
    source: str
    keep: frozenset[str]

    def apply(self, ds: Dataset, journal: _Journal) -> None:
        for tag in _private_removals(ds, self.keep):
            journal.before_top_change(tag, ds.get_item(tag, keep_deferred=True))
            journal.record(_tag_text(tag), "removed", _describe(ds, tag), None)
            del ds[tag]
        for tag in list(ds.keys()):
            if _is_sequence(ds, tag):
                value = ds[tag].value
                if isinstance(value, Sequence):
                    first = _bind_item_change(journal, tag)
                    _strip_items(value, _tag_text(tag), self.keep, first, journal)


@dataclass(frozen=True)
class Conditional(Operation):
    """``if CONDITION then OPERATION``."""

    line: int
    source: str
    condition: Condition
    operation: Operation

    def apply(self, ds: Dataset, journal: _Journal) -> None:
        if self.condition.holds(ds):
            self.operation.apply(ds, journal)


@dataclass(frozen=True)
class Operations:
    """The parsed ``[coerce] operations`` of one level (global or one endpoint)."""

    lines: tuple[Operation, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.lines)

    @property
    def deletes_private(self) -> bool:
        """Is there a ``delete private`` (conditional or not)? The writer refuses a file
        with private elements after its pixel data then: they cannot be reached."""
        def deletes(operation: Operation) -> bool:
            if isinstance(operation, Conditional):
                return deletes(operation.operation)
            return isinstance(operation, DeletePrivate)
        return any(deletes(line) for line in self.lines)

    def top_tags(self) -> dict[int, int]:
        """The top-level attributes the lines may change (set, replace, delete; a change
        inside a sequence item: the sequence), each with the first line that does; ``delete
        private`` touches private elements only and is not listed."""
        def touched(operation: Operation) -> int | None:
            if isinstance(operation, Conditional):
                return touched(operation.operation)
            if isinstance(operation, SetAttribute | ReplaceValue | DeleteAttribute):
                path = operation.path
                return path.steps[0].tag if path.steps else path.tag
            return None
        tags: dict[int, int] = {}
        for line in self.lines:
            tag = touched(line)
            if tag is not None:
                tags.setdefault(tag, line.line)
        return tags

    def apply(self, ds: Dataset) -> Changes:
        """Apply every line in order to ``ds`` in place; ShapingError if it cannot be shaped.

        After a ShapingError ``ds`` is half changed: the caller drops it (the file goes
        to ``failed/`` for that endpoint), it never writes it.
        """
        journal = _Journal(ds)
        for operation in self.lines:
            try:
                operation.apply(ds, journal)
            except ShapingError as exc:
                raise ShapingError(f"{exc} (operations line {operation.line})") from None
            except _DECODE_ERRORS as exc:
                # pydicom's own messages may quote values (PHI): name the kind only.
                raise ShapingError(
                    f"operations line {operation.line}: a value of this file cannot be decoded "
                    f"or written ({type(exc).__name__})"
                ) from None
        return journal.changes


# --- parsing ---------------------------------------------------------------------------


def parse_operations(text: str) -> Operations:
    """The operations of one INI multi-line value; blank lines are ignored."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed.append(_parse_line(number, line, line))
        except _Bad as exc:
            raise OperationSyntaxError(f"line {number} '{line}': {exc}") from None
    return Operations(tuple(parsed))


def _parse_line(number: int, source: str, line: str) -> Operation:
    word, *tail = line.split(None, 1)
    rest = tail[0].strip() if tail else ""
    if word == "if":
        return _parse_if(number, source, rest)
    if word == "delete":
        return _parse_delete(number, source, rest)
    if word == "replace":
        return _parse_replace(number, source, rest)
    match = _SET_RE.fullmatch(line)
    if match and " " not in match.group("path").strip():
        return _parse_set(number, source, match.group("path"), match.group("template"))
    raise _Bad(
        f"unknown operation {word!r}: expected PATH = TEMPLATE, delete PATH, delete private "
        "[except CREATOR, …], replace PATH /REGEX/REPLACEMENT/ or if CONDITION then OPERATION"
    )


def _parse_if(number: int, source: str, rest: str) -> Operation:
    condition_text, then, operation_text = rest.partition(" then ")
    if not then or not condition_text.strip() or not operation_text.strip():
        raise _Bad("expected if CONDITION then OPERATION")
    try:
        condition = parse_condition(condition_text)
    except RuleSyntaxError as exc:
        raise _Bad(f"bad condition: {exc}") from None
    inner = _parse_line(number, source, operation_text.strip())
    return Conditional(number, source, condition, inner)


def _parse_delete(number: int, source: str, rest: str) -> Operation:
    if rest == "private":
        return DeletePrivate(number, source, frozenset())
    keep_match = re.fullmatch(r"private\s+except(?:\s+(.*))?", rest, re.S)
    if keep_match:
        names = [name.strip() for name in (keep_match.group(1) or "").split(",")]
        if not all(names):
            raise _Bad("delete private except needs private creator names, comma-separated")
        return DeletePrivate(number, source, frozenset(names))
    if not rest or " " in rest:
        raise _Bad("expected delete PATH or delete private [except CREATOR, …]")
    path = _parse_path(rest, allow_private=True)
    if path.tag == _SOP_INSTANCE_UID:
        raise _Bad("SOPInstanceUID cannot be deleted (it may be set)")
    return DeleteAttribute(number, source, path)


def _parse_set(number: int, source: str, path_text: str, template_text: str) -> Operation:
    if not path_text.strip():
        raise _Bad("nothing before '=': expected PATH = TEMPLATE")
    path = _parse_path(path_text.strip(), allow_private=False)
    vr, vm = _writable_vr(path)
    return SetAttribute(number, source, path, vr, vm, _parse_template(template_text.strip()))


def _parse_replace(number: int, source: str, rest: str) -> Operation:
    match = _REPLACE_RE.fullmatch(rest)
    if not match or not match.group("rest"):
        raise _Bad("expected replace PATH /REGEX/REPLACEMENT/")
    path = _parse_path(match.group("path"), allow_private=False)
    vr, vm = _writable_vr(path)
    body = match.group("rest").rstrip()
    delimiter = body[0]
    if delimiter.isalnum() or delimiter == "\\":
        raise _Bad(f"{delimiter!r} cannot be the delimiter: use a character such as / | # !")
    parts = body[1:].split(delimiter)
    if len(parts) != 3 or parts[2]:
        raise _Bad(f"expected {delimiter}REGEX{delimiter}REPLACEMENT{delimiter} (exactly three "
                   f"{delimiter!r}, nothing after the last)")
    if not parts[0]:
        raise _Bad("empty regular expression")
    try:
        pattern = re.compile(parts[0])
        _check_replacement(pattern, parts[1])
    except re.error as exc:
        raise _Bad(f"bad regular expression or replacement: {exc}") from None
    return ReplaceValue(number, source, path, vr, vm, pattern, parts[1])


def _check_replacement(pattern: re.Pattern[str], replacement: str) -> None:
    """Raise re.error for a replacement with bad escapes or group references, now.

    re.sub parses the replacement only at the first match, so it is tried on an
    empty pattern with the same groups (numbers and names) that always matches.
    """
    names = {index: name for name, index in pattern.groupindex.items()}
    groups = "".join(
        f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1)
    )
    re.compile(groups).sub(replacement, "")


def _parse_template(text: str) -> _Template:
    parts: list[str | _Placeholder] = []
    literal: list[str] = []
    position = 0
    for match in _TEMPLATE_TOKEN.finditer(text):
        literal.append(text[position:match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif match.group(1) is None:
            raise _Bad(f"unbalanced {token!r} in the template (write {token * 2} for a literal brace)")
        else:
            parts.extend(["".join(literal)] if any(literal) else [])
            literal = []
            parts.append(_parse_placeholder(match.group(1)))
    literal.append(text[position:])
    if any(literal):
        parts.append("".join(literal))
    return _Template(tuple(parts))


def _parse_placeholder(name: str) -> _Placeholder:
    tag = tag_for_keyword(name) if _KEYWORD_RE.fullmatch(name) else None
    if tag is None:
        raise _Bad(f"placeholder {{{name}}} is not a DICOM keyword")
    vr = dictionary_VR(tag)
    if vr == "SQ" or vr in _BINARY_VRS:
        raise _Bad(f"placeholder {{{name}}} has VR {vr}, which has no text value")
    return _Placeholder(name, tag)


def _parse_path(text: str, *, allow_private: bool) -> _Path:
    segments = text.split(".")
    steps: list[_Step] = []
    for position, segment in enumerate(segments):
        match = _STEP_RE.fullmatch(segment)
        if not match:
            raise _Bad(f"{segment!r} is not a keyword, a (gggg,eeee) tag or Keyword[*] / Keyword[N]")
        tag, name = _parse_attribute(match.group("name"))
        last = position == len(segments) - 1
        _check_target(tag, name)
        if last:
            if match.group("index") is not None:
                raise _Bad(f"a path ends with an attribute, not with [{match.group('index')}]")
            if Tag(tag).is_private and not allow_private:
                raise _Bad(f"private {name} cannot be set (its VR and meaning depend on its creator)")
            return _Path(text, tuple(steps), tag, name)
        steps.append(_parse_step(tag, name, match.group("index")))
    raise _Bad("empty path")  # unreachable: split gives at least one segment


def _parse_step(tag: int, name: str, index: str | None) -> _Step:
    if Tag(tag).is_private:
        raise _Bad(f"private sequence {name} cannot be walked by path")
    if _dictionary_vr(tag) != "SQ":
        if index is None:
            raise _Bad(f"{name} is not a sequence: only the last part of a path is an attribute")
        raise _Bad(f"[{index}] on {name}, which is not a sequence")
    if index is None:
        raise _Bad(f"{name} is a sequence: write {name}[*] or {name}[N]")
    if index == "*":
        return _Step(tag, name, None)
    if not index.isdigit():
        raise _Bad(f"[{index}] on {name}: expected [*] or an item number from 0")
    return _Step(tag, name, int(index))


def _parse_attribute(name: str) -> tuple[int, str]:
    """A keyword or ``(gggg,eeee)`` → (tag, the name used in records)."""
    tag_match = _TAG_RE.fullmatch(name)
    if tag_match:
        tag = int(tag_match.group(1) + tag_match.group(2), 16)
        return tag, _tag_text(tag)
    if name.startswith("("):
        raise _Bad(f"{name!r} is not a (gggg,eeee) tag")
    known = tag_for_keyword(name)
    if known is None:
        raise _Bad(f"{name!r} is not a DICOM keyword")
    return known, name


def _check_target(tag: int, name: str) -> None:
    group = tag >> 16
    if group == 0x0002:
        raise _Bad(f"{name} is in the file meta (group 0002), which operations never change")
    if group >= 0x7FE0:
        raise _Bad(f"{name}: Pixel Data and the groups from 7FE0 on are never changed")
    if tag == _SPECIFIC_CHARACTER_SET:
        raise _Bad("SpecificCharacterSet is never changed: values keep the file's character set")
    if tag == _SOP_CLASS_UID:
        raise _Bad("SOPClassUID is never changed")


def _writable_vr(path: _Path) -> tuple[str, str]:
    """The VR and VM of an attribute that can be set from text, else a config error."""
    vr = _dictionary_vr(path.tag)
    if vr is None:
        raise _Bad(f"{path.name} is not in the DICOM dictionary: its VR is unknown")
    if vr == "SQ":
        raise _Bad(f"{path.name} is a sequence: set the attributes inside it ({path.name}[*].Keyword)")
    if " or " in vr:
        raise _Bad(f"{path.name} has an ambiguous VR ({vr})")
    if vr in _BINARY_VRS:
        raise _Bad(f"{path.name} has VR {vr}, which cannot be written from text")
    return vr, dictionary_VM(path.tag)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _tag_text(tag: int) -> str:
    """The name of an attribute in records: its keyword, else ``(gggg,eeee)``."""
    keyword = "" if Tag(tag).is_private else keyword_for_tag(tag)
    return keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --- applying ----------------------------------------------------------------------------


def _resolve(ds: Dataset, path: _Path, journal: _Journal) -> list[_Target]:
    """Every place ``path`` names in ``ds``; a missing sequence or item is recorded as skipped."""
    if not path.steps:
        snapshot = ds.get_item(path.tag, keep_deferred=True)
        return [_Target(ds, path.tag, path.name, path.tag, (), snapshot)]
    found: list[_Target] = []
    _walk(ds, path, 0, "", (), journal, found)
    return found


def _walk(dataset: Dataset, path: _Path, depth: int, prefix: str, chain: tuple[Dataset, ...],
          journal: _Journal, found: list[_Target]) -> None:
    if depth == len(path.steps):
        top = path.steps[0].tag
        found.append(_Target(dataset, path.tag, prefix + path.name, top, chain, None))
        return
    step = path.steps[depth]
    where = prefix + step.name
    if step.tag not in dataset:
        journal.record(path.text, "skipped", None, None, f"{where} is absent")
        return
    items = dataset[step.tag].value
    if not isinstance(items, Sequence):
        raise ShapingError(f"{where}: not a sequence in this file")
    if not items:
        journal.record(path.text, "skipped", None, None, f"{where} is empty")
        return
    if step.index is not None and step.index >= len(items):
        journal.record(path.text, "skipped", None, None, f"{where} has no item {step.index}")
        return
    indexes = range(len(items)) if step.index is None else [step.index]
    for index in indexes:
        item = items[index]
        _walk(item, path, depth + 1, f"{where}[{index}].", (*chain, item), journal, found)


def _placeholder_text(placeholder: _Placeholder, target: _Target, ds: Dataset) -> tuple[str | None, str]:
    """The placeholder's text from the nearest item that has it, else the top level."""
    for dataset in (*reversed(target.chain), ds):
        if placeholder.tag in dataset:
            value = dataset[placeholder.tag].value
            break
    else:
        return None, f"{placeholder.keyword} is missing"
    if isinstance(value, bytes | bytearray | Sequence):
        raise ShapingError(f"{target.path}: placeholder {{{placeholder.keyword}}} is not text in this file")
    texts = _texts(value)
    if len(texts) > 1:
        raise ShapingError(f"{target.path}: placeholder {{{placeholder.keyword}}} has {len(texts)} "
                           "values, a template takes one")
    if not texts or not texts[0]:
        return None, f"{placeholder.keyword} is empty"
    return texts[0], ""


def _store(journal: _Journal, target: _Target, vr: str, vm: str, text: str) -> None:
    """Set ``target`` to ``text`` after checking it; the same value again is no change."""
    values = [] if text == "" else [text] if vr in _ONE_VALUE_VRS else text.split("\\")
    typed = _checked(target, journal.ds, vr, vm, values)
    dataset, tag = target.dataset, target.tag
    old = dataset[tag] if tag in dataset else None
    if old is not None and _texts(old.value) == [_text(value) for value in typed]:
        return
    old_text = None if old is None else _value_text(old)
    journal.before_change(target)
    empty: object = None if vr in _INT_VRS | _FLOAT_VRS else ""
    dataset[tag] = DataElement(tag, vr, typed if len(typed) > 1 else typed[0] if typed else empty)
    journal.record(target.path, "added" if old is None else "changed", old_text, "\\".join(values))


def _checked(target: _Target, ds: Dataset, vr: str, vm: str, values: list[str]) -> list[object]:
    """The values converted for ``vr``; ShapingError naming the rule broken (never the value)."""
    if vm == "1" and len(values) > 1:
        raise ShapingError(f"{target.path}: the new value has {len(values)} values, the attribute takes one")
    encodings, charset = _encodings(target, ds) if vr in _CHARSET_VRS else ([], "")
    typed: list[object] = []
    for value in values:
        converted = _typed(target, vr, value)
        try:
            validate_value(vr, converted, config.RAISE)
        except ValueError:
            raise ShapingError(f"{target.path}: {_broken_rule(vr, value)}") from None
        if encodings and not _encodable(value, encodings):
            raise ShapingError(f"{target.path}: the new value has characters {charset} cannot hold")
        typed.append(converted)
    return typed


def _typed(target: _Target, vr: str, value: str) -> object:
    try:
        if vr in _INT_VRS:
            return int(value)
        if vr in _FLOAT_VRS:
            return float(value)
    except ValueError:
        kind = "an integer" if vr in _INT_VRS else "a number"
        raise ShapingError(f"{target.path}: the new value is not {kind}, VR {vr} needs one") from None
    return value


def _broken_rule(vr: str, value: str) -> str:
    limit = MAX_VALUE_LEN.get(vr, 0)
    if limit and len(value) > limit:
        return f"the new value is {len(value)} characters, {vr} allows {limit}"
    if vr == "PN":
        return "the new value is not a valid PN (at most 3 component groups of 64 characters)"
    if vr in _INT_VRS:
        return f"the new value is out of the range of {vr}"
    return f"the new value has characters or a form that {vr} does not allow"


def _encodings(target: _Target, ds: Dataset) -> tuple[list[str], str]:
    """The Python encodings of the nearest Specific Character Set, and its name for messages.

    Without one, or for ISO_IR 6 / ISO 2022 IR 6 in it, the default repertoire: pydicom
    would take Latin-1 there, DICOM allows ASCII only. The list is for checking only
    (the writer encodes with pydicom's own).
    """
    for dataset in (*reversed(target.chain), ds):
        element = dataset.get(_SPECIFIC_CHARACTER_SET)
        if element is not None and element.value:
            names = _texts(element.value)
            label = "Specific Character Set " + "\\".join(names)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    encodings = convert_encodings(names)
                except (UserWarning, LookupError, ValueError):
                    raise ShapingError(f"{target.path}: the file's {label} is not understood") from None
            # pydicom's default encoding is lenient Latin-1; DICOM's default is ASCII.
            return ["ascii" if name == default_encoding else name for name in encodings], label
    return ["ascii"], "the default character repertoire (ASCII)"


def _encodable(value: str, encodings: list[str]) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            encode_string(value, encodings)
        except (ValueError, UserWarning, LookupError):  # UnicodeError is a ValueError
            return False
    return True


def _texts(value: object) -> list[str]:
    """A value as a list of texts; an empty value is no text at all."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [_text(item) for item in value]
    return [_text(value)]


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _value_text(element: DataElement) -> str:
    """A decoded element's value for the diff; binary values and sequences summarised."""
    value = element.value
    if isinstance(value, Sequence):
        return f"<sequence of {len(value)} items>"
    if isinstance(value, bytes | bytearray):
        return f"<{element.VR}, {len(value)} bytes>"
    return "\\".join(_texts(value))


def _describe(dataset: Dataset, tag: int) -> str:
    """An element's value for the diff without reading a deferred value or decoding privates."""
    element = dataset.get_item(tag, keep_deferred=True)
    if isinstance(element, RawDataElement):
        vr = element.VR or ("UN" if Tag(tag).is_private else _dictionary_vr(tag)) or "UN"
        if element.value is None and element.length:
            return f"<{vr}, {element.length} bytes, not read>"
        if vr in _BINARY_VRS or vr == "SQ":
            return f"<{vr}, {len(element.value or b'')} bytes>"
        try:
            element = convert_raw_data_element(element, encoding=dataset._character_set, ds=dataset)
        except _DECODE_ERRORS:
            return f"<{vr}, unreadable>"
    return _value_text(element)


def _bind_item_change(journal: _Journal, top_tag: int) -> Callable[[], None]:
    """A callback keeping the original of ``top_tag`` before its first change inside."""
    return lambda: journal.before_item_change(top_tag)


def _strip_items(items: Sequence, prefix: str, keep: frozenset[str], first: Callable[[], None],
                 journal: _Journal) -> None:
    """Remove the private elements of every item, at any depth."""
    for index, item in enumerate(items):
        where = f"{prefix}[{index}]."
        for tag in _private_removals(item, keep):
            first()
            journal.record(where + _tag_text(tag), "removed", _describe(item, tag), None)
            del item[tag]
        for tag in list(item.keys()):
            if _is_sequence(item, tag):
                value = item[tag].value
                if isinstance(value, Sequence):
                    _strip_items(value, where + _tag_text(tag), keep, first, journal)


def _is_sequence(dataset: Dataset, tag: int) -> bool:
    """A public sequence (told without decoding it); private blocks are never walked."""
    if Tag(tag).is_private:
        return False
    element = dataset.get_item(tag, keep_deferred=True)
    vr = element.VR if element is not None else None
    if vr in (None, "UN"):
        return _dictionary_vr(tag) == "SQ"
    return vr == "SQ"


def _private_removals(dataset: Dataset, keep: frozenset[str]) -> list[int]:
    """The private elements (odd groups) of one data set that ``delete private`` removes."""
    groups: dict[int, list[int]] = {}
    for tag in dataset.keys():
        if (tag >> 16) % 2:
            groups.setdefault(tag >> 16, []).append(int(tag))
    removals: list[int] = []
    for group, tags in groups.items():
        kept = _kept_blocks(dataset, tags, keep) if keep and group not in _NEVER_PRIVATE else set()
        removals.extend(tag for tag in tags if _block_of(tag) not in kept)
    return removals


def _kept_blocks(dataset: Dataset, tags: list[int], keep: frozenset[str]) -> set[int]:
    """The block numbers of one group whose creator is kept (a duplicated creator is not)."""
    creators = {tag & 0xFF: _creator_text(dataset, tag) for tag in tags if 0x10 <= tag & 0xFFFF <= 0xFF}
    counts = Counter(creators.values())
    return {block for block, name in creators.items() if name in keep and counts[name] == 1}


def _block_of(tag: int) -> int | None:
    """The private block an element belongs to: its creator's element number, if any."""
    element = tag & 0xFFFF
    if 0x10 <= element <= 0xFF:
        return element
    if element >= 0x1000:
        return element >> 8
    return None


def _creator_text(dataset: Dataset, tag: int) -> str:
    value = dataset.get_item(tag, keep_deferred=True).value
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1").strip(" \x00")
    return "\\".join(_texts(value)).strip(" \x00")
