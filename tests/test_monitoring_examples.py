"""examples/monitoring/ stays valid: promtool accepts the config and the rules, the rules'
unit tests pass, every alert is tested both ways, and the rules only use metrics that
``dicomflow web`` exports."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.helpers import REPO

EXAMPLES = REPO / "examples" / "monitoring"
PROMTOOL = "/usr/bin/promtool"
TIMEOUT = 60.0

# What `dicomflow web` exports on /metrics. Must match the metric table in the README's
# Monitoring section: change both together.
METRICS = {
    "dicomflow_received_instances_total",
    "dicomflow_received_bytes_total",
    "dicomflow_rejected_instances_total",
    "dicomflow_quarantined_instances_total",
    "dicomflow_sent_instances_total",
    "dicomflow_failed_instances_total",
    "dicomflow_send_retries_total",
    "dicomflow_retried_instances_total",
    "dicomflow_deleted_instances_total",
    "dicomflow_store_duration_seconds",
    "dicomflow_send_duration_seconds",
    "dicomflow_daemon_up",
    "dicomflow_stage_files",
    "dicomflow_stage_oldest_age_seconds",
    "dicomflow_endpoint_files",
    "dicomflow_endpoint_oldest_age_seconds",
    "dicomflow_endpoint_state",
    "dicomflow_studies_waiting",
    "dicomflow_studies_queued",
    "dicomflow_spool_free_bytes",
    "dicomflow_spool_disk_floor_bytes",
    "dicomflow_journal_bytes",
}
HISTOGRAMS = {"dicomflow_store_duration_seconds", "dicomflow_send_duration_seconds"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")

ALERT = re.compile(r"^\s*- alert:\s*(\S+)\s*$", re.MULTILINE)
METRIC = re.compile(r"\bdicomflow_[a-z0-9_]+")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool in the examples directory, as its README says to: the config names
    ``alerts.yml`` and the tests name their rule files relative to it. Fails rather than
    skips when promtool is missing, so that CI cannot pass without checking."""
    if not os.access(PROMTOOL, os.X_OK):
        pytest.fail(f"{PROMTOOL} is missing: apt-get install prometheus (CI installs it)")
    return subprocess.run([PROMTOOL, *args], cwd=EXAMPLES, capture_output=True, text=True,
                          timeout=TIMEOUT)


def assert_success(result: subprocess.CompletedProcess[str]) -> str:
    """promtool's exit code and its own SUCCESS line, with its output when either is wrong.
    Returns the output for further checks."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output, output
    assert "FAILED" not in output, output
    return output


def alert_names() -> list[str]:
    """The alerts of alerts.yml, by line parsing (PyYAML is not a dependency). The count
    is checked against promtool's own in ``test_rules_are_valid``."""
    return ALERT.findall((EXAMPLES / "alerts.yml").read_text())


def alert_blocks() -> dict[str, str]:
    """Each alert's text, from its ``- alert:`` line to the next one."""
    text = (EXAMPLES / "alerts.yml").read_text()
    matches = list(ALERT.finditer(text))
    ends = [match.start() for match in matches[1:]] + [len(text)]
    return {match.group(1): text[match.start():end] for match, end in zip(matches, ends, strict=True)}


def unit_test_cases() -> dict[str, set[bool]]:
    """For each alert name in alerts_test.yml, which kinds of case it has: True for a case
    that expects it to fire, False for ``exp_alerts: []`` (it must not fire)."""
    cases: dict[str, set[bool]] = {}
    name = None
    for line in (EXAMPLES / "alerts_test.yml").read_text().splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith("alertname:"):
            name = stripped.split(":", 1)[1].strip()
        elif stripped.startswith("exp_alerts:") and name is not None:
            cases.setdefault(name, set()).add(stripped.split(":", 1)[1].strip() != "[]")
            name = None
    return cases


def known_metric(name: str) -> bool:
    """A name /metrics exports: one of METRICS, or a histogram's series."""
    if name in METRICS:
        return True
    return any(name.removesuffix(suffix) in HISTOGRAMS
               for suffix in HISTOGRAM_SERIES if name.endswith(suffix))


def test_config_is_valid() -> None:
    """Checks the scrape config and, through ``rule_files``, that it finds alerts.yml."""
    output = assert_success(promtool("check", "config", "prometheus.yml"))
    assert "1 rule files found" in output, output


def test_rules_are_valid() -> None:
    """Also confirms that the line parsing of the other tests sees every rule."""
    output = assert_success(promtool("check", "rules", "alerts.yml"))
    assert f"SUCCESS: {len(alert_names())} rules found" in output, output


def test_rule_unit_tests_pass() -> None:
    assert_success(promtool("test", "rules", "alerts_test.yml"))


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """An alert without a firing case may never fire; one without a quiet case may fire
    on normal operation (a short outage, a web restart)."""
    cases = unit_test_cases()
    names = alert_names()
    assert len(names) == len(set(names)), names
    for name in names:
        assert cases.get(name) == {True, False}, f"{name}: cases {cases.get(name)} in alerts_test.yml"
    assert set(cases) <= set(names), f"alerts_test.yml tests unknown alerts: {set(cases) - set(names)}"


def test_every_alert_has_for_severity_and_annotations() -> None:
    """Operators rely on these: ``for`` keeps blips quiet, severity routes the alert,
    summary and description say what to do."""
    for name, block in alert_blocks().items():
        for field in ("for:", "severity:", "summary:", "description:"):
            assert re.search(rf"^\s*{field}", block, re.MULTILINE), f"{name} has no {field}"


def test_rules_use_only_exported_metrics() -> None:
    """A misspelt metric makes a rule that never fires and that promtool accepts."""
    used = set(METRIC.findall((EXAMPLES / "alerts.yml").read_text()))
    assert used, "no dicomflow_* metric found in alerts.yml"
    assert {name for name in used if not known_metric(name)} == set()
