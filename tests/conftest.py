"""pytest configuration: make the repository importable and name the long tests."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def send_patches():
    """The test process runs with what ``dicomflow send``'s ``main`` installs, from the
    first test on (nothing in ``pipeline.dicom`` patches pynetdicom at import): tests
    that drive a ``Sender`` or an SCU in this process see what the daemon sees, whatever
    order the tests run in. ``DICOMFLOW_FASTPATH=0`` leaves the speed-ups out here too."""
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


def pytest_sessionfinish(session, exitstatus) -> None:
    """On an xdist worker: hand the figures its tests recorded to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        from tests.interop_corpus import FOUND
        from tests.reliability import FIGURES, QUARANTINE_REASONS

        output["dicomflow_figures"] = json.dumps(
            {"figures": FIGURES, "reasons": QUARANTINE_REASONS, "found": FOUND})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """On the xdist controller: add a finished worker's figures to the summary's."""
    data = getattr(node, "workeroutput", {}).get("dicomflow_figures")
    if not data:
        return
    from tests.interop_corpus import FOUND
    from tests.reliability import FIGURES, QUARANTINE_REASONS

    received = json.loads(data)
    for scenario, counts in received["figures"].items():
        FIGURES.setdefault(scenario, Counter()).update(counts)
    QUARANTINE_REASONS.update(received["reasons"])
    FOUND.extend(received["found"])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The reliability suite's figures (issue 6): sent, acknowledged, delivered, lost…;
    then the interoperability suite's peer limits and findings (issue 12)."""
    from tests.interop_corpus import summary_lines as interop_lines
    from tests.reliability import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("DicomFlow reliability figures")
        for line in lines:
            terminalreporter.write_line(line)

    found = interop_lines()
    if found:
        terminalreporter.section("Interoperability: peer limits and findings")
        for line in found:
            terminalreporter.write_line(line)
