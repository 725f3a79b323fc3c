"""Routing rules: SOP Class allow/deny-lists and ``Keyword=regex`` conditions.

Parsed once at start-up (so a bad rule is a configuration error) and evaluated
against a header-only dataset. Semantics (README, Design notes): ``re.fullmatch``,
case-sensitive; a multi-valued attribute matches if any value does; ``!=`` holds when
no value matches (a missing attribute included); ``=`` never matches a missing
attribute; deny-lists win over allow-lists.

An endpoint deciding at series or study level (``[filter] level``) evaluates its
conditions over every instance of the series/study (:mod:`pipeline.studies.levels`):
``Keyword=regex`` holds when *any* instance matches, ``Keyword!=regex`` when *none*
does, and ``all:Keyword=regex`` when *every* one does. For one instance ``all:`` changes
nothing, so the prefix is accepted at every level.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from pipeline.errors import RuleSyntaxError
from pipeline.names import is_valid_uid

#: Pseudo-keywords read from the file meta the receiver writes (README, How it works).
META_KEYWORDS = {
    "CallingAETitle": ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"),
    "CalledAETitle": ("ReceivingApplicationEntityTitle",),
}
_TAG_RE = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_CONDITION_RE = re.compile(r"\s*(all:)?\s*([^=!\s]+)\s*(!=|=)(.*)", re.S)


def _sop_keywords() -> dict[str, str]:
    from pydicom._uid_dict import UID_dictionary

    return {
        info[4]: uid
        for uid, info in UID_dictionary.items()
        if info[1] == "SOP Class" and info[4]
    }


_SOP_BY_KEYWORD = _sop_keywords()


def resolve_sop_class(token: str) -> str:
    """A SOP Class UID from a UID or a pydicom keyword such as ``CTImageStorage``."""
    token = token.strip()
    if token in _SOP_BY_KEYWORD:
        return _SOP_BY_KEYWORD[token]
    if is_valid_uid(token):
        return token
    raise RuleSyntaxError(f"{token!r} is neither a SOP Class UID nor a SOP Class keyword")


def parse_sop_list(text: str) -> frozenset[str]:
    """Comma- (or line-) separated SOP Class UIDs/keywords → a set of UIDs."""
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    return frozenset(resolve_sop_class(t) for t in tokens)


@dataclass(frozen=True)
class Condition:
    """One ``Keyword=regex`` or ``Keyword!=regex`` test."""

    source: str
    keyword: str
    tag: int | None
    negate: bool
    pattern: re.Pattern[str]
    #: ``all:`` — over a series or study, every instance must match (else: any)
    every: bool = False

    def matches(self, ds: Dataset) -> bool:
        """Does some value of the attribute match (before ``!=`` negates it)?"""
        values = attribute_values(ds, self.keyword, self.tag)
        return any(self.pattern.fullmatch(v) for v in values)

    def holds(self, ds: Dataset) -> bool:
        matched = self.matches(ds)
        return not matched if self.negate else matched

    def holds_over(self, any_matched: bool, all_matched: bool) -> bool:
        """Over a group of instances: ``=`` any, ``!=`` none, ``all:`` every one."""
        if self.negate:
            return not any_matched
        return all_matched if self.every else any_matched


def parse_condition(text: str) -> Condition:
    match = _CONDITION_RE.fullmatch(text)
    if not match:
        raise RuleSyntaxError(f"{text.strip()!r}: expected Keyword=regex, Keyword!=regex "
                              f"or all:Keyword=regex")
    every, name, op, regex = bool(match.group(1)), match.group(2), match.group(3), match.group(4).strip()
    keyword, tag = _resolve_attribute(name)
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise RuleSyntaxError(f"{text.strip()!r}: bad regular expression: {exc}") from None
    return Condition(text.strip(), keyword, tag, op == "!=", pattern, every)


def parse_conditions(text: str) -> tuple[Condition, ...]:
    """One condition per line (regexes may contain commas)."""
    return tuple(parse_condition(line) for line in text.splitlines() if line.strip())


def _resolve_attribute(name: str) -> tuple[str, int | None]:
    if name in META_KEYWORDS:
        return name, None
    tag_match = _TAG_RE.fullmatch(name)
    if tag_match:
        tag = int(tag_match.group(1) + tag_match.group(2), 16)
        return keyword_for_tag(tag) or name, tag
    known = tag_for_keyword(name)
    if known is None:
        raise RuleSyntaxError(
            f"{name!r} is not a DICOM keyword, a (gggg,eeee) tag, CallingAETitle or CalledAETitle"
        )
    return name, known


def attribute_values(ds: Dataset, keyword: str, tag: int | None) -> list[str]:
    """The values of an attribute as strings; empty if missing or a sequence."""
    if tag is None:
        meta = getattr(ds, "file_meta", None)
        for meta_keyword in META_KEYWORDS.get(keyword, ()):
            value = getattr(meta, meta_keyword, None) if meta is not None else None
            if value:
                return [str(value).strip()]
        return []
    container = ds
    if Tag(tag).group == 0x0002:
        container = getattr(ds, "file_meta", Dataset())
    if tag not in container:
        return []
    elem = container[tag]
    value = elem.value
    if value is None or isinstance(value, Sequence):
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [_as_text(v) for v in value]
    return [_as_text(value)]


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    return str(value).strip()


@dataclass(frozen=True)
class RuleSet:
    """The rules of one level (global or one endpoint)."""

    sop_whitelist: frozenset[str] = frozenset()
    sop_blacklist: frozenset[str] = frozenset()
    conditions: tuple[Condition, ...] = field(default_factory=tuple)

    def why_not(self, ds: Dataset) -> str | None:
        """None if the dataset passes, else the rule that stops it, for a ``.reason``."""
        sop_class = sop_class_of(ds)
        if sop_class in self.sop_blacklist:
            return f"sop_blacklist contains {sop_class}"
        if self.sop_whitelist and sop_class not in self.sop_whitelist:
            return f"sop_whitelist does not contain {sop_class}"
        for condition in self.conditions:
            if not condition.holds(ds):
                return f"condition {condition.source!r} does not hold"
        return None

    @property
    def empty(self) -> bool:
        return not (self.sop_whitelist or self.sop_blacklist or self.conditions)


def sop_class_of(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    value = getattr(meta, "MediaStorageSOPClassUID", None) if meta is not None else None
    return str(value or ds.get("SOPClassUID", "") or "")


def describe(conditions: Iterable[Condition]) -> list[str]:
    return [c.source for c in conditions]


@dataclass(frozen=True)
class Decision:
    """Where one file goes: the endpoints that want it, or why nobody does.

    ``rejected`` is the ``.reason`` text when the file goes to ``rejected/``;
    ``refusals`` maps each endpoint that does not want the file to its rule.
    """

    endpoints: tuple[str, ...]
    rejected: str | None
    refusals: dict[str, str]


def decide(global_rules: RuleSet, endpoint_rules: dict[str, RuleSet], ds: Dataset) -> Decision:
    """Apply the global rules, then every endpoint's; the same code for filter and dry run."""
    reason = global_rules.why_not(ds)
    if reason is not None:
        return Decision((), f"global rule: {reason}", {})
    endpoints: list[str] = []
    refusals: dict[str, str] = {}
    for name in sorted(endpoint_rules):
        why = endpoint_rules[name].why_not(ds)
        if why is None:
            endpoints.append(name)
        else:
            refusals[name] = why
    if endpoints:
        return Decision(tuple(endpoints), None, refusals)
    if not endpoint_rules:
        return Decision((), "no endpoint matched (no endpoints are configured)", refusals)
    details = "; ".join(f"{name}: {why}" for name, why in refusals.items())
    return Decision((), f"no endpoint matched ({details})", refusals)
