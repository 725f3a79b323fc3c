"""``dicomflow status [--json]``: where every file is, and how each endpoint is doing.

Fast on a spool with 100,000 files: it counts directory entries (``os.scandir``) and
reads the oldest file's age from its name (names start with the UTC arrival time) —
no DICOM parsing, no ``stat`` per file. Endpoint states come from the small state
file each sender keeps under ``<spool>/run/`` (``send-<endpoint>.json``); each daemon's
from its lock file (``receive.lock``, or ``receive-1.lock`` .. ``receive-N.lock`` with
``[router] receive_processes = N``). Studies waiting for completion come from the
filter's ``run/studies/state.json``, studies queued for a sender from the study lists
in ``run/studies/queue/<endpoint>/`` — never from a DICOM header.

The exit status tells a script or a monitor whether the router runs without parsing
the report: 0 when every daemon that should run does, 3 when none does (stopped), 4
when some do and some do not. ``--watch`` shows the report again every few seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import Config
from pipeline.config_types import format_size
from pipeline.journal.store import journal_path, size_bytes
from pipeline.lock import DaemonLock, process_names
from pipeline.names import escape, is_valid_endpoint_name, is_valid_uid
from pipeline.sender_state import sender_name, state_file_name
from pipeline.spool import Spool, is_hidden, is_sidecar
from pipeline.spool_names import SpoolName

SENDER_STATES = {
    "delivering": "delivering",
    "idle": "idle (outbox empty)",
    "busy": "busy (destination out of resources)",
    "down": "down",
    "outside_window": "outside window",
    "stopped": "stopped",
}


@dataclass
class StageCount:
    count: int
    oldest_age_s: float | None

    def as_dict(self) -> dict:
        return {"count": self.count, "oldest_age_s": self.oldest_age_s}


def count_stage(directory: Path, now: float) -> StageCount:
    """Count DICOM files (not hidden, not sidecars) and the oldest one's age."""
    count = 0
    oldest: str | None = None
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if is_hidden(name) or is_sidecar(name) or entry.is_dir(follow_symlinks=False):
                    continue  # folders: accepted/<endpoint>/ (hand-backs) is counted apart
                count += 1
                if oldest is None or name < oldest:
                    oldest = name
    except FileNotFoundError:
        return StageCount(0, None)
    if oldest is None:
        return StageCount(0, None)
    return StageCount(count, _age_from_name(directory / oldest, now))


def _age_from_name(path: Path, now: float) -> float | None:
    """A standard name starts with the arrival time; any other name costs one ``lstat``."""
    name = SpoolName.parse(path.name)
    if name is not None:
        return max(0.0, round(now - name.timestamp, 1))
    try:
        return max(0.0, round(now - path.lstat().st_mtime, 1))
    except FileNotFoundError:
        return None


