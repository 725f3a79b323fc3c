"""``dicomflow status [--json]``: where every file is, and how each endpoint is doing.

Fast on a spool with 100,000 files: it counts directory entries (``os.scandir``) and
reads the oldest file's age from its name (names start with the UTC arrival time) —
no DICOM parsing, no ``stat`` per file. Endpoint states come from the small state
file each sender keeps under ``<spool>/run/`` (``send-<endpoint>.json``); each daemon's
from its lock file (``receive.lock``, or ``receive-1.lock`` .. ``receive-N.lock`` with
``[router] receive_processes = N``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import Config
from pipeline.lock import DaemonLock, process_names
from pipeline.names import escape
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


def _process(run_dir: Path, lock_name: str) -> dict:
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
        return json.loads((run_dir / state_file_name(endpoint)).read_text())
    except (FileNotFoundError, ValueError):
        return {}


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


def collect(config: Config, now: float | None = None) -> dict:
    """Everything ``status`` shows, as the documented JSON structure."""
    now = time.time() if now is None else now
    spool = Spool(config.spool)
    stages = {stage: count_stage(spool.stage(stage), now).as_dict()
              for stage in ("incoming", "accepted", "rejected", "quarantine")}
    names = sorted(set(config.endpoints) | set(spool.endpoints()))
    endpoints = {name: _endpoint(config, spool, name, now) for name in names}
    return {
        "spool": str(spool.root),
        "conf": str(config.conf_dir),
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        # one row per receive process: "receive", or "receive-1" .. "receive-N"
        "processes": {**{name: _process(spool.run_dir, name)
                         for name in process_names("receive", config.router.receive_processes)},
                      "filter": _process(spool.run_dir, "filter")},
        "stages": stages,
        "endpoints": endpoints,
    }


def _endpoint(config: Config, spool: Spool, name: str, now: float) -> dict:
    state = _sender_state(spool.run_dir, name)
    process = _process(spool.run_dir, sender_name(name))
    configured = name in config.endpoints
    if not configured:
        summary = "orphaned"
    elif not process["running"]:
        summary = "not running"
    else:
        summary = state.get("state", "starting")
    ep = config.endpoints.get(name)
    return {
        "configured": configured,
        "destination": f"{ep.ae_title}@{ep.host}:{ep.port}" if ep else None,
        "sender_running": process["running"],
        "state": summary,
        "since": state.get("since"),
        "down_since": state.get("down_since"),
        "next_open": state.get("next_open"),
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
    return "\n".join(lines)


def main(config: Config, as_json: bool = False) -> int:
    report = collect(config)
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(report))
    return 0
