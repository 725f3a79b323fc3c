"""pytest configuration: make the repository importable and name the long tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def send_patches():
    """What ``dicomflow send``'s ``main`` installs, for tests that drive a ``Sender`` in
    this process (nothing in ``pipeline.dicom`` patches pynetdicom at import)."""
    from pipeline.dicom import patches

    patches.install("send")


@pytest.fixture
def cleanup():
    """Things to ``stop()`` after the test (peers, daemons), last started first."""
    items: list = []
    yield items
    for item in reversed(items):
        try:
            item.stop()
        except Exception:  # noqa: BLE001 - best effort teardown
            pass


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The reliability suite's figures (issue 6): sent, acknowledged, delivered, lost…"""
    from tests.reliability import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("DicomFlow reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
