"""The filter daemon driven in-process with ``run(once=True)`` (no sleeps, real files)."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load
from pipeline.errors import AlreadyRunning
from pipeline.lock import DaemonLock
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from services.filter import FilterDaemon
from tests import corpus
from tests.helpers import dicom_files, make_dataset, wait_for, write_conf, write_dataset

MR = "MRImageStorage"
ENDPOINTS = {
    "pacs": {"endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"}},
    "ct_only": {"endpoint": {"host": "127.0.0.1", "port": 1105, "ae_title": "CTARCH"},
                "filter": {"conditions": "Modality=CT"}},
    "mr_research": {"endpoint": {"host": "127.0.0.1", "port": 1106, "ae_title": "RESEARCH"},
                    "filter": {"sop_whitelist": MR}},
}


@pytest.fixture
def conf(tmp_path):
    return write_conf(tmp_path, filter_={"sop_blacklist": "EncapsulatedPDFStorage"}, endpoints=ENDPOINTS)


def daemon_for(conf: Path, **kwargs) -> FilterDaemon:
    kwargs.setdefault("settle", 0.0)
    kwargs.setdefault("rescan_interval", 0.2)
    kwargs.setdefault("retry_interval", 0.1)
    return FilterDaemon(load(conf), **kwargs)


def drop(spool: Spool, ds, name: str | None = None) -> Path:
    """Write outside the spool, then rename in (what the receiver and `mv` do)."""
    staging = spool.root.parent / "staging"
    path = write_dataset(ds, staging / (name or f"{ds.SOPInstanceUID}.dcm"))
    target = spool.incoming / path.name
    os.rename(path, target)  # the test's own drop, not the daemon's
    return target


def uids_in(directory: Path) -> list[str | None]:
    names = [SpoolName.parse(p.name) for p in dicom_files(directory)]
    assert None not in names, "every file in a stage has a standard name"
    return sorted(name.uid for name in names if name is not None)  # type: ignore[type-var]


def test_files_fan_out_by_rules(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ct, mr = make_dataset(modality="CT"), make_dataset("1.2.840.10008.5.1.4.1.1.4", modality="MR")
    drop(spool, ct), drop(spool, mr)
    assert daemon.run(once=True) == 0
    assert uids_in(spool.outbox("pacs")) == sorted([ct.SOPInstanceUID, mr.SOPInstanceUID])
    assert uids_in(spool.outbox("ct_only")) == [ct.SOPInstanceUID]
    assert uids_in(spool.outbox("mr_research")) == [mr.SOPInstanceUID]
    assert dicom_files(spool.incoming) == [] and dicom_files(spool.accepted) == []
    for path in dicom_files(spool.outbox("pacs")):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_nlink == 2  # one hard link per outbox, no copy
    for directory in (spool.accepted, spool.outbox("pacs"), spool.rejected, spool.quarantine):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_hand_dropped_file_gets_standard_name_and_mode(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset(modality="MR")
    path = drop(spool, ds, "scan 01\n.dcm")
    os.chmod(path, 0o644)
    daemon.run(once=True)
    [routed] = dicom_files(spool.outbox("pacs"))
    parsed = SpoolName.parse(routed.name)
    assert parsed is not None and parsed.uid == ds.SOPInstanceUID
    assert stat.S_IMODE(routed.stat().st_mode) == 0o600


def test_receiver_names_are_kept(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    name = str(SpoolName.new(ds.SOPInstanceUID))
    drop(spool, ds, name)
    daemon.run(once=True)
    assert [p.name for p in dicom_files(spool.outbox("ct_only"))] == [name]


def test_global_rule_and_no_endpoint_go_to_rejected(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    pdf = make_dataset("1.2.840.10008.5.1.4.1.1.104.1", modality="DOC")
    drop(spool, pdf)
    daemon.config = load(conf)
    daemon.run(once=True)
    [rejected] = dicom_files(spool.rejected)
    reason = Path(str(rejected) + ".reason").read_text()
    assert "global rule: sop_blacklist contains 1.2.840.10008.5.1.4.1.1.104.1" in reason
    assert all(dicom_files(spool.outbox(ep)) == [] for ep in ENDPOINTS)


def test_no_endpoint_matched_lists_every_endpoint(tmp_path):
    conf = write_conf(tmp_path, endpoints={"mr_only": {
        "endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"},
        "filter": {"conditions": "Modality=MR"}}})
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    drop(spool, make_dataset(modality="CT"))
    daemon.run(once=True)
    [rejected] = dicom_files(spool.rejected)
    reason = Path(str(rejected) + ".reason").read_text()
    assert reason.startswith("no endpoint matched (mr_only: condition 'Modality=MR' does not hold)")


def test_the_corpus_goes_to_quarantine_with_reasons(conf, tmp_path):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    cases = corpus.build(tmp_path / "corpus")
    for case in cases:
        os.rename(tmp_path / "corpus" / case.name, spool.incoming / case.name)
    good = drop(spool, make_dataset())
    daemon.run(once=True)
    assert os.listdir(spool.incoming) == [".tmp"]
    quarantined = sorted(p for p in spool.quarantine.iterdir() if p.name != ".tmp"
                         and not p.name.endswith(".reason"))
    assert len(quarantined) == len(cases)
    reasons = [Path(str(p) + ".reason").read_text() for p in quarantined]
    for case in cases:
        matching = [r for r in reasons if f"original name: {case.name}\n" in r]
        assert len(matching) == 1 and case.expect in matching[0], case.name
    assert any(p.is_symlink() and os.readlink(p) == "/etc/shadow" for p in quarantined)
    assert uids_in(spool.outbox("pacs")) == [good.name[:-4]]  # only the good file got through


def test_accepted_is_fanned_out_again_after_a_crash(conf):
    """A crash after two of three links: restart completes the fan-out, no duplicates."""
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset(modality="CT")
    name = str(SpoolName.new(ds.SOPInstanceUID))
    path = write_dataset(ds, spool.accepted / name)
    os.link(path, spool.outbox("pacs") / name)
    daemon.run(once=True)
    assert [p.name for p in dicom_files(spool.outbox("pacs"))] == [name]
    assert [p.name for p in dicom_files(spool.outbox("ct_only"))] == [name]
    assert dicom_files(spool.outbox("mr_research")) == [] and dicom_files(spool.accepted) == []


def test_an_unexpected_error_quarantines_that_file_and_goes_on(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    bad, good = make_dataset(), make_dataset()
    drop(spool, bad), drop(spool, good)
    real_decide = daemon.decide

    def decide(head):
        if head.sop_instance_uid == bad.SOPInstanceUID:
            raise RuntimeError("boom\nforged line")
        return real_decide(head)

    daemon.decide = decide
    daemon.run(once=True)
    [quarantined] = dicom_files(spool.quarantine)
    reason = Path(str(quarantined) + ".reason").read_text()
    assert "RuntimeError: boom\\x0aforged line" in reason
    assert uids_in(spool.outbox("pacs")) == [good.SOPInstanceUID]


def test_a_full_disk_leaves_the_file_and_retries(conf, monkeypatch):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    drop(spool, ds)
    real_move = spool.move
    monkeypatch.setattr(spool, "move", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    daemon.run(once=True)
    assert len(dicom_files(spool.incoming)) == 1 and dicom_files(spool.quarantine) == []
    monkeypatch.setattr(spool, "move", real_move)
    wait_for(lambda: daemon._retry_at and min(daemon._retry_at.values()) <= time.monotonic(),
             message="retry time")
    daemon.run(once=True)
    assert uids_in(spool.outbox("pacs")) == [ds.SOPInstanceUID]


def test_hidden_names_are_ignored(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    drop(spool, make_dataset(), ".partial.dcm")
    daemon.run(once=True)
    assert (spool.incoming / ".partial.dcm").exists()


def test_a_second_filter_is_refused(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    with DaemonLock(spool.run_dir, "filter"), pytest.raises(AlreadyRunning, match="already running"):
        daemon.run(once=True)


def test_a_copy_in_progress_waits_until_complete(conf):
    """Without a close-write event, a file is taken only after it settled."""
    daemon = daemon_for(conf, settle=3600)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    path = write_dataset(ds, spool.incoming / "copying.dcm")  # watcher not running: no event
    assert daemon.scan_incoming() == 1 and path.exists()
    old = time.time() - 7200
    os.utime(path, (old, old))
    assert daemon.scan_incoming() == 0
    assert uids_in(spool.outbox("pacs")) == [ds.SOPInstanceUID]


def test_close_write_event_routes_at_once(conf):
    daemon = daemon_for(conf, settle=3600)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    with daemon.watcher:
        write_dataset(ds, spool.incoming / "copied.dcm")  # open, write, close: like cp
        wait_for(lambda: daemon.scan_incoming() == 0, message="close-write to route the copy")
    assert uids_in(spool.outbox("pacs")) == [ds.SOPInstanceUID]


def test_a_step_is_idle_when_nothing_settles_and_close_releases_the_lock(conf):
    daemon = daemon_for(conf, settle=3600)
    spool = daemon.spool.create(daemon.config.endpoints)
    daemon.start()
    try:
        assert daemon.step().idle
        with open(spool.incoming / "copying.dcm", "wb") as writer:  # a writer at work
            writer.write(b"\0" * 128)
            writer.flush()
            step = daemon.step()
        assert not step.idle and step.wait is not None and step.wait <= daemon.rescan_interval
    finally:
        daemon.close()
    with DaemonLock(spool.run_dir, "filter"):
        pass


def test_stop_request_ends_the_loop(conf):
    daemon = daemon_for(conf, rescan_interval=30)
    spool = daemon.spool.create(daemon.config.endpoints)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", daemon.run()))
    thread.start()
    ds = make_dataset()
    drop(spool, ds)
    wait_for(lambda: dicom_files(spool.outbox("pacs")), message="the file to be routed")
    daemon.request_stop()
    thread.join(30)
    assert result == {"rc": 0}


def test_reload_adds_endpoints_and_survives_a_bad_config(conf):
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    (conf / "endpoints" / "extra.ini").write_text("[endpoint]\nhost = 127.0.0.1\nport = 1107\nae_title = X\n")
    daemon.request_reload()
    daemon.reload()
    assert "extra" in daemon.config.endpoints and spool.outbox("extra").is_dir()
    (conf / "endpoints" / "broken.ini").write_text("[endpoint]\nhost = 127.0.0.1\nport = nope\n")
    daemon.reload()
    assert set(daemon.config.endpoints) == {*ENDPOINTS, "extra"}
    ds = make_dataset()
    drop(spool, ds)
    daemon.run(once=True)
    assert uids_in(spool.outbox("extra")) == [ds.SOPInstanceUID]


def test_start_up_leaves_the_receivers_temp_files_alone(conf):
    """incoming/.tmp belongs to the receiver, which may be mid-transfer when the filter restarts."""
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    receiving = spool.incoming / ".tmp" / "tmpabc123.dcm"
    receiving.write_bytes(b"half a dataset")
    stale = spool.quarantine / ".tmp" / "stale"
    stale.write_bytes(b"x")
    assert daemon.run(once=True) == 0
    assert receiving.exists()
    assert not stale.exists()


def test_recovery_does_not_resend_a_copy_already_delivered(conf):
    """Killed after linking but before unlinking accepted/: the copy that the sender has
    delivered meanwhile must not be linked into the outbox again."""
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset(modality="CT")
    path = spool.accepted / str(SpoolName.new(ds.SOPInstanceUID))
    write_dataset(ds, path)
    spool.link(path, spool.outbox("pacs"))
    spool.move_final(spool.outbox("pacs") / path.name, spool.sent("pacs"))  # delivered
    assert daemon.run(once=True) == 0
    assert dicom_files(spool.outbox("pacs")) == []
    assert uids_in(spool.outbox("ct_only")) == [ds.SOPInstanceUID]  # not yet fanned out there
    assert dicom_files(spool.accepted) == []


# -- issue 10: hostile headers reach quarantine, the filter stays small -------------------

def _quarantined_with_reason(spool: Path) -> tuple[Path, str] | None:
    files = dicom_files(spool / "quarantine")
    if not files or not Path(str(files[0]) + ".reason").exists():
        return None
    return files[0], Path(str(files[0]) + ".reason").read_text()


def _peak_rss(pid: int) -> int:
    """The process's high-water resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _hostile_file_is_quarantined_by_the_daemon(tmp_path: Path, make, filter_: dict | None,
                                               expect: str) -> int:
    """Run the real filter daemon, drop ``make(path)`` in, wait for its quarantine; then
    check the daemon still routes a normal file. Returns the daemon's peak RSS."""
    from tests.helpers import Daemon

    conf = write_conf(tmp_path, filter_=filter_, endpoints={"pacs": ENDPOINTS["pacs"]})
    spool = Spool(tmp_path / "spool").create(["pacs"])
    daemon = Daemon(conf, "filter").start()
    try:
        daemon.wait_log("filter ready")
        hostile = make(tmp_path / "hostile.dcm")
        os.rename(hostile, spool.incoming / "hostile.dcm")
        _, reason = wait_for(lambda: _quarantined_with_reason(spool.root), timeout=300,
                             message="the hostile file in quarantine/")
        assert expect in reason and "original name: hostile.dcm" in reason
        peak = _peak_rss(daemon.pid)
        print(f"filter peak RSS {peak >> 20} MiB")
        drop(spool, make_dataset())
        wait_for(lambda: dicom_files(spool.outbox("pacs")), message="a normal file routed after it")
        assert daemon.alive() and "Traceback" not in daemon.log()
    finally:
        assert daemon.stop() == 0
    return peak


