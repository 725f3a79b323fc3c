"""Study lists (``pipeline.studies.queue``) and delivery by study in the sender: a
released study goes out whole, in its list's order, on an association of its own."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import _STORAGE_CLASSES

from pipeline.clock import FakeClock
from pipeline.config import load as load_config
from pipeline.log import logger
from pipeline.sending.studies import StudyLists
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from pipeline.studies import queue
from services.send import Sender
from tests.helpers import dicom_files, make_dataset, write_dataset
from tests.sendkit import StatusSCP, endpoint_conf

EP = "ai"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").create([EP])


@pytest.fixture
def warnings():
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    yield lines
    logger.remove(handler)


def prefix() -> str:
    return SpoolName.new("1.2.3").prefix


def name_for(prefix_: str, uid: str = "1.2.3") -> str:
    return f"{prefix_}-{uid}.dcm"


# -- the list files ----------------------------------------------------------------------

def test_publish_then_load_round_trip(spool: Spool) -> None:
    prefixes = [prefix() for _ in range(3)]
    study, series = generate_uid(), generate_uid()
    first = queue.publish(spool, EP, study, None, "study", prefixes, now=1_800_000_000.5)
    second = queue.publish(spool, EP, study, series, "series", prefixes[:1])
    assert first.name.endswith(".study") and first.name.startswith("20270115T")
    assert first.prefixes == tuple(prefixes) and first.released == 1_800_000_000.5
    directory = queue.list_dir(spool, EP)
    assert directory == spool.root / "run" / "studies" / "queue" / EP
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / first.name).st_mode) == 0o600
    body = json.loads((directory / first.name).read_text())
    assert body == {"version": 1, "endpoint": EP, "study": study, "series": None,
                    "level": "study", "released": 1_800_000_000.5, "prefixes": prefixes}
    assert queue.load(spool, EP) == sorted([first, second], key=lambda one: one.name)
    assert not list((directory / ".tmp").iterdir())


def test_publish_refuses_what_it_could_not_read_back(spool: Spool) -> None:
    for args in [("1.2.3", None, "instance", []), ("not a uid", None, "study", []),
                 ("1.2.3", "x", "series", []), ("1.2.3", None, "study", ["../../etc"])]:
        with pytest.raises(ValueError):
            queue.publish(spool, EP, *args)  # type: ignore[arg-type]
    assert queue.load(spool, EP) == []


def test_no_folder_means_no_lists_and_none_is_made(spool: Spool) -> None:
    assert queue.load(spool, EP) == []
    assert not (spool.run_dir / "studies").exists()
    lists = StudyLists(spool, EP, FakeClock())
    paths = [spool.outbox(EP) / name_for(prefix()) for _ in range(3)]
    assert lists.arrange(list(paths)) == paths
    assert lists.of(paths[0].name) is None
    assert not (spool.run_dir / "studies").exists()


def write_list(spool: Spool, name: str, data: bytes) -> Path:
    return spool.write_bytes(queue.list_dir(spool, EP), name, data)


def good_body(**changes) -> dict:
    body = {"version": 1, "endpoint": EP, "study": "1.2.3", "series": None, "level": "study",
            "released": 1_800_000_000.0, "prefixes": [prefix()]}
    body.update(changes)
    return body


@pytest.mark.parametrize("data", [
    b"{not json",
    b"\xff\xfe",
    json.dumps(good_body(version=2)).encode(),
    json.dumps(good_body(endpoint="other")).encode(),
    json.dumps(good_body(study="1.2.x")).encode(),
    json.dumps(good_body(level="instance")).encode(),
    json.dumps(good_body(released="yesterday")).encode(),
    json.dumps(good_body(prefixes="20261128T060102.123456-000042")).encode(),
    json.dumps([1, 2]).encode(),
], ids=["json", "utf8", "version", "endpoint", "uid", "level", "released", "prefixes", "array"])
def test_a_corrupt_list_is_skipped_with_one_warning_and_moved_aside(spool: Spool, warnings,
                                                                     data: bytes) -> None:
    good = queue.publish(spool, EP, "1.2.3", None, "study", [prefix()])
    bad = write_list(spool, prefix() + ".study", data)
    assert queue.load(spool, EP, set_aside=False) == [good]  # status: looks, moves nothing
    assert bad.exists() and warnings == []
    assert queue.load(spool, EP) == [good]
    assert len(warnings) == 1 and bad.name in warnings[0] and "moved aside" in warnings[0]
    assert not bad.exists() and bad.with_name(bad.name + ".bad").exists()
    assert queue.load(spool, EP) == [good] and len(warnings) == 1  # said once


def test_bounds_too_many_prefixes_or_bytes_is_corrupt(spool: Spool, warnings) -> None:
    many = [f"20261128T060102.{i // 1_000_000:06d}-{i % 1_000_000:06d}"
            for i in range(queue.MAX_PREFIXES + 1)]
    write_list(spool, prefix() + ".study", json.dumps(good_body(prefixes=many)).encode())
    write_list(spool, prefix() + ".study", b" " * (queue.MAX_LIST_BYTES + 1))
    assert queue.load(spool, EP) == []
    assert len(warnings) == 2
    assert "prefixes" in warnings[0] and "bytes" in warnings[1]
    with pytest.raises(ValueError):
        queue.publish(spool, EP, "1.2.3", None, "study", many)


def test_invalid_and_repeated_prefixes_are_ignored(spool: Spool, warnings) -> None:
    good = [prefix(), prefix()]
    body = good_body(prefixes=[good[0], "../x", 7, None, good[0] + "-1.2.dcm", good[1], good[0]])
    write_list(spool, prefix() + ".study", json.dumps(body).encode())
    [entry] = queue.load(spool, EP)
    assert entry.prefixes == tuple(good) and warnings == []


def test_only_list_names_are_read(spool: Spool) -> None:
    directory = queue.list_dir(spool, EP)
    (directory / "notes.txt").write_text("hello")
    (directory / (prefix() + ".study.bad")).write_text("{")
    assert queue.load(spool, EP) == []


# -- order and retirement ------------------------------------------------------------------

def entry(name_prefix: str, prefixes: list[str], released: float = 0.0) -> queue.StudyList:
    return queue.StudyList(name_prefix + ".study", EP, "1.2.3", None, "study", released,
                           tuple(prefixes))


def test_order_lists_in_list_order_others_by_name(tmp_path: Path) -> None:
    p = [prefix() for _ in range(10)]  # increasing arrival order
    # p0: unlisted early; p1..p4: two studies interleaved; p5: list A; p6: list B;
    # p7: a late file of study A (unlisted); p8: a shaped copy of p3 (another UID)
    a = entry(p[5], [p[3], p[1]])
    b = entry(p[6], [p[4], p[2]])
    paths = [tmp_path / name_for(x) for x in (p[0], p[1], p[2], p[3], p[4], p[7])]
    paths.append(tmp_path / "hand-dropped.dcm")
    ordered = queue.order(paths, [b, a])
    assert [x.name for x in ordered] == [name_for(p[0]), name_for(p[3]), name_for(p[1]),
                                         name_for(p[4]), name_for(p[2]), name_for(p[7]),
                                         "hand-dropped.dcm"]
    shaped = [tmp_path / name_for(p[3], uid="2.25.99"), tmp_path / name_for(p[1])]
    assert queue.order(shaped, [a]) == shaped  # by prefix, whatever UID follows it


def test_order_a_prefix_in_two_lists_goes_with_the_first() -> None:
    p = [prefix() for _ in range(4)]
    paths = [Path(name_for(p[0])), Path(name_for(p[1]))]
    lists = [entry(p[3], [p[0]]), entry(p[2], [p[1], p[0]])]
    assert queue.order(paths, lists) == [paths[1], paths[0]]


def test_retire_keeps_lists_with_files_and_young_ones_without(spool: Spool) -> None:
    now = time.time()
    p = [prefix() for _ in range(3)]
    with_file = queue.publish(spool, EP, "1.2.3", None, "study", [p[0], p[1]], now=now)
    delivered = queue.publish(spool, EP, "1.2.4", None, "study", [p[2]], now=now)
    young = queue.publish(spool, EP, "1.2.5", None, "study", [prefix()], now=now - 60)
    old = queue.publish(spool, EP, "1.2.6", None, "study", [prefix()], now=now - 7200)
    lists = queue.load(spool, EP)
    kept = queue.retire(spool, EP, lists, {p[1]}, arrived={delivered.name, with_file.name},
                        now=now)
    assert {one.name for one in kept} == {with_file.name, young.name}
    assert {one.name for one in queue.load(spool, EP)} == {with_file.name, young.name}
    assert old not in kept
    # once its last file has gone too, the delivered list goes
    assert [one.name for one in queue.retire(spool, EP, kept, set(),
                                             arrived={with_file.name}, now=now)] == [young.name]


# -- the sender -------------------------------------------------------------------------------

class StudySCP(StatusSCP):
    """The tests' peer: which association each instance came on, in order."""

    def __init__(self, **kwargs) -> None:
        super().__init__(ae_title="AI", **kwargs)
        self.by_assoc: list[tuple[int, str]] = []   # (association number, SOP Instance UID)
        self._numbers: dict[int, int] = {}
        self._mutex = threading.Lock()

    def _on_established(self, event: evt.Event) -> None:
        super()._on_established(event)
        with self._mutex:
            self._numbers[id(event.assoc)] = len(self._numbers) + 1

    def _on_store(self, event: evt.Event) -> int:
        with self._mutex:
            self.by_assoc.append((self._numbers.get(id(event.assoc), 0),
                                  str(event.dataset.SOPInstanceUID)))
        return super()._on_store(event)

    def associations_of(self, uids: list[str]) -> set[int]:
        return {n for n, uid in self.by_assoc if uid in uids}


