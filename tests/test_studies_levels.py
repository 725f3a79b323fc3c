"""Series/study-level rules: ``any`` / ``!=`` / ``all:`` over a group, policies in the config."""

from __future__ import annotations

import pytest

from pipeline.config import load
from pipeline.errors import ConfigError, RuleSyntaxError
from pipeline.rules import RuleSet, parse_condition, parse_conditions, parse_sop_list
from pipeline.studies.levels import Aggregate, decide_routing, instance_facts
from pipeline.studies.levels import StudyPolicy as Policy
from tests.helpers import make_dataset, write_conf


def _group(rules: RuleSet, *datasets) -> Aggregate:
    aggregate = Aggregate.empty(len(rules.conditions))
    for ds in datasets:
        facts = instance_facts(rules, ds)
        assert facts is not None
        aggregate.add(facts)
    return aggregate


def test_any_none_and_all_over_a_group():
    ct, sr = make_dataset(modality="CT"), make_dataset(modality="SR")
    rules = RuleSet(conditions=parse_conditions("Modality=CT"))
    assert _group(rules, ct, sr).why_not(rules) is None             # any instance
    assert _group(rules, sr, sr).why_not(rules) is not None
    none = RuleSet(conditions=parse_conditions("Modality!=SR"))
    assert _group(none, ct, sr).why_not(none) is not None           # no instance may match
    assert _group(none, ct, ct).why_not(none) is None
    every = RuleSet(conditions=parse_conditions("all:Modality=CT"))
    assert _group(every, ct, sr).why_not(every) is not None         # every instance
    assert _group(every, ct, ct).why_not(every) is None
    assert "does not hold for the 2 instances" in (_group(every, ct, sr).why_not(every) or "")


def test_all_prefix_is_parsed_and_changes_nothing_for_one_instance():
    condition = parse_condition("all: Modality = CT|MR")
    assert condition.every and condition.keyword == "Modality" and not condition.negate
    assert condition.holds(make_dataset(modality="MR"))
    assert not parse_condition("Modality=CT").every
    with pytest.raises(RuleSyntaxError):
        parse_condition("any:Modality=CT")


def test_conditions_of_several_attributes_aggregate_separately():
    """``any`` per condition: one series may satisfy one condition, another the other."""
    axial = make_dataset(modality="CT", SeriesDescription="AXIAL CHEST")
    scout = make_dataset(modality="CT", SeriesDescription="SCOUT", BodyPartExamined="CHEST")
    rules = RuleSet(conditions=parse_conditions("SeriesDescription=AXIAL.*\nBodyPartExamined=CHEST"))
    assert _group(rules, axial, scout).why_not(rules) is None
    assert _group(rules, axial).why_not(rules) is not None


def test_sop_lists_stay_per_instance():
    """An instance its SOP lists refuse never joins (and never counts for) the group."""
    rules = RuleSet(sop_blacklist=parse_sop_list("EncapsulatedPDFStorage"),
                    conditions=parse_conditions("all:Modality=CT"))
    pdf = make_dataset("1.2.840.10008.5.1.4.1.1.104.1", modality="DOC")
    assert instance_facts(rules, pdf) is None
    assert instance_facts(rules, make_dataset(modality="CT")) == (True,)


def test_routing_splits_instance_and_grouped_endpoints():
    rules = {"pacs": RuleSet(), "ai": RuleSet(conditions=parse_conditions("Modality=CT")),
             "mr": RuleSet(sop_whitelist=parse_sop_list("MRImageStorage"))}
    policies = {"ai": Policy(level="study"), "mr": Policy(level="series")}
    routing = decide_routing(RuleSet(), rules, policies, make_dataset(modality="SR"))
    assert routing.decision.endpoints == ("pacs",)
    assert routing.groups == {"ai": (False,)}      # may still go with its study
    assert routing.rejected is None
    alone = decide_routing(RuleSet(), {"mr": rules["mr"]}, policies, make_dataset(modality="CT"))
    assert alone.rejected is not None and "mr:" in alone.rejected
    refused = decide_routing(RuleSet(conditions=parse_conditions("Modality=MR")), rules, policies,
                             make_dataset(modality="CT"))
    assert refused.rejected is not None and refused.rejected.startswith("global rule")


def test_aggregate_round_trips_and_merges():
    a = Aggregate([True, False], [False, False], 3)
    b = Aggregate.from_json(a.as_json(), 3)
    assert b == a
    b.merge(Aggregate([False, True], [True, True], 2))
    assert b.any_matched == [True, True] and b.all_matched == [False, False] and b.count == 5
    assert Aggregate.from_json([[1, 2]]) is None and Aggregate.from_json("x") is None


def _endpoint_conf(tmp_path, filter_: dict, endpoint_extra: dict | None = None, router=None):
    endpoint = {"host": "127.0.0.1", "port": 104, "ae_title": "AI", **(endpoint_extra or {})}
    return write_conf(tmp_path, filter_=router, endpoints={"ai": {"endpoint": endpoint,
                                                                  "filter": filter_}})


def test_policy_from_the_configuration(tmp_path):
    conf = _endpoint_conf(tmp_path, {"level": "Study", "completion": "mpps", "late": "reevaluate",
                                     "stable_time": "2m"}, router={"max_wait": "3h"})
    policy = load(conf).endpoints["ai"].study
    assert policy == Policy("study", 120.0, "mpps", 3 * 3600.0, "reevaluate")
    assert load(_endpoint_conf(tmp_path / "b", {})).endpoints["ai"].study == Policy()
    default = load(_endpoint_conf(tmp_path / "c", {"level": "series"},
                                  router={"stable_time": "5s"})).endpoints["ai"].study
    assert (default.stable_time, default.max_wait) == (5.0, 3600.0)


@pytest.mark.parametrize(("filter_", "extra", "key", "text"), [
    ({"level": "patient"}, {}, "level", "expected instance or series or study"),
    ({"stable_time": "10s"}, {}, "stable_time", "only with level = series or study"),
    ({"completion": "mpps"}, {}, "completion", "only with level = series or study"),
    ({"level": "study", "completion": "worklist"}, {}, "completion", "stable or mpps"),
    ({"level": "study", "late": "drop"}, {}, "late", "follow or reevaluate"),
    ({"level": "study", "stable_time": "2h"}, {}, "max_wait", "shorter than stable_time"),
    ({"level": "series"}, {"associations": "4"}, "associations", "must be 1"),
])
def test_policy_mistakes_name_the_key(tmp_path, filter_, extra, key, text):
    with pytest.raises(ConfigError) as caught:
        load(_endpoint_conf(tmp_path, filter_, extra))
    assert f"{key}" in str(caught.value) and text in str(caught.value)


def test_check_prints_the_level(tmp_path, capsys):
    from services.check import check

    conf = _endpoint_conf(tmp_path, {"level": "series", "completion": "mpps"})
    assert check(load(conf)) == 0
    assert ("endpoint ai: decides per series, complete by mpps (stable_time 60s, max_wait "
            "3600s), late instances follow") in capsys.readouterr().out
