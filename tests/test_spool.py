"""The spool: atomic hand-offs, names, modes, listing."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from pipeline.errors import SpoolError
from pipeline.spool import (
    DIR_MODE,
    FILE_MODE,
    Spool,
    arrived_at,
    rename_noreplace,
    sidecar_path,
)
from pipeline.spool_names import SpoolName, is_standard


def make_name(uid: str | None, now: float | None = None) -> str:
    return str(SpoolName.new(uid, now))


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").create(["pacs", "archive"])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_create_makes_every_stage_0700(spool: Spool) -> None:
    for stage in ("incoming", "accepted", "outbox", "sent", "failed", "rejected", "quarantine", "run"):
        assert mode(spool.root / stage) == DIR_MODE, stage
    for directory in (spool.outbox("pacs"), spool.sent("archive"), spool.failed("pacs"),
                      spool.incoming / ".tmp"):
        assert mode(directory) == DIR_MODE
    assert (spool.run_dir / "VERSION").read_text().strip() == "1"


def test_create_tightens_nothing_it_did_not_create_but_is_idempotent(spool: Spool) -> None:
    Spool(spool.root).create(["pacs"])
    assert spool.endpoints() == ["archive", "pacs"]


def test_one_endpoint_lister_for_every_per_endpoint_stage(spool: Spool) -> None:
    (spool.stage("sent") / "not an endpoint!").mkdir()
    (spool.stage("outbox") / "stray.dcm").write_bytes(b"x")
    assert spool.endpoints("sent") == spool.endpoints("failed") == ["archive", "pacs"]
    assert spool.endpoints() == ["archive", "pacs"]
    with pytest.raises(SpoolError):
        spool.endpoints("incoming")
    with pytest.raises(SpoolError):
        spool.stage("elsewhere")
    assert Spool(spool.root / "missing").endpoints() == []


def test_other_format_version_is_refused(spool: Spool) -> None:
    (spool.run_dir / "VERSION").write_text("99\n")
    with pytest.raises(SpoolError, match="format version"):
        Spool(spool.root).create()


def test_names_sort_in_arrival_order_and_carry_the_uid() -> None:
    names = [make_name("1.2.3", now=1_800_000_000.0 + i * 0.000001) for i in range(50)]
    assert names == sorted(names)
    assert names[0].endswith("-1.2.3.dcm")
    assert len(set(names)) == 50


def test_a_name_parses_back_to_what_formatted_it() -> None:
    name = SpoolName.new("1.2.840.3", now=1_800_000_000.25)
    text = str(name)
    assert text.startswith("20270115T080000.250000-") and text.endswith("-1.2.840.3.dcm")
    parsed = SpoolName.parse(text)
    assert parsed == name and str(parsed) == text
    assert parsed.timestamp == 1_800_000_000.25 and parsed.uid == "1.2.840.3"
    assert text == f"{parsed.prefix}-1.2.840.3.dcm" and len(parsed.prefix) == 29
    assert SpoolName.parse(str(SpoolName.new(None))).uid is None


@pytest.mark.parametrize("name", ["DOE^JOHN.dcm", "20261128T060102.123456-000042-1.2.3",
                                  "20261128T060102.123456-42-1.2.3.dcm",
                                  "20261328T060102.123456-000042-1.2.3.dcm",
                                  "20261128T060102.123456-000042-1..2.dcm",
                                  "20261128T060102.123456-000042-DOE.dcm",
                                  "x20261128T060102.123456-000042-1.2.3.dcm"])
def test_other_names_are_not_standard(name: str) -> None:
    assert SpoolName.parse(name) is None and not is_standard(name)


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/3", "1.2.\n3", "1" * 65, "", None,
                                 "1.2.3\x00", "1..2", "abc"])
def test_invalid_uid_never_reaches_a_path(uid: str | None) -> None:
    name = make_name(uid)
    assert name.endswith("-nouid.dcm")
    assert "/" not in name and "\n" not in name


def test_write_bytes_publishes_complete_file_0600(spool: Spool) -> None:
    path = spool.write_bytes(spool.incoming, "a.dcm", b"data")
    assert path.read_bytes() == b"data"
    assert mode(path) == FILE_MODE
    assert list((spool.incoming / ".tmp").iterdir()) == []


def test_failed_write_leaves_nothing_visible(spool: Spool) -> None:
    with pytest.raises(RuntimeError):
        with spool.temp_file(spool.incoming) as tmp:
            tmp.file.write(b"half")
            raise RuntimeError("disk error")
    assert spool.list_stage(spool.incoming) == []
    assert list((spool.incoming / ".tmp").iterdir()) == []


def test_publish_never_overwrites(spool: Spool) -> None:
    spool.write_bytes(spool.incoming, "same.dcm", b"first")
    with pytest.raises(FileExistsError):
        spool.write_bytes(spool.incoming, "same.dcm", b"second")
    assert (spool.incoming / "same.dcm").read_bytes() == b"first"
    assert list((spool.incoming / ".tmp").iterdir()) == []


def test_publish_new_picks_unique_names(spool: Spool) -> None:
    paths = []
    for _ in range(20):
        with spool.temp_file(spool.incoming) as tmp:
            tmp.file.write(b"x")
        paths.append(spool.publish_new(tmp.path, spool.incoming, "1.2.3"))
    assert len({p.name for p in paths}) == 20


def test_move_is_atomic_and_refuses_to_overwrite(spool: Spool) -> None:
    src = spool.write_bytes(spool.incoming, "a.dcm", b"a")
    moved = spool.move(src, spool.accepted)
    assert moved == spool.accepted / "a.dcm" and not src.exists()
    spool.write_bytes(spool.incoming, "a.dcm", b"b")
    with pytest.raises(FileExistsError):
        spool.move(spool.incoming / "a.dcm", spool.accepted)
    assert moved.read_bytes() == b"a"


def test_rename_noreplace_on_existing_target(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")


def test_link_is_idempotent_and_shares_the_inode(spool: Spool) -> None:
    src = spool.write_bytes(spool.accepted, "a.dcm", b"a")
    first = spool.link(src, spool.outbox("pacs"))
    again = spool.link(src, spool.outbox("pacs"))
    assert first == again and os.path.samefile(src, first)
    other = spool.write_bytes(spool.accepted, "b.dcm", b"b")
    with pytest.raises(FileExistsError):
        spool.link(other, spool.outbox("pacs"), name="a.dcm")


def test_move_with_reason_writes_sidecar_first(spool: Spool) -> None:
    src = spool.write_bytes(spool.incoming, "a.dcm", b"a")
    target = spool.move_with_reason(src, spool.quarantine, ".reason", "not DICOM")
    assert sidecar_path(target, ".reason").read_text() == "not DICOM\n"
    assert spool.list_stage(spool.quarantine) == [target]


def test_list_stage_skips_hidden_and_sidecars_in_name_order(spool: Spool) -> None:
    for name in ("b.dcm", "a.dcm", ".hidden", "a.dcm.reason", "c.dcm.error"):
        (spool.incoming / name).write_bytes(b"x")
    assert [p.name for p in spool.list_stage(spool.incoming)] == ["a.dcm", "b.dcm"]


def test_clean_tmp_removes_stale_files(spool: Spool) -> None:
    (spool.incoming / ".tmp" / "stale").write_bytes(b"x")
    assert spool.clean_tmp(spool.incoming) == 1
    assert not list((spool.incoming / ".tmp").iterdir())


def test_prune_until_free_goes_oldest_name_first_over_all_endpoints(spool: Spool) -> None:
    new = spool.write_bytes(spool.sent("pacs"), "20300101T000000.000000-000002-2.dcm", b"x")
    old = spool.write_bytes(spool.sent("archive"), "20200101T000000.000000-000001-1.dcm", b"x")
    assert spool.prune_sent(until_free=0) == 0  # enough free already: nothing goes
    free = spool.free_bytes()
    calls = iter([free - 1, free])  # short of space once: one file goes, then it is enough
    spool.free_bytes = lambda: next(calls)  # type: ignore[method-assign]
    assert spool.prune_sent(until_free=free) == 1
    assert not old.exists() and new.exists()


def test_prune_age_is_the_time_a_file_reached_sent(spool: Spool) -> None:
    """A file written long ago (old mtime) that was just delivered is not old: a rename
    into sent/ updates the ctime, and the age rule is max(ctime, mtime)."""
    path = spool.write_bytes(spool.outbox("pacs"), make_name("1.2.3"), b"x")
    os.utime(path, (0, 0))  # an export tool's file from 1970
    delivered = spool.move_final(path, spool.sent("pacs"))
    arrived = arrived_at(os.lstat(delivered))
    assert arrived > 3600
    assert spool.prune_sent(older_than=3600) == 0
    assert spool.prune_sent(older_than=3600, now=arrived + 3600) == 0  # not *more* than
    assert spool.prune_sent(older_than=3600, now=arrived + 3601) == 1
    assert not delivered.exists()


def test_prune_older_than_keeps_to_its_endpoint_and_to_regular_files(spool: Spool) -> None:
    mine = spool.write_bytes(spool.sent("pacs"), make_name("1.2.3"), b"x")
    theirs = spool.write_bytes(spool.sent("archive"), make_name("1.2.4"), b"x")
    (spool.sent("pacs") / make_name("1.2.5")).mkdir()  # someone's folder: never a reason to stop
    later = time.time() + 7200
    assert spool.prune_sent(older_than=3600, endpoint="pacs", now=later) == 1
    assert not mine.exists() and theirs.exists()
    assert spool.prune_sent(older_than=3600, now=later) == 1
    assert not theirs.exists()


def test_invalid_endpoint_name_is_refused(spool: Spool) -> None:
    with pytest.raises(SpoolError):
        spool.outbox("../etc")


def test_clean_dead_tmp_spares_live_writers(spool: Spool) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    tmp = spool.run_dir / ".tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / f"{dead}.0.abcd").write_bytes(b"cut short")
    (tmp / f"{os.getpid()}.1.abcd").write_bytes(b"being written")
    (tmp / "garbage").write_bytes(b"x")
    assert spool.clean_dead_tmp(spool.run_dir) == 2
    assert [p.name for p in tmp.iterdir()] == [f"{os.getpid()}.1.abcd"]


def test_move_final_tolerates_a_recovered_duplicate(spool: Spool) -> None:
    accepted = spool.write_bytes(spool.accepted, make_name("1.2.3"), b"a")
    first = spool.link(accepted, spool.outbox("pacs"))
    delivered = spool.move_final(first, spool.sent("pacs"))
    again = spool.link(accepted, spool.outbox("pacs"))  # the filter re-links after a crash
    assert spool.move_final(again, spool.sent("pacs")) == delivered  # same inode: dropped
    assert spool.list_stage(spool.outbox("pacs")) == [] and delivered.exists()
    other = spool.write_bytes(spool.outbox("pacs"), delivered.name, b"different file")
    moved = spool.move_final(other, spool.sent("pacs"))
    assert moved != delivered and moved.name.endswith("-1.2.3.dcm")
    assert delivered.read_bytes() == b"a" and moved.read_bytes() == b"different file"


def test_move_with_reason_never_overwrites_another_file(spool: Spool) -> None:
    first = spool.write_bytes(spool.outbox("pacs"), make_name("1.2.4"), b"one")
    failed = spool.move_with_reason(first, spool.failed("pacs"), ".error", "first")
    second = spool.write_bytes(spool.outbox("pacs"), failed.name, b"two")
    moved = spool.move_with_reason(second, spool.failed("pacs"), ".error", "second")
    assert moved != failed and failed.read_bytes() == b"one" and moved.read_bytes() == b"two"
    assert sidecar_path(moved, ".error").read_text() == "second\n"
