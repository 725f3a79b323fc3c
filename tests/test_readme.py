"""The README's configuration reference and the shipped conf/ agree with the parser."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pipeline import config, config_keys
from tests.helpers import REPO


def readme_table(kind: str) -> str:
    """The table under a file kind's heading in the README's Configuration section."""
    text = (REPO / "README.md").read_text()
    section = text.split(config_keys.HEADINGS[kind] + "\n", 1)[1]
    section = section.split("\n### ", 1)[0].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


@pytest.mark.parametrize("kind", [config_keys.ROUTER, config_keys.ENDPOINT])
def test_reference_tables_are_the_table_of_options(kind: str) -> None:
    """Keys, defaults and meanings: regenerate with ``python -m pipeline.config_keys --markdown``."""
    assert readme_table(kind) == config_keys.markdown(kind)


def test_markdown_command_prints_both_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_keys.main(["--markdown"]) == 0
    out = capsys.readouterr().out
    for kind, heading in config_keys.HEADINGS.items():
        assert f"{heading}\n\n{config_keys.markdown(kind)}\n" in out


def test_the_parser_takes_every_key_of_the_table(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """Every (section, key) the loaders ask for, recorded while loading full files."""
    seen: list[tuple[str, str, str]] = []
    original = config._Section.take

    def recording(self: config._Section, opt: config_keys.Option) -> Any:
        seen.append((self.kind, self.name, opt.key))
        return original(self, opt)

    monkeypatch.setattr(config._Section, "take", recording)
    conf = tmp_path / "conf"
    (conf / "endpoints").mkdir(parents=True)
    (conf / "router.ini").write_text("[router]\nspool = s\n[tls]\n[filter]\n")
    router = config.load_router(conf)
    (conf / "endpoints" / "x.ini").write_text("[endpoint]\nhost = h\nport = 1\nae_title = A\n")
    config.load_endpoint(conf / "endpoints" / "x.ini", router)
    assert sorted(seen) == sorted((o.kind, o.section, o.key) for o in config_keys.OPTIONS)


def shipped_values(path: str) -> dict[tuple[str, str], str]:
    """(section, key) -> value of every key a shipped file sets or shows commented out."""
    values: dict[tuple[str, str], str] = {}
    commented: dict[tuple[str, str], str] = {}
    section = ""
    for line in (REPO / path).read_text().splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = header.group(1)
        elif match := re.fullmatch(r"([;#]?)\s*(\w+)\s*=\s*(.*?)\s*", line):
            into = commented if match.group(1) else values
            into.setdefault((section, match.group(2)), match.group(3))
    return commented | values  # a key set for real wins over prose that looks like one


@pytest.mark.parametrize("path,kind", [
    ("conf/router.ini", config_keys.ROUTER),
    ("conf/endpoints/pacs.ini", config_keys.ENDPOINT),
])
def test_shipped_conf_mentions_every_key(path: str, kind: str) -> None:
    """Each key is in the shipped file, and where it has a default, with that default."""
    values = shipped_values(path)
    missing = [o.key for o in config_keys.options(kind) if (o.section, o.key) not in values]
    assert missing == [], f"{path} does not mention {missing}"
    differing = [(o.key, values[o.section, o.key], o.default) for o in config_keys.options(kind)
                 if o.default is not None and values[o.section, o.key] != o.default]
    assert differing == [], f"{path}: (key, shipped, default) {differing}"


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


def test_every_shaping_example_parses() -> None:
    """The README's table of operations: each example is a line the parser accepts, and
    the table names every kind of operation the parser has."""
    from pipeline.shaping.operations import parse_operations

    text = (REPO / "README.md").read_text().split("\n## Shaping\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `")]
    examples = [row[1].strip().strip("`").replace("\\|", "|") for row in rows]
    assert len(examples) >= 8
    kinds = set()
    for example in examples:
        operations = parse_operations(example)
        assert len(operations.lines) == 1, example
        kinds.add(type(operations.lines[0]).__name__)
    assert kinds == {"SetAttribute", "DeleteAttribute", "DeletePrivate", "ReplaceValue",
                     "Conditional"}
    block = text.split("```ini\n", 1)[1].split("```", 1)[0]
    assert parse_operations(block.split("operations =", 1)[1].replace("\n    ", "\n"))
