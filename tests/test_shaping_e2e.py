"""Shaping end to end (issue 15): real daemons as subprocesses, real peers.

DCMTK ``storescu`` sends a study to ``dicomflow receive``; the filter fans it out to
an endpoint ``plain`` (a hard link of the received file) and an endpoint ``coerced``
(``[coerce] operations``: its own, shaped file); the senders deliver to DCMTK
``storescp`` and Orthanc. What each peer stores is compared element by element (and
byte for byte where it must be identical) with what storescu sent and what DicomFlow
received; ``dciodvfy`` judges the coerced copies against the originals. Then: kill -9
of the filter while it shapes, a hand-moved original and ``dicomflow retry`` (shaped
again, never sent unshaped), and ``dicomflow route --diff/--show-values/--write``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.shaping.copies import copy_prefix
from pipeline.spool import Spool
from tests.helpers import (
    Daemon,
    dicom_files,
    make_files,
    require_binary,
    router_port,
    run_cli,
    wait_for,
    write_conf,
)
from tests.peers import Orthanc, StoreSCP, storescu

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e

PATIENT_ID = "PID-0042"
OPERATIONS = "PatientID = SITEA-{PatientID}\nIssuerOfPatientID = SITEA"
#: what the coerced copy may differ in, and nothing else
COERCED_TAGS = {0x00100020, 0x00100021, 0x04000561}
AE = "DICOMFLOW"
#: kill -9 scenario: how many files (``DICOMFLOW_SHAPING_KILL_FILES``), of ~2 MB each
KILL_FILES = int(os.environ.get("DICOMFLOW_SHAPING_KILL_FILES", "40"))
KILLS = int(os.environ.get("DICOMFLOW_SHAPING_KILLS", "6"))


# -- configuration and daemons ---------------------------------------------------------

def endpoint(port: int, ae_title: str, operations: str | None = None) -> dict:
    """An endpoint's sections; with ``operations`` it shapes its copies."""
    sections: dict[str, dict] = {
        "endpoint": {"host": "127.0.0.1", "port": port, "ae_title": ae_title},
        "retry": {"probe_backoff_cap": "2s"}}
    if operations is not None:
        sections["coerce"] = {"operations": operations}
    return sections


class Site:
    """A conf dir and spool with endpoints ``plain`` and ``coerced``, and the daemons
    started for it (stopped, last first, by :meth:`stop`)."""

    def __init__(self, base: Path, plain: tuple[int, str], coerced: tuple[int, str],
                 operations: str = OPERATIONS) -> None:
        self.base = base
        self.conf = write_conf(base, router={"log_level": "INFO", "ae_title": AE},
                               endpoints={"plain": endpoint(*plain),
                                          "coerced": endpoint(*coerced, operations)})
        self.spool = Spool(base / "spool")
        self.daemons: dict[str, Daemon] = {}

    def start(self, *names: str) -> Site:
        for name in names:
            args = ("send", name.removeprefix("send-")) if name.startswith("send-") else (name,)
            self.daemons[name] = Daemon(self.conf, *args, log_name=name).start()
        for name in names:
            daemon = self.daemons[name]
            daemon.wait_log({"receive": "listening as", "filter": "filter ready"}.get(
                name, "sender started"))
        return self

    def stop(self) -> None:
        """Stop every daemon (each one, even if another would not stop), then say which
        did not exit cleanly."""
        unclean = []
        for name, daemon in reversed(list(self.daemons.items())):
            try:
                if daemon.stop() != 0:
                    unclean.append(name)
            except AssertionError:
                unclean.append(name)
        assert not unclean, f"daemons that did not exit cleanly: {unclean}\n{self.logs()}"

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{d.log()[-4000:]}" for name, d in self.daemons.items())


# -- data --------------------------------------------------------------------------------

def make_study(directory: Path, count: int = 5) -> list[Path]:
    """``count`` pydicom-made CT images with pixel data, plus pydicom's real CT_small."""
    files = make_files(directory, count, rows=64, cols=64, patient_id=PATIENT_ID)
    real = get_testdata_file("CT_small.dcm")
    assert isinstance(real, str), "pydicom's CT_small.dcm is missing"
    return [*files, Path(shutil.copy(real, directory / "ct_small.dcm"))]


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def by_uid(paths: list[Path]) -> dict[str, Path]:
    found = {uid_of(path): path for path in paths}
    assert len(found) == len(paths), "two files of one SOP Instance UID"
    return found