def process_info(run_dir: Path, lock_name: str) -> dict:
    """Is the daemon holding ``<lock_name>.lock`` alive? (pid recorded in the lock file)."""
    try:
        pid = int(DaemonLock(run_dir, lock_name).path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return {"running": False, "pid": None}
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return {"running": False, "pid": None}
    return {"running": b"services.cli" in cmdline or b"dicomflow" in cmdline, "pid": pid}


def _sender_state(run_dir: Path, endpoint: str) -> dict:
    try:
        state = json.loads((run_dir / state_file_name(endpoint)).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return state if isinstance(state, dict) else {}


def _last_failure(failed_dir: Path) -> str | None:
    """The newest ``.error`` sidecar's first line, when the sender has none recorded."""
    try:
        errors = sorted(p for p in os.listdir(failed_dir) if p.endswith(".error"))
    except FileNotFoundError:
        return None
    if not errors:
        return None
    try:
        # bytes: a sidecar written by hand may not be UTF-8; escaped like every disk name
        return escape((failed_dir / errors[-1]).read_bytes().strip().splitlines()[0], 500)
    except (OSError, IndexError):
        return None


def _escaped(text: object) -> str | None:
    return escape(text, 500) if text else None


# -- studies (issue 17): the filter's state file and the senders' study lists ------------

STATE_FILE = "state.json"
STATE_LIMIT = 64 * 1024 * 1024   # 10,000 waiting studies are ~4 MB; more is not ours
LIST_LIMIT = 16 * 1024 * 1024    # the queue module's own bound on a study list
STALE_AFTER_S = 60.0             # the filter rewrites its state file at least this often
LEVELS = ("study", "series")
MPPS_STATES = ("in progress", "completed", "discontinued", "missing instances")
LIST_SUFFIX = ".study"


def studies_dir(spool: Spool) -> Path:
    """``<spool>/run/studies/``: the filter's state file, study lists, release requests."""
    return spool.run_dir / "studies"


def read_json(path: Path, limit: int) -> object | None:
    """A small JSON file of ours, read with a bound and without following links; None
    when it is missing, too big, not JSON or not readable (the caller says so)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fp:
            data = fp.read(limit + 1)
    except OSError:
        return None
    if len(data) > limit:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


@dataclass
class StudyState:
    """What the filter last said about waiting studies (``run/studies/state.json``).

    ``status``: ``ok``, ``missing``, ``corrupt`` or ``stale`` (``written`` over 60 s ago
    while the filter runs — it hangs or died without releasing its lock). The rows of a
    stale file are kept: they are the last known truth.
    """

    status: str
    written: float | None = None
    waiting: list[dict] = field(default_factory=list)
    released: list[dict] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.status == "ok"


def _number(value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits in a hand-edited file
        return None
    return number if math.isfinite(number) else None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _study_keys(entry: dict) -> dict | None:
    """The identifying part of a state-file row, validated (names and UIDs that are not
    ours are dropped: these end up in paths and on terminals)."""
    endpoint, study, series, level = (entry.get(k) for k in ("endpoint", "study", "series", "level"))
    if not (isinstance(endpoint, str) and is_valid_endpoint_name(endpoint) and is_valid_uid(study)):
        return None
    if series is not None and not is_valid_uid(series):
        return None
    return {"endpoint": endpoint, "study": study, "series": series,
            "level": level if level in LEVELS else "study"}


def _waiting_row(entry: object) -> dict | None:
    keys = _study_keys(entry) if isinstance(entry, dict) else None
    if keys is None or not isinstance(entry, dict):
        return None
    sample = entry.get("sample")
    return {**keys, "instances": _count(entry.get("instances")),
            "first_arrival": _number(entry.get("first_arrival")),
            "last_arrival": _number(entry.get("last_arrival")),
            "completion": "mpps" if entry.get("completion") == "mpps" else "stable",
            "mpps": entry.get("mpps") if entry.get("mpps") in MPPS_STATES else None,
            "release_at": _number(entry.get("release_at")),
            "sample": sample if isinstance(sample, str) else None}


def _released_row(entry: object) -> dict | None:
    keys = _study_keys(entry) if isinstance(entry, dict) else None
    if keys is None or not isinstance(entry, dict):
        return None
    return {**keys, "send": entry.get("send") is True, "instances": _count(entry.get("instances")),
            "at": _number(entry.get("at")), "why": escape(entry.get("why") or "", 200)}


def load_study_state(spool: Spool, now: float, filter_running: bool) -> StudyState:
    """Read the filter's state file; never raises (a missing file is not an error)."""
    path = studies_dir(spool) / STATE_FILE
    if not path.exists():
        return StudyState("missing")
    data = read_json(path, STATE_LIMIT)
    if not isinstance(data, dict) or data.get("version") != 1:
        return StudyState("corrupt")
    waiting, released = data.get("waiting"), data.get("released")
    if not isinstance(waiting, list) or not isinstance(released, list):
        return StudyState("corrupt")
    written = _number(data.get("written"))
    stale = filter_running and (written is None or now - written > STALE_AFTER_S)
    return StudyState("stale" if stale else "ok", written,
                      [row for row in map(_waiting_row, waiting) if row is not None],
                      [row for row in map(_released_row, released) if row is not None])


@dataclass(frozen=True)
class QueuedStudy:
    """One study list: a released study waiting for (or in) its endpoint's sender."""

    endpoint: str
    name: str
    study: str
    series: str | None
    level: str
    released: float | None
    instances: int


def queue_endpoints(spool: Spool) -> list[str]:
    """Endpoints with a study-list folder (``run/studies/queue/<endpoint>/``)."""
    try:
        with os.scandir(studies_dir(spool) / "queue") as entries:
            return sorted(e.name for e in entries
                          if is_valid_endpoint_name(e.name) and e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def queued_studies(spool: Spool, endpoint: str) -> list[QueuedStudy]:
    """An endpoint's study lists in release order; corrupt ones are skipped (the sender
    moves them aside). Reads the small JSON lists only, never a DICOM file."""
    directory = studies_dir(spool) / "queue" / endpoint
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(LIST_SUFFIX) and not is_hidden(n))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        data = read_json(directory / name, LIST_LIMIT)
        keys = _study_keys({**data, "endpoint": endpoint}) if isinstance(data, dict) else None
        if keys is None or not isinstance(data, dict):
            continue
        prefixes = data.get("prefixes")
        found.append(QueuedStudy(endpoint, name, keys["study"], keys["series"], keys["level"],
                                 _number(data.get("released")),
                                 len(prefixes) if isinstance(prefixes, list) else 0))
    return found


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else max(0.0, round(now - then, 1))


def waiting_summary(row: dict, now: float) -> dict:
    """One waiting study as ``status --json`` shows it (no patient data, no file name)."""
    release_at = row["release_at"]
    return {"study": row["study"], "series": row["series"], "level": row["level"],
            "instances": row["instances"], "age_s": _age(now, row["first_arrival"]),
            "idle_s": _age(now, row["last_arrival"]), "mpps": row["mpps"],
            "release_in_s": None if release_at is None else max(0.0, round(release_at - now, 1))}


def _endpoint_studies(waiting: list[dict], queued: list[QueuedStudy], now: float) -> dict:
    released = [q.released for q in queued if q.released is not None]
    return {"queued": {"count": len(queued), "oldest_age_s": _age(now, min(released, default=None))},
            "waiting": [waiting_summary(row, now) for row in waiting]}


def _studies(spool: Spool, names: list[str], filter_running: bool, now: float,
             grouped: frozenset[str] | set[str] = frozenset()) -> tuple[str | None, dict[str, dict]]:
    """``studies_state`` and each study-level endpoint's ``studies`` block.

    An endpoint is study-level for status when its configuration says so (``grouped``)
    or the state file or a study-list folder names it (a level changed since);
    ``studies_state`` is absent when nothing does and there is no state file.
    """
    state = load_study_state(spool, now, filter_running)
    listed = set(queue_endpoints(spool))
    known = set(grouped) | listed | {row["endpoint"] for row in state.waiting + state.released}
    if state.status == "missing" and not known:
        return None, {}
    blocks = {}
    for name in names:
        if name in known:
            waiting = sorted((r for r in state.waiting if r["endpoint"] == name),
                             key=lambda r: (r["first_arrival"] or 0.0, r["study"]))
            queued = queued_studies(spool, name) if name in listed else []
            blocks[name] = _endpoint_studies(waiting, queued, now)
    return ("ok" if state.available else "unavailable"), blocks


def collect(config: Config, now: float | None = None) -> dict:
    """Everything ``status`` shows, as the documented JSON structure."""
    now = time.time() if now is None else now
    spool = Spool(config.spool)
    stages = {stage: count_stage(spool.stage(stage), now).as_dict()
              for stage in ("incoming", "accepted", "rejected", "quarantine")}
    names = sorted(set(config.endpoints) | set(spool.endpoints()))
    endpoints = {name: _endpoint(config, spool, name, now) for name in names}
    processes = _processes(config, spool)
    grouped = {name for name, ep in config.endpoints.items() if ep.study.grouped}
    studies_state, studies = _studies(spool, names, processes["filter"]["running"], now, grouped)
    for name, block in studies.items():
        endpoints[name]["studies"] = block
    report = {
        "spool": str(spool.root),
        "conf": str(config.conf_dir),
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "processes": processes,
        "stages": stages,
        "endpoints": endpoints,
        "journal": journal_info(config, spool),
    }
    if studies_state is not None:
        report["studies_state"] = studies_state
    return report


def _sender(config: Config, spool: Spool, name: str) -> tuple[dict, dict]:
    """An endpoint's sender: whether it runs and its state, from its lock and state
    file only (no folder is counted); and the state file itself."""
    state = _sender_state(spool.run_dir, name)
    process = process_info(spool.run_dir, sender_name(name))
    configured = name in config.endpoints
    if not configured:
        summary = "orphaned"
    elif not process["running"]:
        summary = "not running"
    else:  # a hand-edited or damaged state file may hold anything: text only, escaped
        value = state.get("state", "starting")
        summary = escape(value, 40) if isinstance(value, str) and value else "unknown"
    return {"configured": configured, "sender_running": process["running"], "state": summary,
            "since": _text_or_none(state.get("since")),
            "down_since": _text_or_none(state.get("down_since")),
            "next_open": _text_or_none(state.get("next_open"))}, state


def _text_or_none(value: object) -> str | None:
    return escape(value, 64) if isinstance(value, str) and value else None


def daemons(config: Config) -> dict:
    """The part of :func:`collect` that says which daemons run and how each endpoint's
    sender is doing — locks and state files only, no folder counted: cheap enough for
    a load balancer's health probe every second (``/healthz``)."""
    spool = Spool(config.spool)
    return {"processes": _processes(config, spool),
            "endpoints": {name: _sender(config, spool, name)[0] for name in sorted(config.endpoints)}}


def _processes(config: Config, spool: Spool) -> dict:
    # one row per receive process: "receive", or "receive-1" .. "receive-N"
    processes = {**{name: process_info(spool.run_dir, name)
                    for name in process_names("receive", config.router.receive_processes)},
                 "filter": process_info(spool.run_dir, "filter")}
    if config.router.web.enabled:  # a row only when it should run: its absence is no fault
        processes["web"] = process_info(spool.run_dir, "web")
    return processes


def _endpoint(config: Config, spool: Spool, name: str, now: float) -> dict:
    sender, state = _sender(config, spool, name)
    ep = config.endpoints.get(name)
    return {
        "configured": sender["configured"],
        "destination": f"{ep.ae_title}@{ep.host}:{ep.port}" if ep else None,
        "sender_running": sender["sender_running"],
        "state": sender["state"],
        "since": sender["since"],
        "down_since": sender["down_since"],
        "next_open": sender["next_open"],
        "last_error": _escaped(state.get("last_error")) or _last_failure(spool.failed(name)),
        "last_error_at": state.get("last_error_at"),
        "outbox": count_stage(spool.outbox(name), now).as_dict(),
        "sent": {"count": count_stage(spool.sent(name), now).count},
        "failed": count_stage(spool.failed(name), now).as_dict(),
        # files its sender handed back to the filter to be shaped (accepted/<name>/)
        "handed_back": count_stage(spool.accepted / name, now).count,
    }


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def describe_state(info: dict) -> str:
    state = info["state"]
    if state == "orphaned":
        return "orphaned (no endpoint file; not sent)"
    if state == "down":
        return f"down since {info.get('down_since') or info.get('since') or '?'}"
    if state == "busy":
        return f"busy since {info.get('since') or '?'} (queue kept)"
    if state == "outside_window":
        return f"outside window, opens at {info.get('next_open') or '?'}"
    return SENDER_STATES.get(state, state)


def journal_info(config: Config, spool: Spool) -> dict:
    """The journal's switch, file and size on disk (database and WAL; null: none yet)."""
    path = journal_path(spool.run_dir)
    return {"enabled": config.router.journal, "path": str(path),
            "bytes": size_bytes(path), "retention_s": config.router.journal_retention,
            "phi": config.router.journal_phi}


def describe_journal(info: dict) -> str:
    if not info["enabled"]:
        return "  journal     off ([router] journal = false)"
    size = "none yet" if info["bytes"] is None else format_size(info["bytes"])
    days = info["retention_s"] / 86400
    return (f"  journal     {size}, events kept {days:g} days"
            + (", with Patient ID and Accession Number" if info["phi"] else ""))


def render(report: dict) -> str:
    lines = [f"DicomFlow  spool {report['spool']}  conf {report['conf']}  {report['time']}"]
    for name, proc in report["processes"].items():
        running = f"running, pid {proc['pid']}" if proc["running"] else "NOT RUNNING"
        lines.append(f"  {name:<10} {running}")
    lines.append("")
    lines.append(f"  {'stage':<12}{'files':>8}  oldest")
    for stage, info in report["stages"].items():
        lines.append(f"  {stage:<12}{info['count']:>8}  {format_age(info['oldest_age_s'])}")
    lines.append("")
    lines.append(f"  {'endpoint':<14}{'state':<44}{'outbox':>7} {'oldest':>7}{'sent':>8}{'failed':>7}")
    for name, info in report["endpoints"].items():
        lines.append(
            f"  {name:<14}{describe_state(info)[:43]:<44}{info['outbox']['count']:>7} "
            f"{format_age(info['outbox']['oldest_age_s']):>7}{info['sent']['count']:>8}"
            f"{info['failed']['count']:>7}"
        )
        if info["last_error"]:
            lines.append(f"  {'':<14}last error: {info['last_error']}")
        if "studies" in info:
            lines.append(f"  {'':<14}{describe_studies(info['studies'])}")
    lines += render_waiting(report)
    if "journal" in report:
        lines += ["", describe_journal(report["journal"])]
    return "\n".join(lines)


def describe_studies(block: dict) -> str:
    queued = block["queued"]
    oldest = f" (oldest {format_age(queued['oldest_age_s'])})" if queued["count"] else ""
    return f"studies: {queued['count']} queued{oldest}, {len(block['waiting'])} waiting"


def short_uid(uid: str, width: int = 20) -> str:
    """The last ``width`` characters of a UID: its distinctive end (roots are shared)."""
    return uid if len(uid) <= width else "…" + uid[-width:]


MAX_WAITING_ROWS = 20


def render_waiting(report: dict) -> list[str]:
    """The "studies waiting" block: at most 20 rows, oldest first, then "… and N more"."""
    if "studies_state" not in report:
        return []
    lines = [""]
    if report["studies_state"] != "ok":
        lines.append("  studies: state unavailable (the filter's run/studies/state.json is missing, "
                     "corrupt or stale)")
    rows = sorted(((name, row) for name, info in report["endpoints"].items()
                   for row in info.get("studies", {}).get("waiting", [])),
                  key=lambda item: -(item[1]["age_s"] or 0.0))
    lines.append(f"  studies waiting{len(rows):>7}")
    if rows:
        lines.append(f"  {'endpoint':<14}{'study':<22}{'level':<8}{'files':>7}{'age':>7}"
                     f"{'idle':>7}{'release in':>12}")
    for name, row in rows[:MAX_WAITING_ROWS]:
        release = format_age(row["release_in_s"]) if row["release_in_s"] is not None else (
            "on MPPS" if row["mpps"] else "-")
        lines.append(f"  {name:<14}{short_uid(row['study']):<22}{row['level']:<8}{row['instances']:>7}"
                     f"{format_age(row['age_s']):>7}{format_age(row['idle_s']):>7}{release:>12}")
    if len(rows) > MAX_WAITING_ROWS:
        lines.append(f"  … and {len(rows) - MAX_WAITING_ROWS} more (dicomflow studies --waiting)")
    return lines


# -- exit status and --watch (issue 19) ----------------------------------------------------

EXIT_RUNNING = 0   # every daemon that should run does
EXIT_STOPPED = 3   # none does: the router is stopped
EXIT_PARTIAL = 4   # some do, some do not: a daemon died or was never started
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: a terminal redraws in place


def expected_daemons(report: dict) -> dict[str, bool]:
    """Each daemon that should run, and whether it does.

    The process rows (receive or receive-1..N, filter, web when enabled: ``collect`` only
    adds the rows that should run) and ``send-<endpoint>`` per configured endpoint. An
    orphaned endpoint (an outbox without an endpoint file) has no sender by design.
    """
    daemons = {name: bool(info["running"]) for name, info in report["processes"].items()}
    daemons.update((sender_name(name), bool(info["sender_running"]))
                   for name, info in report["endpoints"].items() if info["configured"])
    return daemons


def exit_code(report: dict) -> int:
    """0, 3 or 4 (see the module docstring): a destination that is down is not a fault of
    the router (its sender runs and keeps the queue), so only the daemons count."""
    running = expected_daemons(report).values()
    if all(running):
        return EXIT_RUNNING
    return EXIT_PARTIAL if any(running) else EXIT_STOPPED


def show(report: dict, as_json: bool) -> str:
    """The report as ``status`` prints it once: indented JSON, or the text."""
    # one write: json.dump with an indent writes token by token (1.2 s at 100,000 files)
    return (json.dumps(report, indent=2) if as_json else render(report)) + "\n"


def frame(report: dict, as_json: bool, tty: bool, interval: float) -> str:
    """One ``--watch`` refresh.

    JSON: one document per line, for a script reading line by line (never a screen
    clear, even on a terminal). Text on a terminal: the screen cleared and redrawn in
    place, a footer saying how to stop. Text elsewhere (a pipe, a file, a log): plain
    lines, no escape codes, a blank line between reports.
    """
    if as_json:
        return json.dumps(report) + "\n"
    if tty:
        return f"{CLEAR}{render(report)}\n\nevery {interval:g}s — Ctrl-C to stop\n"
    return render(report) + "\n\n"


def watch_loop(config: Config, as_json: bool, interval: float) -> int:
    """Show the report every ``interval`` seconds until Ctrl-C or the reader goes away;
    returns the last report's exit code.

    Ctrl-C is how one ends a watch, not a failure: no traceback, and the code a script
    would have got from the last report (130 only if it came before the first one).
    A plain sleep between reports is fine for an interactive tool: the interval is
    rest for the disk, even when ``collect`` is slow on a big spool.
    """
    tty = sys.stdout.isatty()
    code: int | None = None
    try:
        while True:
            report = collect(config)
            code = exit_code(report)
            sys.stdout.write(frame(report, as_json, tty, interval))
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if code is None:
            raise
        if tty and not as_json:
            print()  # the prompt goes under the last report, not after the footer's ^C
        return code
    except BrokenPipeError:  # `... --watch --json | head -n 3`: the reader had enough
        # nothing more can be written; the interpreter's final flush would fail on it too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        assert code is not None  # set before the write that failed
        return code


def main(config: Config, as_json: bool = False, watch: float | None = None) -> int:
    """``dicomflow status [--json] [--watch [SECONDS]]``; returns the exit code (0, 3, 4).

    ``watch``: seconds between refreshes (``services/cli.py`` validates 0 < s <= 3600).
    """
    if watch is not None:
        return watch_loop(config, as_json, watch)
    report = collect(config)
    sys.stdout.write(show(report, as_json))
    return exit_code(report)
