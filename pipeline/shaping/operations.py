"""TEMPORARY STUB (replaced by the real module from branch ops): `Keyword = template` only."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset


class OperationSyntaxError(ValueError):
    pass


@dataclass
class Change:
    path: str
    action: str
    old: str | None
    new: str | None
    note: str = ""


@dataclass
class Changes:
    originals: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.originals)


@dataclass(frozen=True)
class _Set:
    keyword: str
    tag: int
    template: str

    def apply(self, ds: Dataset, changes: Changes) -> None:
        names = re.findall(r"\{(\w+)\}", self.template)
        values = {n: str(ds.get(n, "") or "") for n in names}
        if any(not v for v in values.values()):
            changes.records.append(Change(self.keyword, "skipped", None, None, "missing"))
            return
        new = self.template.format(**values)
        old = ds.get(self.keyword)
        if old is not None and str(old) == new:
            return
        if self.tag not in changes.originals:
            item = ds.get_item(self.tag, keep_deferred=True)
            changes.originals[self.tag] = item if isinstance(item, RawDataElement) or item is None else copy.deepcopy(item)
        setattr(ds, self.keyword, new)
        changes.records.append(Change(self.keyword, "changed" if old is not None else "added",
                                      None if old is None else str(old), new))


@dataclass(frozen=True)
class Operations:
    lines: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.lines)

    def apply(self, ds: Dataset) -> Changes:
        changes = Changes()
        for line in self.lines:
            line.apply(ds, changes)
        return changes


def parse_operations(text: str) -> Operations:
    lines = []
    for number, line in enumerate((t.strip() for t in text.splitlines()), 1):
        if not line:
            continue
        keyword, _, template = (p.strip() for p in line.partition("="))
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise OperationSyntaxError(f"line {number} {line!r}: unknown keyword {keyword!r}")
        lines.append(_Set(keyword, tag, template))
    return Operations(tuple(lines))
