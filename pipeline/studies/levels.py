"""Deciding at series or study level: an endpoint's policy, per-instance facts, aggregates.

An endpoint with ``[filter] level = series | study`` decides once the whole series/study
has arrived. Its SOP Class lists (and the global rules) stay per instance: an instance
they refuse never joins the group, never counts, is never sent there. Its conditions are
evaluated over the group (:meth:`pipeline.rules.Condition.holds_over`): ``=`` when *any*
instance matches, ``!=`` when *none* does, ``all:`` when *every* one does.

The index keeps no header: per instance only whether each condition matched
(:data:`Facts`), folded into two bits per condition (:class:`Aggregate`), which is what
makes 10,000 waiting studies cheap and lets a late instance be decided again on what
was already released (``late = reevaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from pipeline.rules import Decision, RuleSet, decide, sop_class_of

INSTANCE, SERIES, STUDY = "instance", "series", "study"
LEVELS = (INSTANCE, SERIES, STUDY)
STABLE, MPPS = "stable", "mpps"
COMPLETIONS = (STABLE, MPPS)
FOLLOW, REEVALUATE = "follow", "reevaluate"
LATE_POLICIES = (FOLLOW, REEVALUATE)

#: per condition of an endpoint: did this instance match it (before ``!=`` negates)?
Facts = tuple[bool, ...]


@dataclass(frozen=True)
class StudyPolicy:
    """How one endpoint decides: per instance (the default) or per series/study."""

    level: str = INSTANCE
    #: complete when no instance of the group arrived for this long (monotonic clock)
    stable_time: float = 60.0
    #: ``mpps``: complete as soon as its MPPS is finished and every instance it names came
    completion: str = STABLE
    #: released as it is this long after its first instance, however it keeps growing
    max_wait: float = 3600.0
    #: an instance of a group already released: same decision (follow) or decided again
    late: str = FOLLOW

    @property
    def grouped(self) -> bool:
        return self.level != INSTANCE


INSTANCE_POLICY = StudyPolicy()


def instance_facts(rules: RuleSet, ds: Dataset) -> Facts | None:
    """The facts of one instance for a grouped endpoint; None when its SOP lists refuse it."""
    sop_class = sop_class_of(ds)
    if sop_class in rules.sop_blacklist:
        return None
    if rules.sop_whitelist and sop_class not in rules.sop_whitelist:
        return None
    return tuple(condition.matches(ds) for condition in rules.conditions)


@dataclass
class Aggregate:
    """The conditions of one endpoint over a group: per condition, any and all matched."""

    any_matched: list[bool]
    all_matched: list[bool]
    count: int = 0

    @classmethod
    def empty(cls, size: int) -> Aggregate:
        return cls([False] * size, [True] * size)

    def add(self, facts: Facts) -> None:
        if len(facts) != len(self.any_matched):  # the conditions changed (a reload)
            raise ValueError("facts of another rule set")
        for i, matched in enumerate(facts):
            self.any_matched[i] = self.any_matched[i] or matched
            self.all_matched[i] = self.all_matched[i] and matched
        self.count += 1

    def merge(self, other: Aggregate) -> None:
        for i in range(len(self.any_matched)):
            self.any_matched[i] = self.any_matched[i] or other.any_matched[i]
            self.all_matched[i] = self.all_matched[i] and other.all_matched[i]
        self.count += other.count

    def why_not(self, rules: RuleSet) -> str | None:
        """None if the group passes the endpoint's conditions, else the one that fails."""
        for i, condition in enumerate(rules.conditions):
            if not condition.holds_over(self.any_matched[i], self.all_matched[i]):
                return f"condition {condition.source!r} does not hold for the {self.count} instances"
        return None

    def as_json(self) -> list[list[bool]]:
        return [[a, b] for a, b in zip(self.any_matched, self.all_matched, strict=True)]

    @classmethod
    def from_json(cls, value: object, count: int = 0) -> Aggregate | None:
        if not isinstance(value, list) or not all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(b, bool) for b in pair)
                for pair in value):
            return None
        return cls([p[0] for p in value], [p[1] for p in value], count)


@dataclass(frozen=True)
class Routing:
    """Where one instance goes now, and which grouped endpoints it waits for.

    ``decision`` covers the instance-level endpoints (``rejected`` only when no endpoint
    at all, grouped ones included, may take the file); ``groups`` maps each grouped
    endpoint whose SOP lists accept the instance to its facts."""

    decision: Decision
    groups: dict[str, Facts] = field(default_factory=dict)

    @property
    def rejected(self) -> str | None:
        return None if self.groups else self.decision.rejected


def decide_routing(global_rules: RuleSet, rules: dict[str, RuleSet],
                   policies: dict[str, StudyPolicy], ds: Dataset) -> Routing:
    """The global rules, the instance-level endpoints' rules, the grouped ones' facts."""
    instance_rules = {name: r for name, r in rules.items()
                      if not policies.get(name, INSTANCE_POLICY).grouped}
    decision = decide(global_rules, instance_rules, ds)
    if decision.rejected is not None and decision.rejected.startswith("global rule"):
        return Routing(decision)
    groups: dict[str, Facts] = {}
    refusals = dict(decision.refusals)
    for name in sorted(rules):
        if name in instance_rules:
            continue
        facts = instance_facts(rules[name], ds)
        if facts is None:
            refusals[name] = rules[name].why_not(ds) or "refused by its SOP lists"
        else:
            groups[name] = facts
    if groups or not decision.rejected:
        return Routing(decision, groups)
    details = "; ".join(f"{name}: {why}" for name, why in sorted(refusals.items()))
    return Routing(Decision((), f"no endpoint matched ({details})", refusals), groups)
