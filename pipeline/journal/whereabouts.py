"""Where every copy is now: one scan of the spool's stages, by UID and by prefix.

The spool is the truth and the journal its history, so ``trace`` and ``reconcile``
check the journal's story against the files. One pass of ``os.scandir`` over each
stage folder, names parsed by a regular expression and nothing opened: cheap on a
spool of 200,000 files. A sidecar's reason is read only when asked for
(:meth:`Place.reason`), for the few files a report shows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipeline.spool import Spool, is_hidden, is_sidecar
from pipeline.spool_names import NO_UID, SUFFIX

#: the standard name (:mod:`pipeline.spool_names`) without the date check: ``<prefix>-<uid>.dcm``
NAME = re.compile(r"(\d{8}T\d{6}\.\d{6}-\d{6})-([0-9.]+|" + NO_UID + ")" + re.escape(SUFFIX))

#: where a copy waits for, or has reached, an endpoint — and what that means for it
QUEUED, DELIVERED, FAILED = "queued", "delivered", "failed"
REJECTED, QUARANTINED = "rejected", "quarantined"
#: instance-level stages (no endpoint): the file before or while it is routed
INSTANCE_STAGES = {"incoming": QUEUED, "accepted": QUEUED, "rejected": REJECTED,
                   "quarantine": QUARANTINED}
ENDPOINT_STAGES = {"outbox": QUEUED, "sent": DELIVERED, "failed": FAILED}
REASON_SIDECARS = {"failed": ".error", "rejected": ".reason", "quarantine": ".reason"}
REASON_LIMIT = 4096  # bytes of a sidecar read (a reason is one line)


def split_name(name: str) -> tuple[str, str | None] | None:
    """``(prefix, uid)`` of a standard spool name (uid None for ``nouid``), else None."""
    match = NAME.fullmatch(name)
    if match is None:
        return None
    uid = match[2]
    return match[1], None if uid == NO_UID else uid


class Place(NamedTuple):
    """One file of the spool: its stage, its endpoint (None for instance-level stages).

    A named tuple, not a dataclass: a scan makes one per file of the spool, and on
    200,000 files the difference is most of the scan's time."""

    stage: str
    endpoint: str | None
    name: str
    prefix: str | None
    uid: str | None
    root: Path

    @property
    def state(self) -> str:
        if self.endpoint is None:
            return INSTANCE_STAGES[self.stage]
        return ENDPOINT_STAGES.get(self.stage, QUEUED)  # accepted/<ep>: handed back, queued

    @property
    def relative(self) -> str:
        """Its path in the spool, as an operator types it (``outbox/pacs/<name>``)."""
        parts = [self.stage] + ([self.endpoint] if self.endpoint else []) + [self.name]
        return "/".join(parts)

    @property
    def path(self) -> Path:
        return self.root / self.relative

    def reason(self) -> str | None:
        """The text of its ``.error`` / ``.reason`` sidecar (None: none, or no such stage)."""
        suffix = REASON_SIDECARS.get(self.stage)
        if suffix is None:
            return None
        try:
            with open(f"{self.path}{suffix}", "rb") as handle:
                text = handle.read(REASON_LIMIT).decode("utf-8", "replace").strip()
        except OSError:
            return None
        return text or None


@dataclass
class Whereabouts:
    """Every visible file of a spool, indexed by UID (the one in its name) and prefix."""

    by_uid: dict[str, list[Place]] = field(default_factory=dict)
    by_prefix: dict[str, list[Place]] = field(default_factory=dict)
    count: int = 0

    def add(self, place: Place) -> None:
        self.count += 1
        if place.uid is not None:
            self.by_uid.setdefault(place.uid, []).append(place)
        if place.prefix is not None:
            self.by_prefix.setdefault(place.prefix, []).append(place)

    def of(self, uids: set[str], prefixes: set[str]) -> list[Place]:
        """The files of an instance: those named with one of its UIDs or prefixes."""
        found: dict[tuple[str, str | None, str], Place] = {}
        for uid in uids:
            for place in self.by_uid.get(uid, ()):
                found[(place.stage, place.endpoint, place.name)] = place
        for prefix in prefixes:
            for place in self.by_prefix.get(prefix, ()):
                found[(place.stage, place.endpoint, place.name)] = place
        return sorted(found.values(), key=lambda p: (p.endpoint or "", p.stage, p.name))

    def places(self) -> Iterator[Place]:
        """Every file once (those without a standard name are not indexed, nor here)."""
        seen: set[int] = set()
        for group in (*self.by_prefix.values(), *self.by_uid.values()):
            for place in group:
                if id(place) not in seen:
                    seen.add(id(place))
                    yield place


def scan(spool: Spool) -> Whereabouts:
    """One pass over every stage of ``spool`` (missing folders are simply empty)."""
    found = Whereabouts()
    for stage in INSTANCE_STAGES:
        _scan_folder(found, spool, stage, None)
    for endpoint in spool.handbacks():
        _scan_folder(found, spool, "accepted", endpoint)
    for stage in ENDPOINT_STAGES:
        for endpoint in spool.endpoints(stage):
            _scan_folder(found, spool, stage, endpoint)
    return found


def _scan_folder(found: Whereabouts, spool: Spool, stage: str, endpoint: str | None) -> None:
    """Every visible file of one folder into ``found`` — the loop of every scan, so its
    steps are inlined (``add``, ``split_name``): a standard name is matched once."""
    directory = spool.stage(stage) if endpoint is None else spool.stage(stage) / endpoint
    by_uid, by_prefix, root, match = found.by_uid, found.by_prefix, spool.root, NAME.fullmatch
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                parts = match(name)
                if parts is None:  # a hand-made name (a standard one is no sidecar, hidden or folder)
                    if not (is_hidden(name) or is_sidecar(name) or entry.is_dir(follow_symlinks=False)):
                        found.count += 1
                    continue
                prefix, uid = parts[1], parts[2]
                place = Place(stage, endpoint, name, prefix, None if uid == NO_UID else uid, root)
                found.count += 1
                if place.uid is not None:
                    by_uid.setdefault(uid, []).append(place)
                by_prefix.setdefault(prefix, []).append(place)
    except (FileNotFoundError, NotADirectoryError):
        return

