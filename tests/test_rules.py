"""Rule parsing and evaluation (README, Design notes: fullmatch, case-sensitive, any-of, deny wins)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pipeline.rules import (
    RuleSet,
    RuleSyntaxError,
    decide,
    parse_condition,
    parse_conditions,
    parse_sop_list,
    resolve_sop_class,
)
from tests.helpers import make_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def holds(text: str, ds: Dataset) -> bool:
    return parse_condition(text).holds(ds)


@pytest.fixture
def ct() -> Dataset:
    ds = make_dataset(modality="CT", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], StationName="CT01")
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY1"
    ds.file_meta.SendingApplicationEntityTitle = "MODALITY1"
    ds.file_meta.ReceivingApplicationEntityTitle = "DICOMFLOW"
    return ds


def test_equals_is_a_full_match(ct):
    assert holds("Modality=CT", ct)
    assert holds("Modality=C.", ct)
    assert not holds("Modality=C", ct)          # no prefix match
    assert not holds("StationName=CT", ct)      # no search
    assert holds("Modality=CT|MR", ct)


def test_case_sensitive(ct):
    assert not holds("Modality=ct", ct)
    assert holds("Modality=(?i)ct", ct)


def test_multi_valued_matches_if_any_value_does(ct):
    assert holds("ImageType=AXIAL", ct)
    assert not holds("ImageType=LOCALIZER", ct)
    assert not holds("ImageType!=AXIAL", ct)
    assert holds("ImageType!=LOCALIZER", ct)


def test_missing_attribute(ct):
    assert "BodyPartExamined" not in ct
    assert not holds("BodyPartExamined=.*", ct)   # = never matches a missing attribute
    assert holds("BodyPartExamined!=HEAD", ct)    # != holds when missing
    assert holds("BodyPartExamined!=.*", ct)


def test_not_equals(ct):
    assert not holds("Modality!=CT", ct)
    assert holds("Modality!=MR", ct)


def test_tags_in_parentheses(ct):
    assert holds("(0008,0060)=CT", ct)
    assert holds("(0008,0060) != MR", ct)
    assert holds("(0002,0016)=MODALITY1", ct)     # a file meta tag
    assert not holds("(0009,0010)=X", ct)         # a missing private tag


def test_calling_and_called_ae_titles_come_from_the_file_meta(ct):
    assert holds("CallingAETitle=MODALITY1", ct)
    assert holds("CallingAETitle!=TEST.*", ct)
    assert holds("CalledAETitle=DICOMFLOW", ct)
    bare = make_dataset()
    assert not holds("CallingAETitle=.*", bare)
    assert holds("CallingAETitle!=MODALITY1", bare)


def test_calling_ae_title_falls_back_to_sending_ae_title():
    ds = make_dataset()
    ds.file_meta.SendingApplicationEntityTitle = "SENDER  "
    assert holds("CallingAETitle=SENDER", ds)


def test_sequences_never_match_equals():
    ds = make_dataset()
    ds.ReferencedStudySequence = [Dataset()]
    assert not holds("ReferencedStudySequence=.*", ds)


@pytest.mark.parametrize("text", ["Modality", "=CT", "NotAKeyword=1", "Modality=(", "(12,34)=1"])
def test_bad_conditions(text):
    with pytest.raises(RuleSyntaxError):
        parse_condition(text)


def test_conditions_are_one_per_line_and_may_contain_commas():
    conditions = parse_conditions("Modality=CT|MR\n\n  StudyDescription=a,b  \n")
    assert [c.source for c in conditions] == ["Modality=CT|MR", "StudyDescription=a,b"]


def test_sop_lists_take_keywords_and_uids():
    assert parse_sop_list("CTImageStorage, 1.2.840.10008.5.1.4.1.1.4") == {CT, MR}
    assert parse_sop_list("") == frozenset()
    assert resolve_sop_class("EncapsulatedPDFStorage") == "1.2.840.10008.5.1.4.1.1.104.1"
    with pytest.raises(RuleSyntaxError):
        parse_sop_list("CTImageStorag")


def test_whitelist_blacklist_and_deny_wins(ct):
    assert RuleSet().why_not(ct) is None
    assert RuleSet(sop_whitelist=frozenset({CT})).why_not(ct) is None
    assert "sop_whitelist" in RuleSet(sop_whitelist=frozenset({MR})).why_not(ct)
    assert "sop_blacklist" in RuleSet(sop_blacklist=frozenset({CT})).why_not(ct)
    both = RuleSet(sop_whitelist=frozenset({CT}), sop_blacklist=frozenset({CT}))
    assert "sop_blacklist" in both.why_not(ct)


def test_all_conditions_must_hold(ct):
    rules = RuleSet(conditions=parse_conditions("Modality=CT\nStationName=CT02"))
    assert rules.why_not(ct) == "condition 'StationName=CT02' does not hold"


def test_decide(ct):
    endpoints = {
        "pacs": RuleSet(),
        "mr_only": RuleSet(conditions=parse_conditions("Modality=MR")),
        "research": RuleSet(sop_whitelist=frozenset({CT})),
    }
    decision = decide(RuleSet(), endpoints, ct)
    assert decision.endpoints == ("pacs", "research")
    assert decision.rejected is None
    assert "Modality=MR" in decision.refusals["mr_only"]

    rejected = decide(RuleSet(sop_blacklist=frozenset({CT})), endpoints, ct)
    assert rejected.endpoints == () and rejected.rejected.startswith("global rule: sop_blacklist")

    nobody = decide(RuleSet(), {"mr_only": endpoints["mr_only"]}, ct)
    assert nobody.rejected.startswith("no endpoint matched (mr_only: condition 'Modality=MR'")
    assert decide(RuleSet(), {}, ct).rejected.startswith("no endpoint matched")