def data_set_bytes(path: Path) -> bytes:
    """The file's bytes after the preamble, ``DICM`` and the file meta group (what
    travels over DICOM)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", path
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


def values(ds: Dataset) -> dict[int, object]:
    """A data set as {tag: (VR, value)}, sequences as lists of such dicts: comparable
    across files whatever the elements' offsets."""
    result: dict[int, object] = {}
    for element in ds:
        if element.VR == "SQ":
            result[element.tag] = ("SQ", [values(item) for item in element.value])
        else:
            result[element.tag] = (element.VR, element.value)
    return result


#: Data Set Trailing Padding: DCMTK's storescu does not send it (CT_small has some)
TRAILING_PADDING = 0xFFFCFFFC


def read_values(path: Path) -> dict[int, object]:
    found = values(pydicom.dcmread(path))
    found.pop(TRAILING_PADDING, None)
    return found


def differing(a: dict[int, object], b: dict[int, object]) -> set[int]:
    return {tag for tag in a.keys() | b.keys() if a.get(tag) != b.get(tag)}


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's "Error" lines for a file, whitespace-normalised."""
    result = subprocess.run([require_binary("/usr/bin/dciodvfy"), str(path)], capture_output=True,
                            text=True, errors="replace", timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return {" ".join(line.split()) for line in lines if line.lstrip().startswith("Error")}


def original_items(ds: Dataset) -> Sequence:
    return ds.get("OriginalAttributesSequence") or Sequence()


def check_coerced(copy: Path, original: Path, calling: str | None) -> None:
    """``copy`` differs from ``original`` only in the coerced attributes and one Original
    Attributes item, which holds the previous values; pixel data identical; dciodvfy
    finds nothing new."""
    before, after = read_values(original), read_values(copy)
    assert differing(before, after) == COERCED_TAGS, sorted(map(hex, differing(before, after)))
    ds, old = pydicom.dcmread(copy), pydicom.dcmread(original)
    assert ds.PatientID == f"SITEA-{old.PatientID}" and ds.IssuerOfPatientID == "SITEA"
    [item] = original_items(ds)
    [modified] = item.ModifiedAttributesSequence
    assert modified.PatientID == old.PatientID, "the item must keep the previous PatientID"
    assert "IssuerOfPatientID" in modified and not modified.IssuerOfPatientID  # had none
    assert item.ModifyingSystem == f"{AE}:coerced"
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert len(str(item.AttributeModificationDateTime)) >= 14
    if calling is not None:
        assert item.SourceOfPreviousValues == calling
    assert ds.PixelData == old.PixelData
    new_errors = dciodvfy_errors(copy) - dciodvfy_errors(original)
    assert not new_errors, new_errors


def shaped_mark(path: Path) -> str | None:
    """The file meta's Private Information (0002,0102): the filter's "shaped for" (or the
    global stage's "coerced by") mark."""
    info = pydicom.filereader.read_file_meta_info(path).get("PrivateInformation")
    return None if info is None else bytes(info).rstrip(b"\0").decode()


# -- 1. over DICOM: storescu → DicomFlow → storescp (plain) and Orthanc / storescp -------

ByUid = dict[str, Path]


def _deliver_study(site: Site, study: list[Path], coerced_files) -> tuple[ByUid, ByUid, ByUid]:
    """Send ``study`` with storescu; wait until both endpoints are done; the original,
    sent/plain and sent/coerced files by UID."""
    result = storescu(router_port(site.conf), study, called=AE)
    assert result.returncode == 0, result.stdout + result.stderr
    originals = by_uid(study)
    spool = site.spool

    def delivered() -> bool:
        return (len(dicom_files(spool.sent("plain"))) == len(study)
                and len(dicom_files(spool.sent("coerced"))) == len(study)
                and len(coerced_files()) >= len(study))

    try:
        wait_for(delivered, timeout=120, message="the study at both peers")
    except AssertionError:
        raise AssertionError(site.logs()) from None
    for stage in (spool.incoming, spool.accepted, spool.outbox("plain"), spool.outbox("coerced"),
                  spool.failed("plain"), spool.failed("coerced"), spool.quarantine, spool.rejected):
        assert dicom_files(stage) == [], (stage, site.logs())
    plain, coerced = by_uid(dicom_files(spool.sent("plain"))), by_uid(dicom_files(spool.sent("coerced")))
    for uid, path in coerced.items():  # the shaped copy keeps the received file's name prefix
        assert copy_prefix(path.name) == copy_prefix(plain[uid].name) is not None, path.name
    return originals, plain, coerced


def _check_plain(originals: dict[str, Path], plain: dict[str, Path], peer: dict[str, Path]) -> None:
    """The plain copy: the received file itself (a hard link), and byte-identical at the peer."""
    assert plain.keys() == originals.keys() == peer.keys()
    for uid, original in originals.items():
        received = plain[uid]
        assert read_values(received) == read_values(original), uid
        assert shaped_mark(received) is None
        assert data_set_bytes(peer[uid]) == data_set_bytes(received), uid


def _study_through(tmp_path: Path, cleanup, peer, peer_address: tuple[int, str],
                   peer_files) -> tuple[ByUid, ByUid]:
    """A study from storescu through DicomFlow to a plain storescp and to ``peer``
    (already started) as the coerced endpoint; the plain copies checked, and each
    coerced copy against them. The originals and the coerced copies, by UID."""
    plain_scp = StoreSCP(tmp_path / "plain-scp", "PLAIN").start()
    cleanup.append(plain_scp)
    cleanup.append(peer)
    site = Site(tmp_path, (plain_scp.port, "PLAIN"), peer_address)
    cleanup.append(site)
    site.start("receive", "filter", "send-plain", "send-coerced")
    originals, plain, coerced = _deliver_study(site, make_study(tmp_path / "study"), peer_files)
    _check_plain(originals, plain, by_uid(plain_scp.files()))
    assert coerced.keys() == originals.keys()
    for uid, copy in coerced.items():
        assert shaped_mark(copy) == "shaped for coerced"
        check_coerced(copy, plain[uid], calling="STORESCU")
    return originals, coerced


@pytest.mark.slow
def test_study_to_storescp_plain_and_orthanc_coerced(tmp_path: Path, cleanup) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", "ORTHANC").start()
    originals, coerced = _study_through(tmp_path, cleanup, orthanc,
                                        (orthanc.dicom_port, "ORTHANC"), orthanc.instances)
    stored = {}
    for orthanc_id in orthanc.instances():
        tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
        stored[tags["SOPInstanceUID"]] = orthanc_id  # type: ignore[index]
        original = pydicom.dcmread(originals[tags["SOPInstanceUID"]])  # type: ignore[index]
        assert tags["PatientID"] == f"SITEA-{original.PatientID}"  # type: ignore[index]
        assert tags["IssuerOfPatientID"] == "SITEA"  # type: ignore[index]
    assert stored.keys() == originals.keys()
    for uid, orthanc_id in stored.items():  # what Orthanc keeps is the coerced data set
        path = tmp_path / f"orthanc-{uid}.dcm"
        with urllib.request.urlopen(f"{orthanc.url}/instances/{orthanc_id}/file", timeout=60) as r:
            path.write_bytes(r.read())
        assert read_values(path) == read_values(coerced[uid]), uid


@pytest.mark.slow
def test_study_to_storescp_plain_and_storescp_coerced(tmp_path: Path, cleanup) -> None:
    coerced_scp = StoreSCP(tmp_path / "coerced-scp", "COERCED").start()
    originals, coerced = _study_through(tmp_path, cleanup, coerced_scp,
                                        (coerced_scp.port, "COERCED"), coerced_scp.files)
    at_peer = by_uid(coerced_scp.files())
    assert at_peer.keys() == coerced.keys()
    for uid, copy in coerced.items():
        assert data_set_bytes(at_peer[uid]) == data_set_bytes(copy), uid  # as shaped, bit for bit
        check_coerced(at_peer[uid], originals[uid], calling="STORESCU")


# -- 2. kill -9 of the filter while it shapes -----------------------------------------

def copies_by_uid(spool: Spool, endpoint: str) -> tuple[Counter, list[Path]]:
    """Every copy an endpoint holds (outbox, sent, failed), counted by SOP Instance UID."""
    paths = [p for stage in (spool.outbox(endpoint), spool.sent(endpoint), spool.failed(endpoint))
             for p in dicom_files(stage)]
    return Counter(uid_of(p) for p in paths), paths


def visible_temp_files(spool: Spool) -> list[Path]:
    """Files left in any hidden temp folder of the spool (the folders themselves may stay)."""
    return [p for p in spool.root.rglob("*") if p.is_file() and ".tmp" in p.parts]


def kill_9_while_filtering(base: Path, conf: Path, spool: Spool) -> set[str]:
    """Drop ``KILL_FILES`` files of ~2 MB into ``incoming/``, kill -9 the filter at random
    instants while it works (``KILLS`` times), restart it each time, let it finish;
    the files' SOP Instance UIDs."""
    files = make_files(base / "staging", KILL_FILES, rows=1024, cols=1024, patient_id=PATIENT_ID)
    uids = {uid_of(f) for f in files}
    rng = random.Random()
    kills = 0
    daemon = Daemon(conf, "filter", log_name="filter-0").start()
    daemon.wait_log("filter ready")
    for path in files:
        os.rename(path, spool.incoming / path.name)  # the operator's `mv`

    def done() -> bool:
        return not dicom_files(spool.incoming) and not dicom_files(spool.accepted)

    while kills < KILLS and not done():
        threading.Event().wait(rng.uniform(0.0, 0.4))  # a random instant, not a wait for the daemon
        daemon.kill()
        kills += 1
        daemon = Daemon(conf, "filter", log_name=f"filter-{kills}").start()
        daemon.wait_log("filter ready")
    wait_for(done, timeout=180, message="everything filtered")
    assert daemon.stop() == 0
    print(f"kill -9 of the filter while shaping: {kills} kills")
    assert kills >= 1, "the filter finished before the first kill: use more files"
    logs = "".join((base / f"filter-{n}.log").read_text() for n in range(kills + 1))
    assert "Traceback" not in logs
    assert dicom_files(spool.quarantine) == [] and dicom_files(spool.rejected) == []
    leftovers = [p for p in spool.accepted.rglob("*") if p.is_file() and ".tmp" not in p.parts]
    assert leftovers == []
    assert visible_temp_files(spool) == []
    return uids


def check_one_item(path: Path, system: str) -> None:
    """Coerced exactly once (never ``SITEA-SITEA-…``), one Original Attributes item."""
    ds = pydicom.dcmread(path)
    assert ds.PatientID == f"SITEA-{PATIENT_ID}", ds.PatientID
    [item] = original_items(ds)
    assert item.ModifyingSystem == system
    [modified] = item.ModifiedAttributesSequence
    assert modified.PatientID == PATIENT_ID


@pytest.mark.slow
def test_kill_9_of_the_filter_while_shaping_leaves_one_copy_per_endpoint(tmp_path: Path) -> None:
    site = Site(tmp_path, (1, "PLAIN"), (2, "COERCED"))  # no senders: copies stay in the outboxes
    spool = site.spool
    uids = kill_9_while_filtering(tmp_path, site.conf, spool)

    plain, plain_paths = copies_by_uid(spool, "plain")
    coerced, coerced_paths = copies_by_uid(spool, "coerced")
    assert plain == Counter(uids), "each instance exactly once for plain"
    assert coerced == Counter(uids), "each instance exactly once for coerced"
    for path in coerced_paths:
        assert shaped_mark(path) == "shaped for coerced", path.name
        check_one_item(path, f"{AE}:coerced")
    for path in plain_paths:
        assert shaped_mark(path) is None and pydicom.dcmread(path).PatientID == PATIENT_ID
    prefixes = {copy_prefix(p.name) for p in plain_paths}
    assert {copy_prefix(p.name) for p in coerced_paths} == prefixes  # one arrival, one prefix


@pytest.mark.slow
def test_kill_9_with_a_global_coerce_never_coerces_twice(tmp_path: Path) -> None:
    """router.ini's [coerce] replaces the file in accepted/; a redo after a kill finds
    this spool's "coerced by" mark there and leaves the file as it is."""
    conf = write_conf(tmp_path, router={"log_level": "INFO", "ae_title": AE},
                      endpoints={"east": endpoint(1, "EAST"), "west": endpoint(2, "WEST")})
    text = OPERATIONS.replace("\n", "\n    ")
    with open(conf / "router.ini", "a") as router:
        router.write(f"\n[coerce]\noperations = {text}\n")
    spool = Spool(tmp_path / "spool")
    uids = kill_9_while_filtering(tmp_path, conf, spool)

    for name in ("east", "west"):
        found, paths = copies_by_uid(spool, name)
        assert found == Counter(uids), f"each instance exactly once for {name}"
        for path in paths:
            # a hard link of the coerced accepted file, marked by this spool
            assert shaped_mark(path) == f"coerced by {spool.instance_id(create=False)}"
            check_one_item(path, AE)


# -- 3. a retried or hand-moved original is shaped again, never sent unshaped ---------

@pytest.mark.slow
def test_a_hand_moved_original_is_handed_back_and_shaped(tmp_path: Path, cleanup) -> None:
    plain_scp = StoreSCP(tmp_path / "plain-scp", "PLAIN").start()
    cleanup.append(plain_scp)
    coerced_scp = StoreSCP(tmp_path / "coerced-scp", "COERCED").start()
    cleanup.append(coerced_scp)
    site = Site(tmp_path, (plain_scp.port, "PLAIN"), (coerced_scp.port, "COERCED"))
    cleanup.append(site)
    site.start("receive", "filter", "send-plain", "send-coerced")
    [study] = make_study(tmp_path / "study", count=1)[:1]
    assert storescu(router_port(site.conf), [study], called=AE).returncode == 0
    spool = site.spool
    wait_for(lambda: len(dicom_files(spool.sent("plain"))) == 1 and len(coerced_scp.files()) == 1
             and len(dicom_files(spool.sent("coerced"))) == 1, message="first delivery")

    [original] = dicom_files(spool.sent("plain"))
    assert shaped_mark(original) is None
    os.rename(original, spool.outbox("coerced") / original.name)  # the operator's `mv`
    wait_for(lambda: len(coerced_scp.files()) == 2 and not dicom_files(spool.outbox("coerced"))
             and not dicom_files(spool.accepted / "coerced"), timeout=120,
             message="the hand-moved original shaped and sent")
    assert "handed back" in site.daemons["send-coerced"].log()
    for stored in coerced_scp.files():  # both deliveries coerced: none went out unshaped
        ds = pydicom.dcmread(stored)
        assert ds.PatientID == f"SITEA-{PATIENT_ID}" and len(original_items(ds)) == 1
        assert data_set_bytes(stored) in {data_set_bytes(p) for p in
                                          dicom_files(spool.sent("coerced"))}
    assert dicom_files(spool.failed("coerced")) == [] and dicom_files(spool.quarantine) == []


BAD_UID_OPERATIONS = OPERATIONS + "\nSOPInstanceUID = {SOPInstanceUID}.x"


@pytest.mark.slow
def test_retry_of_a_file_that_could_not_be_shaped_shapes_it_again(tmp_path: Path, cleanup) -> None:
    """An operation that gives an invalid UID: the copy goes to failed/coerced/ with the
    reason (plain is unaffected); the operations fixed, ``dicomflow retry`` sends it
    shaped with the new ones."""
    plain_scp = StoreSCP(tmp_path / "plain-scp", "PLAIN").start()
    cleanup.append(plain_scp)
    coerced_scp = StoreSCP(tmp_path / "coerced-scp", "COERCED").start()
    cleanup.append(coerced_scp)
    site = Site(tmp_path, (plain_scp.port, "PLAIN"), (coerced_scp.port, "COERCED"),
                operations=BAD_UID_OPERATIONS)
    cleanup.append(site)
    site.start("receive", "filter", "send-plain", "send-coerced")
    study = make_study(tmp_path / "study", count=1)[:1]
    assert storescu(router_port(site.conf), study, called=AE).returncode == 0
    spool = site.spool
    wait_for(lambda: len(dicom_files(spool.failed("coerced"))) == 1 and len(plain_scp.files()) == 1,
             message="plain delivered, coerced failed")
    [failed] = dicom_files(spool.failed("coerced"))
    reason = Path(f"{failed}.error").read_text()
    assert "cannot be shaped" in reason and "SOPInstanceUID" in reason, reason
    assert coerced_scp.files() == []

    (site.conf / "endpoints" / "coerced.ini").write_text(
        (site.conf / "endpoints" / "coerced.ini").read_text().replace(
            "\n    SOPInstanceUID = {SOPInstanceUID}.x", ""))
    site.daemons["filter"].proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    site.daemons["filter"].wait_log("configuration reloaded")
    result = run_cli(site.conf, "retry", "coerced", failed.name)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        wait_for(lambda: len(coerced_scp.files()) == 1 and len(dicom_files(spool.sent("coerced"))) == 1,
                 timeout=120, message="the retried file shaped and sent")
    except AssertionError:
        raise AssertionError(site.logs()) from None
    [stored] = coerced_scp.files()
    [sent] = dicom_files(spool.sent("coerced"))
    assert shaped_mark(sent) == "shaped for coerced"
    assert data_set_bytes(stored) == data_set_bytes(sent)
    check_coerced(stored, study[0], calling="STORESCU")
    assert dicom_files(spool.failed("coerced")) == [] and not Path(f"{failed}.error").exists()


# -- 4. dicomflow route --diff / --show-values / --write ------------------------------

@pytest.fixture
def route_site(tmp_path: Path) -> tuple[Path, Path]:
    conf = write_conf(tmp_path, router={"ae_title": AE},
                      endpoints={"plain": endpoint(1, "PLAIN"),
                                 "coerced": endpoint(2, "COERCED", OPERATIONS)})
    [file] = make_files(tmp_path / "files", 1, patient_id="SECRET-4711")
    return conf, file


def test_route_diff_names_the_attributes_but_not_their_values(route_site) -> None:
    conf, file = route_site
    result = run_cli(conf, "route", str(file), "--diff")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "changed PatientID" in out and "added IssuerOfPatientID" in out
    assert "a hard link of the received file" in out  # plain
    assert "SECRET-4711" not in out and "SITEA" not in out


def test_route_show_values_shows_old_and_new(route_site) -> None:
    conf, file = route_site
    result = run_cli(conf, "route", str(file), "--diff", "--show-values")
    assert result.returncode == 0, result.stderr
    assert "'SECRET-4711' → 'SITEA-SECRET-4711'" in result.stdout
    assert "'SITEA'" in result.stdout


def test_route_write_writes_the_shaped_copy_and_moves_nothing(route_site, tmp_path: Path) -> None:
    conf, file = route_site
    before = file.read_bytes()
    out = tmp_path / "inspect"
    result = run_cli(conf, "route", str(file), "--write", str(out))
    assert result.returncode == 0, result.stderr
    written = out / "coerced" / file.name
    assert f"written to {written}" in result.stdout
    ds = pydicom.dcmread(written)
    assert ds.PatientID == "SITEA-SECRET-4711" and ds.IssuerOfPatientID == "SITEA"
    assert file.read_bytes() == before, "route never changes its input"
    check_coerced(written, file, calling=None)
    assert not (out / "plain").exists() or not any((out / "plain").iterdir())


# -- more of the grammar ----------------------------------------------------------

def test_route_write_with_delete_operations(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, router={"ae_title": AE}, endpoints={
        "coerced": endpoint(2, "COERCED", "delete PatientBirthDate\ndelete private")})
    [file] = make_files(tmp_path / "files", 1, PatientBirthDate="19700101")
    ds = pydicom.dcmread(file)
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "private value")
    ds.save_as(file, enforce_file_format=True)
    out = tmp_path / "inspect"
    result = run_cli(conf, "route", str(file), "--write", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    shaped = pydicom.dcmread(out / "coerced" / file.name)
    assert "PatientBirthDate" not in shaped
    assert not any(element.tag.is_private for element in shaped)
    [item] = original_items(shaped)
    [modified] = item.ModifiedAttributesSequence
    assert modified.PatientBirthDate == "19700101"
