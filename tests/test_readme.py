"""The README's configuration reference and the shipped conf/ agree with the parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import config
from tests.helpers import REPO


def documented_keys(heading: str) -> set[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| (\w+) \|", section, re.M)
    return {(s, k) for s, k in rows if s != "section"}


def parsed_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[set, set]:
    """Every (section, key) the parser asks for, recorded while loading full files."""
    seen: list[tuple[str, str]] = []
    original = config._Section.take

    def recording(self, key, *args, **kwargs):
        seen.append((self.name, key))
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(config._Section, "take", recording)
    conf = tmp_path / "conf"
    (conf / "endpoints").mkdir(parents=True)
    (conf / "router.ini").write_text("[router]\nspool = s\n[tls]\n[filter]\n")
    router = config.load_router(conf)
    router_keys = set(seen)
    seen.clear()
    (conf / "endpoints" / "x.ini").write_text("[endpoint]\nhost = h\nport = 1\nae_title = A\n")
    config.load_endpoint(conf / "endpoints" / "x.ini", router)
    return router_keys, set(seen)


def test_reference_tables_match_the_parser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    router_keys, endpoint_keys = parsed_keys(monkeypatch, tmp_path)
    assert documented_keys("### `conf/router.ini`") == router_keys
    assert documented_keys("### `conf/endpoints/<name>.ini`") == endpoint_keys


@pytest.mark.parametrize("path,heading", [
    ("conf/router.ini", "### `conf/router.ini`"),
    ("conf/endpoints/pacs.ini", "### `conf/endpoints/<name>.ini`"),
])
def test_shipped_conf_mentions_every_key(path: str, heading: str) -> None:
    text = (REPO / path).read_text()
    missing = [key for _, key in documented_keys(heading)
               if not re.search(rf"^[;#]?\s*{key}\s*=", text, re.M)]
    assert missing == [], f"{path} does not mention {missing}"


def test_readme_starts_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("examples/00-demo/run.sh")
    assert commands[1].endswith(".venv/bin/python -m pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in ci


def test_nothing_refers_to_a_document_outside_the_repository() -> None:
    """Comments and docs point to the README or a file in the repository, never outside."""
    import subprocess

    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    forbidden = ("DES" + "IGN.md", "../" + "shared")  # split: this file must pass too
    offenders = []
    for name in filter(None, names):
        path = REPO / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        text = data.decode("utf-8", "replace")
        offenders += [f"{name}: {word}" for word in forbidden if word in text]
    assert offenders == []