@pytest.fixture
def peer():
    server = StudySCP().start()
    yield server
    server.stop()


class Study:
    """A synthetic study whose copies are placed in the outbox under chosen names."""

    def __init__(self, tmp_path: Path, tag: str, count: int) -> None:
        self.uid = generate_uid()
        self.files: list[Path] = []
        self.uids: list[str] = []
        for index in range(count):
            ds = make_dataset(study_uid=self.uid, InstanceNumber=index + 1)
            self.files.append(write_dataset(ds, tmp_path / "src" / tag / f"{index}.dcm"))
            self.uids.append(str(ds.SOPInstanceUID))
        self.names: list[SpoolName] = []


def arrive(study: Study, index: int) -> SpoolName:
    """The standard name the copy gets on arrival (its file is linked later)."""
    name = SpoolName.new(study.uids[index])
    study.names.append(name)
    return name


def link(spool: Spool, source: Path, name: SpoolName) -> Path:
    outbox = spool.outbox(EP)
    with spool.temp_file(outbox) as tmp:
        tmp.file.write(source.read_bytes())
    return spool.publish(tmp.path, outbox, str(name))


def sender_for(tmp_path: Path, port: int, clock: FakeClock) -> Sender:
    conf = endpoint_conf(tmp_path, {EP: {"port": port, "ae_title": "AI"}})
    return Sender(load_config(conf), EP, clock=clock, install_signals=False)


