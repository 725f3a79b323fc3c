"""Logging: one line per event, escaped untrusted text, JSON option, pynetdicom routed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.names import escape, is_valid_ae_title, is_valid_uid
from tests.helpers import REPO

SCRIPT = """
import logging, sys
from pipeline.log import setup, logger, escape
setup("receive", level="INFO", json={json}, pynetdicom_level="WARNING")
logger.bind(endpoint="pacs", file="a.dcm").info("stored from {{}}", escape("EVIL\\nINFO forged line"))
logging.getLogger("pynetdicom.assoc").warning("peer said\\nsomething")
logging.getLogger("pynetdicom.dsutils").info("dataset dump with PatientName (hidden at WARNING)")
"""


def run(json_mode: bool) -> list[str]:
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(json=json_mode)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr.strip().splitlines()


def test_text_lines_are_single_and_escaped() -> None:
    lines = run(False)
    assert len(lines) == 2, lines
    assert "receive endpoint=pacs file=a.dcm | stored from EVIL\\x0aINFO forged line" in lines[0]
    assert "WARNING" in lines[1] and "peer said\\x0asomething" in lines[1]


def test_json_lines() -> None:
    lines = run(True)
    assert len(lines) == 2
    record = json.loads(lines[0])["record"]
    assert record["message"] == "stored from EVIL\\x0aINFO forged line"
    assert record["extra"]["endpoint"] == "pacs"


def test_escape_and_validators() -> None:
    assert escape("a\r\nb\x00\\") == "a\\x0d\\x0ab\\x00\\\\"
    assert escape(b"\xff\n") == "\\xff\\x0a"
    assert escape("x" * 300).endswith("…") and len(escape("x" * 300)) == 201
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert not is_valid_uid("1.2.abc") and not is_valid_uid("1" * 65) and not is_valid_uid("1..2")
    assert not is_valid_uid("../1") and not is_valid_uid("")
    assert is_valid_ae_title("CT_01") and is_valid_ae_title("A B")
    assert not is_valid_ae_title("") and not is_valid_ae_title("   ") and not is_valid_ae_title("A" * 17)
    assert not is_valid_ae_title("A\\B") and not is_valid_ae_title("A\nB")


def test_defect09_names_from_disk_escape_as_bytes() -> None:
    """A name that is not UTF-8 comes back as valid UTF-8 text, its bad bytes as \\xNN."""
    name = os.fsdecode(b"DOE \xff\xfe\xc3\xa9.dcm")  # surrogates for the undecodable bytes
    for value in (name, os.fsencode(name), Path(name)):
        shown = escape(value)
        assert shown == "DOE \\xff\\xfe\u00e9.dcm", shown
        shown.encode("utf-8")  # the .reason sidecar and the log line are written as UTF-8
    assert escape("a\u2028b\u202e\ud800") == "a\\u2028b\\u202e\\ud800"  # no forged lines, no bidi tricks
    assert json.loads(json.dumps(escape(name), ensure_ascii=False)) == escape(name)


def test_defect15_shown_name_hides_hand_dropped_names() -> None:
    from pipeline.log import shown_name

    standard = "20261128T060102.123456-000042-1.2.840.113619.2.55.3.dcm"
    assert shown_name(standard) == standard
    assert shown_name("20261128T060102.123456-000042-nouid.dcm").endswith("nouid.dcm")
    for name in ("DOE^JOHN_12345.dcm", "1.2.3.dcm", standard + ".DOE", "x\n" + standard):
        assert shown_name(name) == "(hand-dropped)"
