"""The foreign senders' bookkeeping (tests/foreign.py) without a network: how a
one-association sender's calls are repeated until every file has its own outcome.

The wrappers themselves run against real peers in test_interop_senders.py."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.foreign import Call, Outcome, _batches, _in_calls, _run
from tests.helpers import make_dataset, write_dataset

FILES = [Path(f"f{i}.dcm") for i in range(5)]


class FakeTool:
    """A one-association sender: ``breaks`` end the association when sent (no status,
    and nothing after them is reported); ``refused`` get a failure status;
    ``unreadable`` are never sent. Records every call."""

    def __init__(self, breaks=(), refused=(), unreadable=(), stops_at_unreadable=False) -> None:
        self.breaks, self.refused, self.unreadable = set(breaks), set(refused), set(unreadable)
        self.stops_at_unreadable = stops_at_unreadable
        self.calls: list[list[Path]] = []

    def __call__(self, files: list[Path]) -> Call:
        self.calls.append(list(files))
        bad = {p: Outcome(p, False, None, "cannot read") for p in files if p in self.unreadable}
        if bad and self.stops_at_unreadable:
            first = next(iter(bad))
            return Call({}, {first: bad[first]}, "", associated=False)
        said: dict[Path, Outcome] = {}
        for path in (p for p in files if p not in bad):
            if path in self.breaks:
                said[path] = Outcome(path, False, None, "association aborted")
                break
            status = 0xC000 if path in self.refused else 0
            said[path] = Outcome(path, status == 0, status)
        return Call(said, bad, "last error")


def sent(tool: FakeTool) -> list[Path]:
    return [p for call in tool.calls for p in call]


def test_a_file_that_ends_the_association_is_failed_and_the_rest_go_on_a_new_one() -> None:
    tool = FakeTool(breaks={FILES[2]})
    outcomes = _in_calls(FILES, tool)
    assert [o.ok for o in outcomes] == [True, True, False, True, True]
    # f2 is confirmed as the first file of a fresh association before it counts
    assert tool.calls == [FILES, FILES[2:], FILES[3:]]
    assert outcomes[2].detail == "association aborted"


def test_the_tool_as_it_is_makes_one_call_and_every_file_after_a_break_fails() -> None:
    tool = FakeTool(breaks={FILES[2]})
    outcomes = _in_calls(FILES, tool, confirm=False)
    assert [o.ok for o in outcomes] == [True, True, False, False, False]
    assert tool.calls == [FILES]
    assert [o.detail for o in outcomes[2:]] == ["association aborted", "last error", "last error"]


def test_a_failure_status_is_final_and_nothing_is_sent_twice() -> None:
    tool = FakeTool(refused={FILES[1], FILES[3]})
    outcomes = _in_calls(FILES, tool)
    assert [o.status for o in outcomes] == [0, 0xC000, 0, 0xC000, 0]
    assert tool.calls == [FILES]


def test_unreadable_files_are_reported_and_not_sent_again() -> None:
    tool = FakeTool(unreadable={FILES[0], FILES[3]}, stops_at_unreadable=True)
    outcomes = _in_calls(FILES, tool)
    assert [o.ok for o in outcomes] == [False, True, True, False, True]
    assert [o.detail for o in outcomes if not o.ok] == ["cannot read", "cannot read"]
    assert sent(tool).count(FILES[1]) == 3  # two calls ended before associating
    assert len(tool.calls) == 3


def test_a_peer_that_ends_every_association_gets_each_file_once_as_the_first() -> None:
    tool = FakeTool(breaks=set(FILES))
    outcomes = _in_calls(FILES, tool)
    assert not any(o.ok for o in outcomes)
    assert tool.calls == [FILES[i:] for i in range(5)]


def test_an_unreported_file_takes_the_call_s_last_error() -> None:
    def silent(files: list[Path]) -> Call:
        return Call({}, {}, "killed after 60s")
    outcomes = _in_calls(FILES[:2], silent)
    assert [o.detail for o in outcomes] == ["killed after 60s"] * 2


def test_a_tool_that_hangs_is_killed_and_what_it_printed_counts() -> None:
    result = _run(["sh", "-c", "echo STATUS 0 f0.dcm; sleep 60"], timeout=1.0)
    assert result.returncode == -9
    assert "STATUS 0 f0.dcm" in result.stdout
    assert "killed after 1s" in result.stderr


def test_batches_give_each_sop_class_one_transfer_syntax(tmp_path: Path) -> None:
    def image(name: str, syntax: str, sop_class: str = "1.2.840.10008.5.1.4.1.1.2") -> Path:
        ds = make_dataset()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.TransferSyntaxUID = syntax
        return write_dataset(ds, tmp_path / name)

    ct_explicit, ct_implicit = image("a", ExplicitVRLittleEndian), image("b", ImplicitVRLittleEndian)
    mr_big = image("c", ExplicitVRBigEndian, "1.2.840.10008.5.1.4.1.1.4")
    ct_explicit_2, junk = image("d", ExplicitVRLittleEndian), tmp_path / "junk"
    junk.write_bytes(b"not DICOM")
    assert _batches([ct_explicit, ct_implicit, mr_big, ct_explicit_2, junk]) == [
        [ct_explicit, mr_big, ct_explicit_2, junk], [ct_implicit]]
