"""The study index: completion by stable time, max_wait, MPPS, operators; the records."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.rules import RuleSet, parse_conditions
from pipeline.spool import Spool
from pipeline.studies.index import Member, StudyIndex, completion, sort_order
from pipeline.studies.levels import Aggregate
from pipeline.studies.levels import StudyPolicy as Policy
from pipeline.studies.records import DECISION_MEMORY, DecisionBook, ReachedLog, Released

STUDY = Policy(level="study", stable_time=60.0, max_wait=3600.0)
RULES = RuleSet(conditions=parse_conditions("Modality=CT"))
MPPS = Policy(level="study", stable_time=60.0, completion="mpps", max_wait=3600.0)


@dataclass
class Step:
    uid: str
    status: str
    studies: frozenset[str]
    series: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in ("COMPLETED", "DISCONTINUED")


def _add(index: StudyIndex, name: str, at: float, policy=STUDY, study="1.2.3", sop=None,
         endpoint="ai", series=""):
    member = Member(name, sort_order(1, name[-1], name), sop or f"1.9.{name[-1]}")
    return index.add((endpoint, study, series), policy, RULES, member, (True,), at, 1000.0 + at, "p")


def test_a_study_is_due_stable_time_after_its_last_instance():
    index = StudyIndex()
    _add(index, "a1", 0.0)
    _add(index, "a2", 50.0)
    assert index.due(100.0, {}) == []
    assert index.next_due() is not None
    (group, why), = index.due(110.0, {})
    assert group.study == "1.2.3" and why == "stable for 60s"
    assert [m.name for m in group.ordered()] == ["a1", "a2"]
    assert sorted(index.remove(group.key)) == ["a1", "a2"] and not index.waiting("a1")


def test_a_study_that_keeps_growing_is_released_at_max_wait():
    index = StudyIndex()
    for minute in range(0, 70):
        _add(index, f"f{minute}", minute * 59.0)
        found = index.due(minute * 59.0 + 1, {})
        if found:
            break
    assert found and "max_wait" in found[0][1]
    assert 3600 <= minute * 59.0 + 1 < 3600 + 60


def test_the_clock_is_monotonic_only():
    """Arrival times are the monotonic clock's: the wall time of an arrival plays no part."""
    index = StudyIndex()
    member = Member("x", sort_order(None, None, "x"), "1.1")
    index.add(("ai", "1.2", ""), STUDY, RuleSet(), member, (), 5.0, 9e9, "p")   # wall clock jumped far ahead
    assert index.due(64.0, {}) == [] and index.due(65.0, {})


def test_mpps_completes_a_study_once_every_instance_it_names_arrived():
    index = StudyIndex()
    _add(index, "a1", 0.0, MPPS, sop="1.9.1")
    steps = {"1.2.3": [Step("5.1", "IN PROGRESS", frozenset({"1.2.3"}),
                            {"1.4": frozenset({"1.9.1", "1.9.2"})})]}
    assert index.check(["1.2.3"], 1.0, steps) == []
    steps["1.2.3"][0].status = "COMPLETED"
    assert index.check(["1.2.3"], 2.0, steps) == []   # 1.9.2 has not arrived
    _add(index, "a2", 3.0, MPPS, sop="1.9.2")
    (group, why), = index.check(["1.2.3"], 3.5, steps)
    assert why == "MPPS COMPLETED, all 2 instances it names arrived"


def test_mpps_naming_instances_that_never_come_falls_back_to_stable_time():
    index = StudyIndex()
    _add(index, "a1", 0.0, MPPS, sop="1.9.1")
    steps = {"1.2.3": [Step("5.1", "DISCONTINUED", frozenset({"1.2.3"}),
                            {"1.4": frozenset({"1.9.1", "1.9.7"})})]}
    assert index.check(["1.2.3"], 10.0, steps) == []
    (group, why), = index.due(61.0, steps)
    assert "1 instance(s) that did not arrive" in why


def test_an_mpps_in_progress_holds_until_max_wait():
    index = StudyIndex()
    _add(index, "a1", 0.0, MPPS)
    steps = {"1.2.3": [Step("5.1", "IN PROGRESS", frozenset({"1.2.3"}))]}
    assert index.due(61.0, steps) == []
    assert "max_wait" in index.due(3600.0, steps)[0][1]


def test_series_level_mpps_looks_at_its_series_only():
    policy = Policy(level="series", completion="mpps")
    index = StudyIndex()
    group = _add(index, "a1", 0.0, policy, sop="1.9.1", series="1.4")
    step = Step("5.1", "COMPLETED", frozenset({"1.2.3"}),
                {"1.4": frozenset({"1.9.1"}), "1.5": frozenset({"1.9.8"})})
    assert completion(group, 1.0, [step], {"1.9.1"}) == "MPPS COMPLETED, all 1 instances it names arrived"


