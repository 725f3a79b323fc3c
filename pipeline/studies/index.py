"""The filter's index of waiting series and studies, and when each one is complete.

One *group* per (endpoint, Study Instance UID, Series Instance UID or "" at study level):
its files (names only, with their sending order), the aggregate of the endpoint's
conditions, and its first and last arrival on the **monotonic** clock (a wall-clock jump
neither releases nor holds a study). The index holds no header and is rebuilt from the
files in ``accepted/`` after a restart (arrival times from their names).

A group is complete (:func:`completion`) when an operator releases it, at ``max_wait``
after its first instance, or — with ``completion = mpps`` and an MPPS that names its
study (or series) — as soon as every such MPPS is finished and every instance they name
has arrived; with no MPPS, or when instances an MPPS names never come, at
``stable_time`` after its last instance. An MPPS still IN PROGRESS holds the group until
it finishes or ``max_wait``. Deadlines sit in a heap, so a step costs what is due, not
what is waiting (10,000 waiting studies cost nothing per arrival).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.rules import RuleSet
from pipeline.studies.levels import MPPS, SERIES, Aggregate, Facts, StudyPolicy
from pipeline.studies.records import GroupKey, Released

#: an Instance/Series Number that is missing or not a number sorts last
NO_NUMBER = 1 << 62
#: instances remembered of studies with no waiting group yet (for MPPS), and of how many
EARLY_INSTANCES, EARLY_STUDIES = 10_000, 1_000


class MppsStep(Protocol):
    """What the index reads of an MPPS record (pipeline.studies.mpps.MppsRecord)."""

    @property
    def uid(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def studies(self) -> frozenset[str]: ...

    @property
    def series(self) -> Mapping[str, frozenset[str]]: ...

    @property
    def finished(self) -> bool: ...


@dataclass(frozen=True)
class Member:
    """A file of a group: its name in ``accepted/`` and its place in the sending order."""

    name: str
    order: tuple[int, int, str]
    sop_instance_uid: str


@dataclass
class Group:
    key: GroupKey
    policy: StudyPolicy
    #: the endpoint's rules when the group began (its facts are answers to them)
    rules: RuleSet
    aggregate: Aggregate
    first: float                   # monotonic
    last: float
    first_wall: float
    last_wall: float
    members: dict[str, Member] = field(default_factory=dict)
    patients: set[str] = field(default_factory=set)
    #: ``late = reevaluate``: the decision this group's late instances are added to
    prior: Released | None = None
    forced: bool = False
    #: a member was found in ``accepted/`` after a restart: copies of a release cut short
    #: may exist, so its release looks for them (by name prefix)
    recovered: bool = False
    split_warned: bool = False

    @property
    def endpoint(self) -> str:
        return self.key[0]

    @property
    def study(self) -> str:
        return self.key[1]

    @property
    def series(self) -> str | None:
        return self.key[2] or None

    def deadline(self) -> float:
        return min(self.last + self.policy.stable_time, self.first + self.policy.max_wait)

    def ordered(self) -> list[Member]:
        return sorted(self.members.values(), key=lambda m: m.order)


def sort_order(series_number: object, instance_number: object, name: str) -> tuple[int, int, str]:
    return (_number(series_number), _number(instance_number), name)


def _number(value: object) -> int:
    try:
        return int(float(str(value).strip()))
    except (TypeError, ValueError, OverflowError):
        return NO_NUMBER


def patient_token(patient_id: object) -> str:
    """A short digest of the Patient ID: tells two patients apart, shows neither."""
    return hashlib.blake2b(str(patient_id or "").encode("utf-8", "replace"),
                           digest_size=8).hexdigest()


def completion(group: Group, now: float, steps: Sequence[MppsStep],
               arrived: set[str]) -> str | None:
    """Why ``group`` is complete at ``now`` (monotonic), or None while it waits."""
    policy = group.policy
    if group.forced:
        return "released by an operator"
    if now - group.first >= policy.max_wait:
        return f"max_wait ({policy.max_wait:g}s) reached"
    stable = now - group.last >= policy.stable_time
    if policy.completion == MPPS:
        relevant = [s for s in steps if (group.series in s.series if group.series
                                         else group.study in s.studies)]
        named = _named(relevant, group.series)
        if relevant and not named and all(s.finished for s in relevant):
            relevant = []  # finished, naming no instance: no help, stable_time decides
        if relevant:
            if not all(s.finished for s in relevant):
                return None
            missing = len(named - arrived)
            if not missing:
                states = "/".join(sorted({s.status for s in relevant}))
                return f"MPPS {states}, all {len(named)} instances it names arrived"
            if stable:
                return (f"stable for {policy.stable_time:g}s; its MPPS names {missing} "
                        f"instance(s) that did not arrive")
            return None
    return f"stable for {policy.stable_time:g}s" if stable else None


def mpps_state(group: Group, steps: Sequence[MppsStep], arrived: set[str]) -> str | None:
    """For status: none, in progress, completed, discontinued or missing instances."""
    if group.policy.completion != MPPS:
        return None
    relevant = [s for s in steps if (group.series in s.series if group.series
                                     else group.study in s.studies)]
    if not relevant:
        return None
    if not all(s.finished for s in relevant):
        return "in progress"
    named = _named(relevant, group.series)
    if not named:
        return None  # naming nothing, it does not decide: stable_time does
    if named - arrived:
        return "missing instances"
    return "completed" if any(s.status == "COMPLETED" for s in relevant) else "discontinued"


def _named(steps: Iterable[MppsStep], series: str | None) -> set[str]:
    named: set[str] = set()
    for step in steps:
        for series_uid, instances in step.series.items():
            if series is None or series_uid == series:
                named |= instances
    return named


class StudyIndex:
    """Waiting groups, the groups each file waits for, and the deadlines."""

    def __init__(self) -> None:
        self.groups: dict[GroupKey, Group] = {}
        self.waiting_for: dict[str, set[GroupKey]] = {}
        self.by_study: dict[str, set[GroupKey]] = {}
        #: per study with a waiting group: the SOP Instance UIDs arrived (for MPPS)
        self.arrived: dict[str, set[str]] = {}
        #: …and of the last studies seen without one (an instance no grouped endpoint
        #: takes may come first): bounded, merged when a group of the study begins
        self._early: OrderedDict[str, set[str]] = OrderedDict()
        self._heap: list[tuple[float, int, GroupKey]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, key: GroupKey, policy: StudyPolicy, rules: RuleSet, member: Member,
            facts: Facts, mono: float, wall: float, patient: str,
            prior: Released | None = None) -> Group:
        """File ``member`` joins the group ``key`` (created on its first instance)."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key, policy, rules, Aggregate.empty(len(facts)),
                                             mono, mono, wall, wall, prior=prior)
            self.by_study.setdefault(key[1], set()).add(key)
            early = self._early.pop(key[1], None)
            if early:
                self.arrived.setdefault(key[1], set()).update(early)
        if member.name not in group.members:
            group.members[member.name] = member
            group.aggregate.add(facts)
        group.first, group.last = min(group.first, mono), max(group.last, mono)
        group.first_wall, group.last_wall = min(group.first_wall, wall), max(group.last_wall, wall)
        group.patients.add(patient)
        self.waiting_for.setdefault(member.name, set()).add(key)
        self.saw(key[1], member.sop_instance_uid)
        heapq.heappush(self._heap, (group.deadline(), next(self._seq), key))
        return group

    def saw(self, study: str, sop_instance_uid: str) -> None:
        """An instance of ``study`` arrived (any endpoint's: an MPPS names them all)."""
        if study in self.by_study:
            self.arrived.setdefault(study, set()).add(sop_instance_uid)
            return
        seen = self._early.setdefault(study, set())
        self._early.move_to_end(study)
        if len(seen) < EARLY_INSTANCES:
            seen.add(sop_instance_uid)
        while len(self._early) > EARLY_STUDIES:
            self._early.popitem(last=False)

    def due(self, now: float, steps: Mapping[str, Sequence[MppsStep]]) -> list[tuple[Group, str]]:
        """The groups whose deadline passed and that are complete, with why."""
        found: list[tuple[Group, str]] = []
        while self._heap and self._heap[0][0] <= now:
            _, _, key = heapq.heappop(self._heap)
            group = self.groups.get(key)
            if group is None or any(g is group for g, _ in found):
                continue
            if group.deadline() > now:
                continue  # it grew: a later entry holds its new deadline
            why = self.completion(group, now, steps)
            if why is not None:
                found.append((group, why))
            else:  # held by an MPPS in progress: until max_wait
                heapq.heappush(self._heap, (group.first + group.policy.max_wait,
                                            next(self._seq), key))
        return found

    def check(self, studies: Iterable[str], now: float,
              steps: Mapping[str, Sequence[MppsStep]]) -> list[tuple[Group, str]]:
        """The complete groups of ``studies`` now (an MPPS changed, an operator asked)."""
        found = []
        for study in studies:
            for key in sorted(self.by_study.get(study, ())):
                group = self.groups[key]
                why = self.completion(group, now, steps)
                if why is not None:
                    found.append((group, why))
        return found

    def completion(self, group: Group, now: float,
                   steps: Mapping[str, Sequence[MppsStep]]) -> str | None:
        return completion(group, now, steps.get(group.study, ()),
                          self.arrived.get(group.study, set()))

    def force(self, study: str) -> bool:
        """Mark every group of ``study`` released by an operator (False: none waits)."""
        keys = self.by_study.get(study, set())
        for key in keys:
            self.groups[key].forced = True
        return bool(keys)

    def schedule(self, key: GroupKey, at: float) -> None:
        """Look at group ``key`` again at ``at`` (monotonic)."""
        heapq.heappush(self._heap, (at, next(self._seq), key))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def remove(self, key: GroupKey) -> list[str]:
        """Take a released group out; return its files that now wait for nothing."""
        group = self.groups.pop(key)
        keys = self.by_study.get(group.study)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_study[group.study]
                self.arrived.pop(group.study, None)
        done = []
        for name in group.members:
            pending = self.waiting_for.get(name)
            if pending is None:
                continue
            pending.discard(key)
            if not pending:
                del self.waiting_for[name]
                done.append(name)
        return done

    def waiting(self, name: str) -> bool:
        return name in self.waiting_for


def steps_by_study(steps: Iterable[MppsStep]) -> dict[str, list[MppsStep]]:
    found: dict[str, list[MppsStep]] = {}
    for step in steps:
        for study in step.studies:
            found.setdefault(study, []).append(step)
    return found


def level_key(endpoint: str, policy: StudyPolicy, study: str, series: str) -> GroupKey:
    return (endpoint, study, series if policy.level == SERIES else "")