def test_two_interleaved_studies_go_list_by_list_one_association_each(tmp_path: Path,
                                                                      peer: StudySCP) -> None:
    spool = Spool(tmp_path / "spool").create([EP])
    a, b, loose = Study(tmp_path, "a", 4), Study(tmp_path, "b", 3), Study(tmp_path, "u", 2)
    early = arrive(loose, 0)                       # an instance-level file, before the studies
    for index in range(4):                         # the two studies arrive interleaved
        arrive(a, index)
        if index < 3:
            arrive(b, index)
    a_order, b_order = [3, 0, 2, 1], [1, 2, 0]      # (Series, Instance Number, name) order
    list_a = queue.publish(spool, EP, a.uid, None, "study", [a.names[i].prefix for i in a_order])
    list_b = queue.publish(spool, EP, b.uid, None, "study", [b.names[i].prefix for i in b_order])
    for study in (a, b):                           # the filter links after publishing
        for source, name in zip(study.files, study.names, strict=True):
            link(spool, source, name)
    link(spool, loose.files[0], early)
    link(spool, loose.files[1], arrive(loose, 1))  # after both releases, unlisted
    assert list_a.name < list_b.name

    sender = sender_for(tmp_path, peer.port, FakeClock(wall=time.time()))
    assert sender.run(once=True) == 0

    expected = ([loose.uids[0]] + [a.uids[i] for i in a_order] + [b.uids[i] for i in b_order]
                + [loose.uids[1]])
    assert peer.uids() == expected
    assert len(dicom_files(spool.sent(EP))) == 9 and dicom_files(spool.outbox(EP)) == []
    assert len(peer.associations_of(a.uids)) == 1 and len(peer.associations_of(b.uids)) == 1
    assert peer.associations_of(a.uids).isdisjoint(peer.associations_of(b.uids + loose.uids))
    assert peer.associations_of(b.uids).isdisjoint(peer.associations_of(loose.uids))
    assert peer.associations == 4                  # early file, A, B, late file
    assert queue.load(spool, EP) == []             # both lists retired once sent