def test_defect04_deflate_bomb_is_quarantined_in_bounded_memory(tmp_path):
    """A 1 MB deflated file inflating to 1 GiB: pydicom inflated it whole (RSS > 2 GiB),
    and accepted it. Inflated in chunks, it is refused at the cap in bounded memory."""
    from tests.test_header import deflate_bomb

    def make(path: Path) -> Path:
        return deflate_bomb(path, 1024 * 1024 * 1024)

    peak = _hostile_file_is_quarantined_by_the_daemon(
        tmp_path, make, {"max_inflated_size": "256 MiB"},
        "inflates to more than 256 MiB (limit: [filter] max_inflated_size)")
    assert peak < 200 * 1024 * 1024, f"filter peaked at {peak >> 20} MiB"


def test_defect05_a_million_elements_are_quarantined_in_bounded_memory(tmp_path):
    """1 M empty private elements (8 MB): pydicom's read held ~400 MiB; the default
    max_header_elements refuses the file before pydicom parses it."""
    from tests.test_header import many_elements

    def make(path: Path) -> Path:
        return many_elements(path, 1_000_000)

    peak = _hostile_file_is_quarantined_by_the_daemon(tmp_path, make, None, "max_header_elements")
    assert peak < 200 * 1024 * 1024, f"filter peaked at {peak >> 20} MiB"