def test_an_operator_release_and_two_endpoints_holding_one_file():
    index = StudyIndex()
    _add(index, "a1", 0.0, endpoint="ai")
    _add(index, "a1", 0.0, endpoint="archive")
    assert index.force("1.2.3") and not index.force("9.9")
    found = index.check(["1.2.3"], 1.0, {})
    assert {g.endpoint for g, _ in found} == {"ai", "archive"}
    assert all(why == "released by an operator" for _, why in found)
    assert index.remove(("ai", "1.2.3", "")) == []            # still held by archive
    assert index.remove(("archive", "1.2.3", "")) == ["a1"]


def test_sort_order_series_then_instance_then_name():
    names = [("2", "1", "c"), ("1", "10", "b"), ("1", "2", "a"), (None, "x", "d")]
    ordered = sorted(names, key=lambda t: sort_order(*t))
    assert ordered == [("1", "2", "a"), ("1", "10", "b"), ("2", "1", "c"), (None, "x", "d")]


def test_reached_log_survives_a_torn_line_and_compacts(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    log = ReachedLog(spool)
    log.add("f1", "pacs")
    log.add("f1", "ai")
    log.add("f2", "pacs")
    log.sync()
    log.close()
    with open(log._log.path, "ab") as torn:
        torn.write(b"f3\tpa")                       # a kill -9 mid-append
    again = ReachedLog(spool)
    again.load()
    assert again.of("f1") == {"pacs", "ai"} and again.of("f3") == set()
    again.compact({"f2"})
    third = ReachedLog(spool)
    third.load()
    assert third.reached == {"f2": {"pacs"}}


def test_decisions_persist_and_old_ones_are_forgotten(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    book = DecisionBook(spool)
    book.load(now=1e9)
    aggregate = Aggregate([True], [False], 4)
    book.record(Released(("ai", "1.2", ""), True, 1e9, 4, "stable", ("Modality=CT",), aggregate))
    book.record(Released(("ai", "1.3", "1.3.1"), False, 1e9 - DECISION_MEMORY - 1, 1, "no", (), None))
    book.close()
    again = DecisionBook(spool)
    again.load(now=1e9 + 10)
    decision = again.get(("ai", "1.2", ""))
    assert decision is not None and decision.send and decision.aggregate == aggregate
    assert again.get(("ai", "1.3", "1.3.1")) is None
    assert [r.key for r in again.recent()] == [("ai", "1.2", "")]


def test_logs_are_worth_compacting_only_when_mostly_dead(tmp_path, monkeypatch):
    from pipeline.studies import records

    monkeypatch.setattr(records, "COMPACT_AFTER", 10)
    spool = Spool(tmp_path / "spool").create()
    log = ReachedLog(spool)
    for index in range(30):
        log.add(f"f{index}", "pacs")
    assert not log.worth_compacting()          # all 30 still waiting
    for index in range(25):
        log.forget(f"f{index}")
    assert log.worth_compacting()
    log.compact({"f27"})
    assert not log.worth_compacting() and log.reached == {"f27": {"pacs"}}


def test_hostile_study_lists_are_set_aside_not_raised(tmp_path):
    from pipeline.studies import queue

    spool = Spool(tmp_path / "spool").create(["ai"])
    directory = queue.list_dir(spool, "ai")
    (directory / "20261203T000000.000000-000001.study").write_text("[" * 100000)
    huge = "1" + "0" * 400
    (directory / "20261203T000000.000000-000002.study").write_text(
        f'{{"version":1,"endpoint":"ai","study":"1.2","series":null,"level":"study",'
        f'"released":{huge},"prefixes":[]}}')
    assert queue.load(spool, "ai") == []
    assert sorted(p.name for p in directory.iterdir() if p.name.endswith(".bad")) == [
        "20261203T000000.000000-000001.study.bad", "20261203T000000.000000-000002.study.bad"]


def test_status_survives_a_hostile_state_file(tmp_path):
    from pipeline.config import load
    from services import status
    from tests.helpers import write_conf

    conf = write_conf(tmp_path, endpoints={"ai": {
        "endpoint": {"host": "127.0.0.1", "port": 104, "ae_title": "AI"},
        "filter": {"level": "study"}}})
    config = load(conf)
    spool = Spool(config.spool).create(["ai"])
    studies = spool.run_dir / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    huge = "1" + "0" * 400
    (studies / "state.json").write_text(
        f'{{"version":1,"written":{huge},"pid":1,"waiting":[{{"endpoint":"ai","level":"study",'
        f'"study":"1.2","series":null,"instances":1,"first_arrival":{huge},'
        f'"last_arrival":{huge},"completion":"stable","mpps":null,"release_at":{huge},'
        f'"sample":"x"}}],"released":[]}}')
    report = status.collect(config)
    assert "studies" in report["endpoints"]["ai"]
    (studies / "state.json").write_text("[" * 100000)
    assert status.collect(config)["studies_state"] == "unavailable"
