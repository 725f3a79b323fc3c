"""The web daemon's status page: ``dicomflow status`` as plain HTML that reloads itself.

For the people who are not on the router's shell (the PACS team, the night desk): the
daemons, the stages, each endpoint with its state and queue, the studies waiting, and
the last failures with their reasons. One page, no script, no external resource (it is
served from hospital networks without internet access), a ``<meta http-equiv=refresh>``
for the refresh.

No patient data: the report has none (``status`` reads no DICOM header), and the
failures come from the journal's events — file names, endpoints and reasons, never its
Patient ID or Accession Number columns. Everything shown is HTML-escaped: file names,
reasons and AE titles may come from the network.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from datetime import UTC, datetime

from pipeline.journal.reader import Entry
from services.status import describe_state, expected_daemons, format_age, short_uid

MAX_WAITING_ROWS = 20
REASON_LIMIT = 300  # characters of a reason shown
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #666; margin: 0; }
table { border-collapse: collapse; } th, td { padding: .25em .8em; text-align: left; }
th { border-bottom: 2px solid #ccc; } td { border-bottom: 1px solid #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #17692e; } .bad { color: #a30d0d; font-weight: 600; } .warn { color: #8a5a00; }
.reason { font-family: ui-monospace, monospace; font-size: .9em; }
"""
GOOD_STATES = {"delivering", "idle"}
BAD_STATES = {"down", "not running", "orphaned", "stopped"}


def render(report: dict, failures: Iterable[Entry], refresh: float, journal_note: str = "") -> str:
    """The whole page for one status report and the newest failure events."""
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{max(1, round(refresh))}">',
        "<title>DicomFlow status</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>DicomFlow</h1>",
        f'<p class="meta">spool {_e(report["spool"])} · conf {_e(report["conf"])} · '
        f'<span id="time">{_e(report["time"])}</span> · refreshes every {refresh:g} s</p>',
        *_daemons(report), *_stages(report), *_endpoints(report), *_waiting(report),
        *_failures(list(failures), journal_note), "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(section: str, title: str, head: list[str], rows: list[list[str]], empty: str) -> list[str]:
    """A section with a table; ``rows`` are cells already escaped (a cell may start
    with ``<td`` to carry its own class)."""
    out = [f'<section id="{section}"><h2>{_e(title)}</h2>']
    if not rows:
        return out + [f"<p>{_e(empty)}</p></section>"]
    out.append("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row)
                   + "</tr>")
    return out + ["</table></section>"]


def _number(value: int) -> str:
    return f'<td class="n">{value}</td>'


def _daemons(report: dict) -> list[str]:
    """Every daemon that should run (as ``status`` decides its exit code), with its pid
    where the report has one."""
    rows = []
    for name, running in expected_daemons(report).items():
        pid = report["processes"].get(name, {}).get("pid")
        state = ("<td class=\"bad\">NOT RUNNING</td>" if not running else
                 f'<td class="ok">running, pid {pid}</td>' if pid else '<td class="ok">running</td>')
        rows.append([_e(name), state])
    return _table("daemons", "Daemons", ["daemon", "state"], rows, "none")


def _stages(report: dict) -> list[str]:
    rows = [[_e(stage), _number(info["count"]), _e(format_age(info["oldest_age_s"]))]
            for stage, info in report["stages"].items()]
    return _table("stages", "Stages", ["stage", "files", "oldest"], rows, "none")


def _state_cell(info: dict) -> str:
    state = info["state"]
    css = "ok" if state in GOOD_STATES else "bad" if state in BAD_STATES else "warn"
    return f'<td class="{css}">{_e(describe_state(info))}</td>'


def _endpoints(report: dict) -> list[str]:
    rows = []
    for name, info in report["endpoints"].items():
        studies = info.get("studies")
        queued = "-" if studies is None else str(studies["queued"]["count"])
        rows.append([_e(name), _e(info["destination"] or "-"), _state_cell(info),
                     _number(info["outbox"]["count"]), _e(format_age(info["outbox"]["oldest_age_s"])),
                     _number(info["sent"]["count"]), _number(info["failed"]["count"]), _e(queued),
                     f'<span class="reason">{_e((info["last_error"] or "")[:REASON_LIMIT])}</span>'])
    return _table("endpoints", "Endpoints",
                  ["endpoint", "destination", "state", "outbox", "oldest", "sent", "failed",
                   "studies queued", "last error"], rows, "no endpoint configured")


def _waiting(report: dict) -> list[str]:
    waiting = sorted(((name, row) for name, info in report["endpoints"].items()
                      for row in info.get("studies", {}).get("waiting", [])),
                     key=lambda item: -(item[1]["age_s"] or 0.0))
    rows = [[_e(name), f'<span title="{_e(row["study"])}">{_e(short_uid(row["study"]))}</span>',
             _e(row["level"]), _number(row["instances"]), _e(format_age(row["age_s"])),
             _e(format_age(row["idle_s"]))] for name, row in waiting[:MAX_WAITING_ROWS]]
    out = _table("studies", f"Studies waiting ({len(waiting)})",
                 ["endpoint", "study", "level", "files", "age", "idle"], rows,
                 "no study is waiting for completion")
    if len(waiting) > MAX_WAITING_ROWS:
        out.insert(-1, f"<p>… and {len(waiting) - MAX_WAITING_ROWS} more "
                       "(<code>dicomflow studies --waiting</code>)</p>")
    return out


def _failures(failures: list[Entry], note: str) -> list[str]:
    rows = []
    for entry in failures:
        reason = entry.detail.get("reason")
        rows.append([_e(_when(entry.at)), _e(entry.kind), _e(entry.endpoint or "-"),
                     _e(entry.file or "-"),
                     f'<span class="reason">{_e(str(reason or "")[:REASON_LIMIT])}</span>'])
    out = _table("failures", "Last failures", ["when (UTC)", "what", "endpoint", "file", "reason"],
                 rows, note or "none in the journal")
    return out


def _when(at: float) -> str:
    """An event's time; "?" for one a damaged journal gives as nonsense."""
    try:
        return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"