def test_a_list_with_a_missing_file_blocks_nothing(tmp_path: Path, peer: StudySCP) -> None:
    spool = Spool(tmp_path / "spool").create([EP])
    c, d = Study(tmp_path, "c", 2), Study(tmp_path, "d", 2)
    for study in (c, d):
        for index in range(2):
            arrive(study, index)
    never = SpoolName.new("1.2.3").prefix          # the copy that never arrives
    queue.publish(spool, EP, c.uid, None, "study", [c.names[1].prefix, never, c.names[0].prefix])
    list_d = queue.publish(spool, EP, d.uid, None, "study", [n.prefix for n in d.names])
    for study in (c, d):
        for source, name in zip(study.files, study.names, strict=True):
            link(spool, source, name)
    clock = FakeClock(wall=time.time())

    assert sender_for(tmp_path, peer.port, clock).run(once=True) == 0
    assert peer.uids() == [c.uids[1], c.uids[0]] + d.uids
    assert dicom_files(spool.outbox(EP)) == []
    # C waits for its missing copy (a young list may be waiting for the filter's links) …
    [left] = queue.load(spool, EP)
    assert left.study == c.uid and list_d.name != left.name
    # … and goes once it is an hour old, with nothing of it in the outbox
    clock.advance(queue.NEVER_ARRIVED_AGE + 1)
    assert sender_for(tmp_path, peer.port, clock).run(once=True) == 0
    assert queue.load(spool, EP) == []


def test_a_backed_off_study_file_does_not_hold_the_next_study(tmp_path: Path) -> None:
    server = StudySCP(statuses=[0xA701]).start()  # the first file is refused once (busy)
    try:
        spool = Spool(tmp_path / "spool").create([EP])
        e, f = Study(tmp_path, "e", 2), Study(tmp_path, "f", 2)
        for study in (e, f):
            for index in range(2):
                arrive(study, index)
            queue.publish(spool, EP, study.uid, None, "study", [n.prefix for n in study.names])
        for study in (e, f):
            for source, name in zip(study.files, study.names, strict=True):
                link(spool, source, name)
        assert sender_for(tmp_path, server.port, FakeClock(wall=time.time())).run(once=True) == 0
        assert len(dicom_files(spool.sent(EP))) == 4
        assert sorted(set(server.uids())) == sorted(e.uids + f.uids)
        assert queue.load(spool, EP) == []
    finally:
        server.stop()


