"""``dicomflow trace``: an instance's and a study's story from a synthetic journal and a
real spool folder (issue 18); the real command as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.spool_names import SpoolName
from services import trace
from tests.helpers import make_dataset, run_cli, write_dataset
from tests.journal_kit import Arrival, damage, journal, make_spool, put

STUDY = "1.2.5.100"


def story(tmp_path: Path, phi: bool = False):
    """Two images of one study: routed to pacs (one try failed first) and de-identified
    for research; ai refused by its rule."""
    conf, spool = make_spool(tmp_path, phi=phi)
    j = journal(spool, phi=phi)
    first, second = Arrival.new("1.2.5.1", STUDY), Arrival.new("1.2.5.2", STUDY)
    for n, arrival in enumerate((first, second), 1):
        copy_uid = f"2.25.77{n}"
        arrival.received(j)
        arrival.routed(j, ["pacs", "research"], refused={"ai": "Modality == MR"})
        j.record("shaped", uid=arrival.uid, file=arrival.copy(copy_uid), endpoint="research",
                 copy_uid=copy_uid, shaping=["coerce", "deidentify"])
        j.record("attempt", uid=arrival.uid, file=arrival.file, endpoint="pacs", status=0xA700,
                 reason="out of resources", attempt=1, retry_in=30)
        arrival.sent(j, "pacs")
        put(spool, "sent/pacs", arrival.file)
        put(spool, "outbox/research", arrival.copy(copy_uid))
    j.flush()
    j.close()
    return conf, spool, first, second


def test_an_instance_from_arrival_to_now(tmp_path: Path) -> None:
    _, spool, first, _ = story(tmp_path)
    query, instances, warning = trace.trace(spool, first.uid)
    assert (query.by, warning) == ("instance", "")
    [inst] = instances
    assert inst.uid == first.uid and inst.uids == {first.uid, "2.25.771"}
    assert [e.kind for e in inst.events] == ["received", "routed", "shaped", "attempt", "sent"]
    now = {(o.endpoint, o.state, o.where) for o in trace.now_of(inst)}
    assert now == {("pacs", "delivered", f"sent/pacs/{first.file}"),
                   ("research", "queued", f"outbox/research/{first.copy('2.25.771')}")}
    text = trace.render(query, instances)
    assert "from CT1 (127.0.0.1:40000) to DICOMFLOW" in text
    assert "refused: ai (Modality == MR)" in text
    assert "pacs: status 0xA700, out of resources, try 1, retry in 30 s" in text
    assert "research: coerce, deidentify -> 2.25.771" in text


def test_the_copy_uid_and_a_file_lead_to_the_same_instance(tmp_path: Path) -> None:
    _, spool, first, _ = story(tmp_path)
    by_copy = trace.trace(spool, "2.25.771")[1]
    assert [i.uid for i in by_copy] == [first.uid]
    path = spool.root / "outbox" / "research" / first.copy("2.25.771")
    by_file = trace.trace(spool, str(path))[1]
    assert [i.uid for i in by_file] == [first.uid]


def test_a_copy_uid_leads_to_its_arrival_once_the_spool_holds_no_copy(tmp_path: Path) -> None:
    """A de-identified copy's own events name only its new UID; once retention pruned
    every copy, the journal's file names (one prefix per arrival) still link them."""
    conf, spool = make_spool(tmp_path)
    j = journal(spool)
    arrival = Arrival.new("1.2.5.7", STUDY)
    arrival.received(j)
    arrival.routed(j, ["research"])
    j.record("shaped", uid=arrival.uid, file=arrival.copy("2.25.778"), endpoint="research",
             copy_uid="2.25.778", shaping=["deidentify"])
    arrival.sent(j, "research", uid="2.25.778")
    j.about("deleted", arrival.copy("2.25.778"), endpoint="research", why="sent_retention")
    j.flush()
    j.close()
    [inst] = trace.trace(spool, "2.25.778")[1]
    assert inst.uid == arrival.uid and inst.places == []
    assert [e.kind for e in inst.events] == ["received", "routed", "shaped", "sent", "deleted"]
    assert [(o.endpoint, o.state) for o in trace.now_of(inst)] == [("research", "delivered")]


