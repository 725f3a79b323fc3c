"""``dicomflow up / status / retry / down`` against a real supervisord and real peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config as config_module
from pipeline.spool import Spool
from services.supervise import Supervisor
from tests.helpers import (
    REPO,
    dicom_files,
    make_dataset,
    make_files,
    router_port,
    run_cli,
    wait_for,
    write_conf,
    write_dataset,
)
from tests.peers import StoreSCP, storescu

# End to end: run again with DICOMFLOW_FASTPATH=0 by .ci/run (README, Development).
pytestmark = pytest.mark.e2e


def endpoint(scp: StoreSCP) -> dict:
    return {"endpoint": {"host": "127.0.0.1", "port": scp.port, "ae_title": scp.ae_title},
            "retry": {"probe_backoff_cap": "1s"}}


def pids(conf: Path) -> dict[str, int]:
    api = Supervisor(config_module.load(conf)).rpc().supervisor
    return {info["name"]: info["pid"] for info in api.getAllProcessInfo()}


@pytest.fixture
def pipeline(tmp_path: Path):
    first = StoreSCP(tmp_path / "first", "FIRST").start()
    second = StoreSCP(tmp_path / "second", "SECOND").start()
    conf = write_conf(tmp_path, router={"log_level": "INFO"}, endpoints={"first": endpoint(first)})
    yield conf, first, second
    run_cli(conf, "down", timeout=400)
    first.stop()
    second.stop()


def status(conf: Path, code: int = 0) -> dict:
    """``status --json``; ``code``: its exit status (0 all running, 3 stopped, 4 partly)."""
    result = run_cli(conf, "status", "--json")
    assert result.returncode == code, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_up_status_add_endpoint_retry_down(pipeline, tmp_path: Path) -> None:
    conf, first, second = pipeline
    up = run_cli(conf, "up", timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "send-first" in up.stdout and "RUNNING" in up.stdout
    port = router_port(conf)
    sent = storescu(port, make_files(tmp_path / "a", 3))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: len(first.files()) == 3, message="3 files at FIRST")
    wait_for(lambda: status(conf)["endpoints"]["first"]["sent"]["count"] == 3, message="status sent=3")
    report = status(conf)
    assert report["processes"]["receive"]["running"] and report["processes"]["filter"]["running"]
    assert report["endpoints"]["first"]["sender_running"]

    # Add an endpoint: one command applies it; the others keep running.
    before = pids(conf)
    ini = "\n".join(f"{k} = {v}" for k, v in endpoint(second)["endpoint"].items())
    (conf / "endpoints" / "second.ini").write_text(f"[endpoint]\n{ini}\n")
    again = run_cli(conf, "up", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started send-second" in again.stdout
    after = pids(conf)
    for name in ("receive", "filter", "send-first"):
        assert after[name] == before[name], f"{name} was restarted"
    filter_log = Path(config_module.load(conf).spool) / "log" / "filter.log"
    wait_for(lambda: "second" in filter_log.read_text(), message="filter reloaded the endpoint set")
    sent = storescu(port, make_files(tmp_path / "b", 2))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: len(first.files()) == 5 and len(second.files()) == 2, message="fan-out to both")

    # Retry: a file put back from failed/ by the command is delivered.
    spool = Spool(config_module.load(conf).spool)
    (source,) = make_files(tmp_path / "c", 1)
    target = spool.write_bytes(spool.failed("first"), "20261128T000000.000000-000001-1.2.3.dcm",
                               source.read_bytes())
    spool.write_sidecar(target, ".error", "status 0xA700 (test)")
    assert status(conf)["endpoints"]["first"]["failed"]["count"] == 1
    retried = run_cli(conf, "retry", "first", "--all")
    assert retried.returncode == 0, retried.stderr
    wait_for(lambda: len(first.files()) == 6, message="retried file delivered")
    assert dicom_files(spool.failed("first")) == []

    # Remove an endpoint: its sender stops, its folders stay, status calls it orphaned.
    (conf / "endpoints" / "second.ini").unlink()
    removed = run_cli(conf, "up", timeout=120)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "stopped send-second" in removed.stdout
    assert "send-second" not in pids(conf)
    assert status(conf)["endpoints"]["second"]["state"] == "orphaned"

    down = run_cli(conf, "down", timeout=400)
    assert down.returncode == 0, down.stderr
    report = status(conf, code=3)
    assert not report["processes"]["receive"]["running"]
    assert not report["endpoints"]["first"]["sender_running"]


def test_up_refuses_a_bad_configuration(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, router={"port": "99999"})
    result = run_cli(conf, "up")
    assert result.returncode == 1
    assert "[router] port" in result.stderr


def test_down_when_not_running(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    result = run_cli(conf, "down")
    assert result.returncode == 0 and "not running" in result.stdout


def test_defect09_status_and_route_show_non_utf8_names(tmp_path: Path) -> None:
    """Names and sidecars from disk that are not UTF-8 are shown escaped, never crash a command."""
    conf = write_conf(tmp_path, endpoints={"pacs": {"endpoint": {"host": "127.0.0.1", "port": 1104,
                                                                  "ae_title": "PACS"}}})
    spool = Spool(config_module.load(conf).spool).create(["pacs"])
    failed = spool.write_bytes(spool.failed("pacs"), "20261128T000000.000000-000001-1.2.3.dcm", b"x")
    spool.write_bytes(failed.parent, failed.name + ".error", b"status 0xC000 for \xff\xfe\x1b[2J\n")
    for args in (("status",), ("status", "--json")):
        result = run_cli(conf, *args)
        assert result.returncode == 3, result.stderr  # nothing runs
        assert "\\xff\\xfe\\x1b[2J" in result.stdout.replace("\\\\", "\\")
        assert "\x1b" not in result.stdout and "Traceback" not in result.stderr
    bad = os.fsencode(tmp_path) + b"/DOE \xff.dcm"
    write_dataset(make_dataset(), Path(os.fsdecode(bad)))
    cmd = [sys.executable, "-m", "services.cli", "route", bad, "--conf", str(conf)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"DOE \\xff.dcm: route to pacs" in result.stdout
    result.stdout.decode("utf-8")


def supervisord_pid(spool: Path) -> int:
    return int((spool / "run" / "supervisord.pid").read_text())


@pytest.mark.slow
def test_defect08_a_second_conf_dir_cannot_take_over_a_spool(tmp_path: Path) -> None:
    first = StoreSCP(tmp_path / "first", "FIRST").start()
    conf_a = write_conf(tmp_path / "a", router={"log_level": "INFO"}, endpoints={"first": endpoint(first)})
    spool = config_module.load(conf_a).spool
    conf_b = write_conf(tmp_path / "b", router={"log_level": "INFO", "spool": str(spool)},
                        endpoints={"other": endpoint(first)})
    try:
        up = run_cli(conf_a, "up", timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        before, rendered = pids(conf_a), (spool / "run" / "supervisord.conf").read_bytes()

        refused = run_cli(conf_b, "up", timeout=120)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"belongs to the router configured in {conf_a.resolve()}" in refused.stderr
        assert "--force" in refused.stderr
        assert pids(conf_a) == before, "A's programs were touched"
        assert (spool / "run" / "supervisord.conf").read_bytes() == rendered
        assert not (spool / "outbox" / "other").exists()
        sent = storescu(router_port(conf_a), make_files(tmp_path / "files", 2))
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(first.files()) == 2, message="A still delivers")

        # the siblings: daemons by hand, down, status, retry with B's conf
        for args in (("filter",), ("receive",), ("send", "other")):
            result = run_cli(conf_b, *args)
            assert result.returncode == 1 and "belongs to the router" in result.stderr, (args, result.stderr)
        down = run_cli(conf_b, "down")
        assert down.returncode == 1 and "belongs to the router" in down.stderr
        assert pids(conf_a) == before
        shown = run_cli(conf_b, "status")
        # A's receive and filter run in the shared spool; B's sender (send-other) does not
        assert shown.returncode == 4 and "belongs to the router" in shown.stderr, shown.stdout
        assert run_cli(conf_b, "retry", "other", "--all").returncode == 1

        # a deliberate take-over
        taken = run_cli(conf_b, "up", "--force", timeout=120)
        assert taken.returncode == 0, taken.stdout + taken.stderr
        assert f"taking over spool {spool} from {conf_a.resolve()}" in taken.stdout
        assert set(pids(conf_b)) == {"receive", "filter", "send-other"}
        assert run_cli(conf_a, "up", timeout=120).returncode == 1  # now A is the stranger
        assert run_cli(conf_b, "down", timeout=400).returncode == 0
    finally:
        for conf in (conf_a, conf_b):
            run_cli(conf, "down", "--force", timeout=400)
        first.stop()


def test_defect08_owner_claims_and_refusals(tmp_path: Path) -> None:
    from pipeline import owner
    from pipeline.errors import SpoolError

    spool = Spool(tmp_path / "spool").create()
    conf_a, conf_b = tmp_path / "a", tmp_path / "b"
    # a spool brought up before owner files existed: its rendered supervisord.conf names the owner
    (spool.run_dir / "supervisord.conf").write_text(
        f"[program:receive]\ncommand = /usr/bin/python3 -m services.cli receive --conf {conf_a}\n")
    assert owner.owner(spool) == conf_a.resolve()
    with pytest.raises(SpoolError, match="belongs to the router configured in"):
        owner.claim(spool, conf_b)
    assert owner.claim(spool, conf_a) is None and (spool.run_dir / "owner").exists()
    owner.check(spool, conf_a)
    with pytest.raises(SpoolError, match=r"dicomflow up --force"):
        owner.check(spool, conf_b)
    assert owner.claim(spool, conf_b, force=True) == conf_a.resolve()
    assert owner.owner(spool) == conf_b.resolve()
    fresh = Spool(tmp_path / "fresh").create()
    assert owner.claim(fresh, conf_a) is None and owner.owner(fresh) == conf_a.resolve()