def test_defect03_invalid_transfer_syntax_uid_is_quarantined(conf):
    """A 69-character Transfer Syntax UID passed the filter and then stopped the sender."""
    from tests.test_header import _body_bytes, _meta_bytes

    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset()
    body = _body_bytes(ds)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = _meta_bytes(ds, "1." + "2" * 67) + body
    (spool.incoming / "long-ts.dcm").write_bytes(data)
    assert daemon.run(once=True) == 0
    [quarantined] = dicom_files(spool.quarantine)
    reason = Path(str(quarantined) + ".reason").read_text()
    assert "invalid Transfer Syntax UID" in reason and "(0002,0010)" in reason
    assert dicom_files(spool.outbox("pacs")) == []


def test_defect18_one_trailing_pad_byte_is_routed_unchanged(conf):
    """PixelMed's odd-length data set + one 0x00: routed as is, not quarantined."""
    daemon = daemon_for(conf)
    spool = daemon.spool.create(daemon.config.endpoints)
    ds = make_dataset(modality="CT")
    staging = write_dataset(ds, spool.root.parent / "staging" / "padded.dcm")
    data = staging.read_bytes() + b"\0"
    staging.write_bytes(data)
    os.rename(staging, spool.incoming / "padded.dcm")
    assert daemon.run(once=True) == 0
    assert dicom_files(spool.quarantine) == []
    routed = dicom_files(spool.outbox("pacs"))
    assert [p.read_bytes() for p in routed] == [data]