def test_a_file_without_a_spool_name_is_read_for_its_uid(tmp_path: Path) -> None:
    _, spool, first, _ = story(tmp_path)
    ds = make_dataset(study_uid=STUDY)
    ds.SOPInstanceUID = first.uid
    ds.file_meta.MediaStorageSOPInstanceUID = first.uid
    path = write_dataset(ds, tmp_path / "export" / "IMG0001")
    assert [i.uid for i in trace.trace(spool, str(path))[1]] == [first.uid]


def test_a_study_and_a_copy_found_only_by_its_prefix(tmp_path: Path) -> None:
    conf, spool, first, second = story(tmp_path)
    lost = Arrival.new("1.2.5.3", STUDY)  # its shaped and sent events lost in a crash
    j = journal(spool)
    lost.received(j)
    lost.routed(j, ["research"])
    j.flush()
    j.close()
    put(spool, "sent/research", lost.copy("2.25.999"))
    query, instances, _ = trace.trace(spool, STUDY)
    assert query.by == "study"
    assert [i.uid for i in instances] == [first.uid, second.uid, lost.uid]
    assert "2.25.999" in instances[2].uids
    assert [(o.endpoint, o.state) for o in trace.now_of(instances[2])] == [("research", "delivered")]
    result = run_cli(conf, "trace", STUDY, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["query"] == {"by": "study", "value": STUDY}
    assert [i["uid"] for i in report["instances"]] == [first.uid, second.uid, lost.uid]
    assert report["instances"][0]["now"][0] == {"endpoint": "pacs", "state": "delivered",
                                                "where": f"sent/pacs/{first.file}", "reason": None}
    text = run_cli(conf, "trace", STUDY).stdout
    assert "trace of study" in text and "3 arrival(s)" in text


def test_nothing_known_and_usage_errors(tmp_path: Path) -> None:
    conf, spool, _, _ = story(tmp_path)
    unknown = run_cli(conf, "trace", "1.2.5.404")
    assert unknown.returncode == 1 and "nothing known about 1.2.5.404" in unknown.stderr
    assert run_cli(conf, "trace", "not a uid").returncode == 2
    assert run_cli(conf, "trace").returncode == 2
    phi = run_cli(conf, "trace", "--patient-id", "PID-SECRET")
    assert phi.returncode == 2 and "journal_phi = true" in phi.stderr


def test_only_the_spool_when_there_is_no_journal(tmp_path: Path) -> None:
    conf, spool = make_spool(tmp_path)
    name = SpoolName.new("1.2.5.50")
    put(spool, "failed/pacs", str(name), reason="0x0110 processing failure")
    result = run_cli(conf, "trace", "1.2.5.50")
    assert result.returncode == 0, result.stderr
    assert "no journal" in result.stderr
    assert "failed       failed/pacs/" in result.stdout and "0x0110 processing failure" in result.stdout
    assert not (spool.run_dir / "journal.sqlite").exists()


def test_by_patient_id_with_journal_phi(tmp_path: Path) -> None:
    conf, spool, first, second = story(tmp_path, phi=True)
    result = run_cli(conf, "trace", "--patient-id", "PID-SECRET", "--json")
    assert result.returncode == 0, result.stderr
    assert "PID-SECRET" not in result.stdout and "ACC-SECRET" not in result.stdout
    report = json.loads(result.stdout)
    assert sorted(i["uid"] for i in report["instances"]) == [first.uid, second.uid]
    nobody = run_cli(conf, "trace", "--accession", "ACC-OTHER")
    assert nobody.returncode == 1


def test_a_damaged_journal_is_said_and_the_spool_still_answers(tmp_path: Path) -> None:
    conf, spool, first, _ = story(tmp_path)
    j = journal(spool)
    for n in range(2000):  # pages enough to damage all but the schema's
        j.record("received", uid=f"1.2.6.{n}", file=str(SpoolName.new(f"1.2.6.{n}")))
    j.flush()
    j.close()
    damage(spool)
    query, instances, warning = trace.trace(spool, first.uid)
    assert "the journal cannot be read" in warning and "showing the spool alone" in warning
    [inst] = instances
    assert inst.events == [] and {p.relative for p in inst.places} == {
        f"sent/pacs/{first.file}", f"outbox/research/{first.copy('2.25.771')}"}
    result = run_cli(conf, "trace", first.uid)
    assert result.returncode == 0 and "cannot be read" in result.stderr, result.stderr
