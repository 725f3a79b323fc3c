"""``dicomflow retry``: failed/ back to outbox/, sidecars dropped."""

from __future__ import annotations

from pathlib import Path

from pipeline import config as config_module
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from tests.helpers import run_cli, write_conf
from tests.reliability import tmpfs

ENDPOINT = {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "PACS"}}


def failed_files(tmp_path: Path, count: int):
    conf = write_conf(tmp_path, endpoints={"pacs": ENDPOINT})
    spool = Spool(config_module.load(conf).spool).create(["pacs"])
    paths = []
    for index in range(count):
        path = spool.write_bytes(spool.failed("pacs"), str(SpoolName.new(f"1.2.{index}")), b"x")
        spool.write_sidecar(path, ".error", "status 0xA900")
        paths.append(path)
    return conf, spool, paths


def test_retry_all_moves_back_and_drops_sidecars(tmp_path: Path) -> None:
    conf, spool, paths = failed_files(tmp_path, 3)
    result = run_cli(conf, "retry", "pacs", "--all")
    assert result.returncode == 0, result.stderr
    assert "3 file(s)" in result.stdout
    assert sorted(p.name for p in spool.list_stage(spool.outbox("pacs"))) == sorted(p.name for p in paths)
    assert list(spool.failed("pacs").iterdir()) == [spool.failed("pacs") / ".tmp"]


def test_retry_named_files(tmp_path: Path) -> None:
    conf, spool, paths = failed_files(tmp_path, 3)
    result = run_cli(conf, "retry", "pacs", paths[0].name, str(paths[2]))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in spool.list_stage(spool.outbox("pacs"))} == {paths[0].name, paths[2].name}
    assert spool.list_stage(spool.failed("pacs")) == [paths[1]]
    assert (spool.failed("pacs") / (paths[1].name + ".error")).exists()


def test_retry_refuses_unknown_files_and_endpoints(tmp_path: Path) -> None:
    conf, spool, paths = failed_files(tmp_path, 1)
    assert run_cli(conf, "retry", "pacs", "nope.dcm").returncode == 1
    assert run_cli(conf, "retry", "pacs", "/etc/passwd").returncode == 1
    assert run_cli(conf, "retry", "pacs", paths[0].name + ".error").returncode == 1
    assert run_cli(conf, "retry", "other", "--all").returncode == 1
    assert run_cli(conf, "retry", "../x", "--all").returncode == 1
    assert spool.list_stage(spool.failed("pacs")) == paths


def test_defect02_sibling_retry_survives_a_move_the_disk_refuses(tmp_path: Path) -> None:
    conf, spool, paths = failed_files(tmp_path, 2)
    with tmpfs(spool.outbox("pacs"), 1):  # outbox/ on another mount: EXDEV on every move
        result = run_cli(conf, "retry", "pacs", "--all")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("cannot move") == 2 and "left in failed/" in result.stderr
    assert spool.list_stage(spool.failed("pacs")) == paths  # nothing lost, sidecars kept
    assert all((spool.failed("pacs") / (p.name + ".error")).exists() for p in paths)


def test_every_command_has_help_with_an_example(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    for command in ("receive", "filter", "send", "up", "down", "status", "retry", "check", "echo", "route"):
        result = run_cli(conf, command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "example:" in result.stdout and "dicomflow" in result.stdout, command