def test_received_files_are_the_listed_ones(tmp_path: Path, peer: StudySCP) -> None:
    """The order seen at the peer is the list's, read back from what it stored."""
    spool = Spool(tmp_path / "spool").create([EP])
    g = Study(tmp_path, "g", 5)
    for index in range(5):
        arrive(g, index)
    order = [4, 2, 0, 3, 1]
    queue.publish(spool, EP, g.uid, None, "study", [g.names[i].prefix for i in order])
    for source, name in zip(g.files, g.names, strict=True):
        link(spool, source, name)
    sender_for(tmp_path, peer.port, FakeClock(wall=time.time())).run(once=True)
    numbers = {str(dcmread(p).SOPInstanceUID): dcmread(p).InstanceNumber for p in g.files}
    assert [numbers[uid] for uid in peer.uids()] == [i + 1 for i in order]
    assert peer.associations == 1


def test_a_study_needing_more_than_128_contexts_is_split_with_one_line(tmp_path: Path) -> None:
    classes = sorted(_STORAGE_CLASSES.values())[:130]  # storage classes pynetdicom serves
    server = StudySCP(sop_classes=classes).start()
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        spool = Spool(tmp_path / "spool").create([EP])
        study = Study(tmp_path, "h", 0)
        for n, sop in enumerate(classes):
            ds = make_dataset(sop_class=sop, study_uid=study.uid, InstanceNumber=n + 1)
            study.files.append(write_dataset(ds, tmp_path / "src" / "h" / f"{n}.dcm"))
            study.uids.append(str(ds.SOPInstanceUID))
            arrive(study, n)
        order = list(range(129, -1, -1))
        queue.publish(spool, EP, study.uid, None, "study", [study.names[i].prefix for i in order])
        for source, name in zip(study.files, study.names, strict=True):
            link(spool, source, name)
        conf = endpoint_conf(tmp_path, {EP: {"port": server.port, "ae_title": "AI",
                                             "transcode": {"enabled": "false"}}})
        sender = Sender(load_config(conf), EP, clock=FakeClock(wall=time.time()),
                        install_signals=False)
        assert sender.run(once=True) == 0
        assert server.uids() == [study.uids[i] for i in order]
        assert server.associations == 2
        assert len([line for line in lines if "presentation contexts, more than" in line]) == 1
        assert queue.load(spool, EP) == []
    finally:
        logger.remove(handler)
        server.stop()


def test_after_a_restart_a_list_whose_files_were_delivered_is_retired(spool: Spool) -> None:
    """A sender killed after its last file but before retiring the list: at start-up the
    copies are found in sent/ and failed/, so the list goes without waiting an hour;
    a young list with nothing anywhere yet (its files not linked) stays."""
    p = [prefix() for _ in range(3)]
    done = queue.publish(spool, EP, "1.2.3", None, "study", p[:2])
    waiting = queue.publish(spool, EP, "1.2.4", None, "study", [p[2]])
    spool.write_bytes(spool.sent(EP), name_for(p[0]), b"x")
    spool.write_bytes(spool.failed(EP), name_for(p[1], uid="2.25.7"), b"x")
    lists = StudyLists(spool, EP, FakeClock(wall=time.time()))
    assert lists.arrange([]) == []
    assert [one.name for one in queue.load(spool, EP)] == [waiting.name]
    assert done.name not in {one.name for one in lists.lists}


def test_a_list_whose_files_are_still_being_linked_stays_and_keeps_its_order(
        tmp_path: Path, peer: StudySCP) -> None:
    """The filter publishes the list, then links the copies one by one: a sender that
    has sent the first ones before the rest are linked keeps the list (they have not all
    been seen), and the rest still go out in the list's order."""
    spool = Spool(tmp_path / "spool").create([EP])
    k = Study(tmp_path, "k", 4)
    for index in range(4):
        arrive(k, index)
    order = [2, 0, 3, 1]
    listed = queue.publish(spool, EP, k.uid, None, "study", [k.names[i].prefix for i in order])
    clock = FakeClock(wall=time.time())
    link(spool, k.files[2], k.names[2])
    assert sender_for(tmp_path, peer.port, clock).run(once=True) == 0
    assert queue.load(spool, EP) == [listed]
    for index in (0, 3, 1):
        link(spool, k.files[index], k.names[index])
    assert sender_for(tmp_path, peer.port, clock).run(once=True) == 0
    assert peer.uids() == [k.uids[i] for i in order]
    assert queue.load(spool, EP) == []
