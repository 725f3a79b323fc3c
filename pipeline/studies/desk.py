"""The filter's study desk: which files wait for which series/study, and the releases.

The filter asks the desk what to do with each accepted file (:meth:`StudyDesk.arrive`),
links what it is told to link, and asks for the releases that are due
(:meth:`StudyDesk.due`). The desk moves no DICOM file itself: it keeps the index
(:mod:`pipeline.studies.index`), the durable records (:mod:`pipeline.studies.records`),
the MPPS steps the receiver recorded, the operators' release requests, and the state
file ``dicomflow status`` and ``dicomflow studies`` read (``run/studies/state.json``,
README "Studies"), so that status never parses a DICOM header.

Late instances (a group already released, its decision remembered under ``run/``):
``late = follow`` sends them where the study went, at once; ``late = reevaluate`` makes
them a new group whose conditions are decided over the released instances (their
aggregate was kept with the decision) plus the late ones.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pydicom.dataset import Dataset

from pipeline.names import escape, is_valid_uid
from pipeline.rules import RuleSet
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from pipeline.studies.index import (
    Group,
    Member,
    MppsStep,
    StudyIndex,
    level_key,
    mpps_state,
    patient_token,
    sort_order,
    steps_by_study,
)
from pipeline.studies.levels import FOLLOW, Aggregate, Facts, StudyPolicy
from pipeline.studies.records import DecisionBook, GroupKey, ReachedLog, Released, studies_dir

STATE_FILE = "state.json"
STATE_VERSION = 1
STATE_INTERVAL = 1.0        # the state file is rewritten at most once a second…
STATE_REFRESH = 10.0        # …and at least this often while the filter runs
REQUESTS = "requests"       # run/studies/requests/<STUDY_UID>.release (dicomflow release)
REQUEST_SUFFIX = ".release"
MAX_WAITING_SHOWN = 10_000  # rows of the state file's waiting list (the rest are counted)
#: what the study side reads in every header (with the rules' own tags)
STUDY_TAGS = frozenset({0x0020000D, 0x0020000E, 0x00200011, 0x00200013, 0x00100020})

WAIT, SEND, SKIP = "wait", "send", "skip"
MAINTENANCE_INTERVAL = 3600.0
MPPS_MEMORY = 7 * 86400.0   # MPPS steps not updated for this long are removed
MTIME_TICK = 2.0            # a directory changed this lately may have changed again unseen


@dataclass(frozen=True)
class InstanceIds:
    """What grouping reads of one instance."""

    study: str
    series: str
    sop_instance_uid: str
    series_number: object
    instance_number: object
    patient: str                # a digest of the Patient ID (pipeline.studies.index.patient_token)


def instance_ids(ds: Dataset) -> InstanceIds | str:
    """The instance's UIDs and numbers, or why it cannot be grouped (a quarantine reason).

    Read from the raw values (ASCII for UI and IS; the Patient ID only as a digest):
    pydicom's conversion and validation of six values was a third of the filter's
    CPU when it rebuilds its index of waiting studies."""
    found = {}
    for keyword, tag in (("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E)):
        value = _raw_text(ds, tag)
        if not value:
            return f"no {keyword}: it cannot be grouped by an endpoint deciding per series/study"
        if not is_valid_uid(value):
            return (f"{keyword} {escape(value, 80)!r} is not a valid UID: it cannot be grouped "
                    f"by an endpoint deciding per series/study")
        found[keyword] = value
    return InstanceIds(found["StudyInstanceUID"], found["SeriesInstanceUID"],
                       _raw_text(ds, 0x00080018), _raw_text(ds, 0x00200011),
                       _raw_text(ds, 0x00200013), patient_token(_raw_text(ds, 0x00100020)))


def _raw_text(ds: Dataset, tag: int) -> str:
    """An element's value as text without pydicom's conversion ("" when absent)."""
    try:
        elem = ds.get_item(tag)
    except (KeyError, ValueError):
        return ""
    value = None if elem is None else elem.value
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("ascii", "replace").strip(" \0")
    if isinstance(value, list | tuple):  # a converted multi-valued element
        return "\\".join(map(str, value))
    return str(value).strip(" \0")


@dataclass(frozen=True)
class Release:
    """A complete group and its decision, ready to be carried out by the filter."""

    group: Group
    why: str
    send: bool
    why_not: str | None
    members: tuple[Member, ...]
    #: the conditions over the group (and, for ``reevaluate``, what it was released with)
    aggregate: Aggregate

    @property
    def endpoint(self) -> str:
        return self.group.endpoint


class StudyDesk:
    """Bound to one spool and the endpoints' rules and policies (no globals)."""

    def __init__(self, spool: Spool, rules: dict[str, RuleSet], policies: dict[str, StudyPolicy],
                 mpps: Callable[[], Iterable[MppsStep]] | None = None,
                 prune_mpps: Callable[[float], int] | None = None, log=None,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.directory = studies_dir(spool)
        self.requests_dir = self.directory / REQUESTS
        self.mpps_dir = spool.run_dir / "mpps"
        self.rules = rules
        self.policies = {name: p for name, p in policies.items() if p.grouped}
        self.log = log or logger.bind(daemon="filter")
        self.monotonic, self.wall = monotonic, wall
        self.index = StudyIndex()
        self.reached = ReachedLog(spool)
        self.decisions = DecisionBook(spool)
        self._load_mpps = mpps
        self._prune_mpps = prune_mpps
        self._maintained = monotonic()
        self._mpps_stamp: tuple[int, int] | None = None
        self.steps: dict[str, list[MppsStep]] = {}
        #: studies whose MPPS changed since the last look for releases
        self._changed: set[str] = set()
        self._split_warned: set[str] = set()
        self._state_written = -1e18
        self._state_dirty = True

    @property
    def active(self) -> bool:
        """Does any endpoint decide per series or study?"""
        return bool(self.policies)

    # -- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Load the records (decisions, reached endpoints) and the MPPS steps."""
        for directory in (self.directory, self.requests_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.decisions.load(self.wall())
        self.reached.load()
        self._changed |= self.refresh_mpps()

    def recovered(self) -> None:
        """After the first pass over ``accepted/``: the records of files gone are dropped."""
        self.reached.compact(self._in_accepted())

    def _in_accepted(self) -> set[str]:
        """Names in ``accepted/`` now (a file waiting or due for a retry keeps its records)."""
        return {path.name for path in self.spool.list_stage(self.spool.accepted)}

    def maintain(self) -> None:
        """Hourly: old MPPS steps go, the logs are rewritten when mostly dead lines."""
        now = self.monotonic()
        if now - self._maintained < MAINTENANCE_INTERVAL:
            return
        self._maintained = now
        if self.reached.worth_compacting():
            self.reached.compact(self._in_accepted())
        if self.decisions.worth_compacting():
            self.decisions.load(self.wall())
        if self._prune_mpps is not None:
            removed = self._prune_mpps(MPPS_MEMORY)
            if removed:
                self.log.info(f"{removed} MPPS record(s) older than {MPPS_MEMORY / 86400:g} days "
                              f"removed from run/mpps/")

    def forget_state(self) -> None:
        """No endpoint groups any more: a state file left from before would only mislead."""
        try:
            os.unlink(self.directory / STATE_FILE)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.reached.close()
        self.decisions.close()

    def reconfigure(self, rules: dict[str, RuleSet], policies: dict[str, StudyPolicy]) -> set[str]:
        """A reload. A waiting group of an endpoint that is gone, no longer grouped or
        whose rules changed is dropped, undecided; the names of its files are returned:
        the filter reads them again and they join groups under the new configuration (or
        go to the endpoint at once, now per instance). The others take the new timings."""
        self.rules = rules
        self.policies = {name: p for name, p in policies.items() if p.grouped}
        again: set[str] = set()
        for key, group in list(self.index.groups.items()):
            policy = self.policies.get(group.endpoint)
            if (policy is None or group.rules != rules.get(group.endpoint)
                    or policy.level != group.policy.level):  # the key's shape follows the level
                again |= set(group.members)
                self.index.remove(key)
            else:
                group.policy = policy
        self._state_dirty = True
        return again

    # -- arrivals --------------------------------------------------------------------

    def arrive(self, name: str, groups: dict[str, Facts], ids: InstanceIds,
               recovering: bool) -> dict[str, str]:
        """For each grouped endpoint: WAIT (joins its group), SEND or SKIP (late)."""
        wall = self.wall()
        arrived = wall
        if recovering:  # arrival time from the name; never in the future
            parsed = SpoolName.parse(name)
            arrived = min(parsed.timestamp, wall) if parsed else wall
        mono = self.monotonic() - (wall - arrived)
        verdicts: dict[str, str] = {}
        for endpoint, facts in groups.items():
            policy = self.policies[endpoint]
            key = level_key(endpoint, policy, ids.study, ids.series)
            released = self.decisions.get(key)
            prior = None
            if released is not None and key not in self.index.groups:
                if policy.late == FOLLOW or not self._same_rules(released, endpoint):
                    verdicts[endpoint] = SEND if released.send else SKIP
                    continue
                prior = released
            member = Member(name, sort_order(ids.series_number, ids.instance_number, name),
                            ids.sop_instance_uid)
            group = self.index.add(key, policy, self.rules[endpoint], member, facts, mono,
                                   arrived, ids.patient, prior)
            group.recovered |= recovering
            self._warn_split(group)
            verdicts[endpoint] = WAIT
        self.index.saw(ids.study, ids.sop_instance_uid)
        self._state_dirty |= bool(groups)
        return verdicts

    def _same_rules(self, released: Released, endpoint: str) -> bool:
        return released.conditions == tuple(c.source for c in self.rules[endpoint].conditions) \
            and released.aggregate is not None

    def _warn_split(self, group: Group) -> None:
        """One line per study (not per endpoint's group) whose instances name two patients."""
        if len(group.patients) < 2 or group.split_warned:
            return
        group.split_warned = True
        if group.study in self._split_warned:
            return
        if len(self._split_warned) > MAX_WAITING_SHOWN:
            self._split_warned.clear()
        self._split_warned.add(group.study)
        self.log.warning(f"study {group.study}: its instances name {len(group.patients)} "
                         f"different patients (Patient ID); routed as one study")

    # -- releases --------------------------------------------------------------------

    def due(self) -> list[Release]:
        """The groups complete now: operators' requests, MPPS changes, deadlines."""
        now = self.monotonic()
        studies = self.take_requests() | self.refresh_mpps() | self._changed
        self._changed = set()
        found = self.index.check(studies, now, self.steps) if studies else []
        seen = {id(group) for group, _ in found}
        found += [(g, why) for g, why in self.index.due(now, self.steps) if id(g) not in seen]
        return [self._decide(group, why) for group, why in found]

    def check_study(self, study: str) -> list[Release]:
        """An instance of ``study`` arrived: complete now by its MPPS?"""
        if study not in self.steps:
            return []
        return [self._decide(g, why) for g, why in self.index.check([study], self.monotonic(),
                                                                     self.steps)]

    def _decide(self, group: Group, why: str) -> Release:
        aggregate = Aggregate(list(group.aggregate.any_matched), list(group.aggregate.all_matched),
                              group.aggregate.count)
        if group.prior is not None and group.prior.aggregate is not None:
            aggregate.merge(group.prior.aggregate)
        why_not = aggregate.why_not(group.rules)
        if group.endpoint not in self.rules:
            why_not = "the endpoint is no longer configured"
        return Release(group, why, why_not is None, why_not, tuple(group.ordered()), aggregate)

    def decided(self, release: Release) -> None:
        """Make the decision durable — before the filter links any file of it."""
        group, aggregate = release.group, release.aggregate
        self.decisions.record(Released(
            group.key, release.send, self.wall(), aggregate.count,
            release.why if release.send else f"{release.why}; {release.why_not}",
            tuple(c.source for c in group.rules.conditions), aggregate))

    def retry_later(self, release: Release, delay: float) -> None:
        """A release the disk (or a bug) cut short: tried again in ``delay`` seconds."""
        self.index.schedule(release.group.key, self.monotonic() + delay)

    def finished(self, release: Release) -> list[str]:
        """Take the group out; the names of its files that now wait for nothing."""
        self._state_dirty = True
        return self.index.remove(release.group.key)

    def next_due(self) -> float | None:
        """Seconds until the next deadline or the state file's next due write (None:
        nothing waits). A write the once-a-second limit put off must still happen: an
        operator's ``status`` would otherwise show a study as it was at its first file."""
        times = [at for at in (self.index.next_due(),) if at is not None]
        if self.active and self._state_dirty:
            times.append(self._state_written + STATE_INTERVAL)
        return max(min(times) - self.monotonic(), 0.0) if times else None

    # -- operators and the receiver ----------------------------------------------------

    def take_requests(self) -> set[str]:
        """``dicomflow release`` requests: mark their studies, remove the requests."""
        studies: set[str] = set()
        try:
            names = os.listdir(self.requests_dir)
        except FileNotFoundError:
            return studies
        for name in names:
            if not name.endswith(REQUEST_SUFFIX) or name.startswith("."):
                continue
            study = name[:-len(REQUEST_SUFFIX)]
            if is_valid_uid(study):
                if self.index.force(study):
                    studies.add(study)
                    self.log.info(f"study {study}: release requested by an operator")
                else:
                    self.log.warning(f"release requested for study {study}, which is not waiting")
            try:
                os.unlink(self.requests_dir / name)
            except FileNotFoundError:
                pass
        return studies

    def refresh_mpps(self) -> set[str]:
        """Re-read the MPPS steps when ``run/mpps/`` changed; the studies they name."""
        if self._load_mpps is None:
            return set()
        try:
            st = os.stat(self.mpps_dir)
            stamp = (st.st_mtime_ns, st.st_ino)
            # a directory's mtime is coarse (a clock tick): two changes within one tick
            # look like one, so a directory changed lately is read again
            recent = self.wall() - st.st_mtime < MTIME_TICK
        except FileNotFoundError:
            stamp, recent = (0, 0), False
        if stamp == self._mpps_stamp and not recent:
            return set()
        self._mpps_stamp = stamp
        before = self.steps
        self.steps = steps_by_study(self._load_mpps())
        self._state_dirty = True
        return {study for study, steps in self.steps.items()
                if [(s.uid, s.status) for s in steps]
                != [(s.uid, s.status) for s in before.get(study, [])]}

    # -- the state file ----------------------------------------------------------------

    def write_state(self, force: bool = False) -> None:
        """``run/studies/state.json``, at most once a second (README "Studies")."""
        if not self.active:
            return
        now = self.monotonic()
        if not force and (now - self._state_written < STATE_INTERVAL
                          or not self._state_dirty and now - self._state_written < STATE_REFRESH):
            return
        self._state_written, self._state_dirty = now, False
        try:
            self.spool.write_bytes(self.directory, STATE_FILE,
                                   json.dumps(self.state(now)).encode(), replace=True)
        except OSError as exc:
            self.log.warning(f"cannot write the studies state file: {exc.strerror or exc}")

    def state(self, now: float) -> dict:
        wall = self.wall()
        groups = sorted(self.index.groups.values(), key=lambda g: g.first)
        waiting = [self._waiting_row(g, now, wall) for g in groups[:MAX_WAITING_SHOWN]]
        released = [{"endpoint": r.key[0], "level": self._level(r.key), "study": r.key[1],
                     "series": r.key[2] or None, "send": r.send, "instances": r.count,
                     "at": r.at, "why": r.why} for r in self.decisions.recent()]
        return {"version": STATE_VERSION, "written": wall, "pid": os.getpid(),
                "waiting_total": len(groups), "waiting": waiting, "released": released}

    def _level(self, key: GroupKey) -> str:
        return "series" if key[2] else "study"

    def _waiting_row(self, group: Group, now: float, wall: float) -> dict:
        policy = group.policy
        arrived = self.index.arrived.get(group.study, set())
        steps: Sequence[MppsStep] = self.steps.get(group.study, [])
        state = mpps_state(group, steps, arrived)
        release_in = group.deadline() - now
        if state == "in progress":
            release_in = group.first + policy.max_wait - now
        return {"endpoint": group.endpoint, "level": policy.level, "study": group.study,
                "series": group.series, "instances": len(group.members),
                "first_arrival": group.first_wall, "last_arrival": group.last_wall,
                "completion": policy.completion, "mpps": state,
                "release_at": wall + max(release_in, 0.0),
                "sample": next(iter(group.members))}


def request_path(spool: Spool, study: str) -> Path:
    """Where ``dicomflow release STUDY`` puts its request."""
    return studies_dir(spool) / REQUESTS / f"{study}{REQUEST_SUFFIX}"
