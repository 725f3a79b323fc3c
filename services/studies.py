"""``dicomflow studies`` and ``dicomflow release``: the operator's view of study-level routing.

``studies`` lists the studies the filter holds back in ``accepted/`` (from its state file
``run/studies/state.json``) and the released ones queued for a sender (the study lists
in ``run/studies/queue/<endpoint>/``). Like ``status`` it parses no DICOM header — with
one exception the operator asks for by name: ``--show-phi`` reads the patient name and
ID, study date and accession number from one file of each study (bounded header read),
because telling studies apart by UID alone is hard and patient data must never appear
unasked.

``release STUDY_UID`` asks the filter to release a waiting study now: it writes an empty
``run/studies/requests/<STUDY_UID>.release`` (durably, through the spool), which the
filter consumes, then waits (bounded) until the study has left the waiting list.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import QuarantineError
from pipeline.header import quiet_pydicom, read_header
from pipeline.names import escape, is_valid_endpoint_name, is_valid_uid
from pipeline.spool import DIR_MODE, Spool, is_hidden
from pipeline.spool_names import SpoolName
from services.status import (
    LIST_LIMIT,
    StudyState,
    format_age,
    load_study_state,
    process_info,
    queue_endpoints,
    queued_studies,
    read_json,
    studies_dir,
)

RELEASE_WAIT_S = 30.0
POLL_S = 0.1
REQUEST_SUFFIX = ".release"
#: what ``--show-phi`` shows, by keyword (and its column title)
PHI_KEYWORDS = {"PatientName": "patient", "PatientID": "patient id", "StudyDate": "date",
                "AccessionNumber": "accession"}


# -- studies ------------------------------------------------------------------------------

@dataclass
class Row:
    """One study of one endpoint, waiting or queued, as ``studies`` shows it."""

    endpoint: str
    state: str                 # "waiting" | "queued"
    level: str
    study: str
    series: str | None
    instances: int
    age_s: float | None
    detail: dict
    sample: Path | None = None  # a file of the study, read only with --show-phi

    def as_dict(self) -> dict:
        return {"endpoint": self.endpoint, "state": self.state, "level": self.level,
                "study": self.study, "series": self.series, "instances": self.instances,
                "age_s": self.age_s, **self.detail}


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else max(0.0, round(now - then, 1))


def _sample_path(spool: Spool, name: str | None) -> Path | None:
    """The state file's ``sample``: a plain, visible file name in ``accepted/``, else None."""
    if not name or "/" in name or "\0" in name or is_hidden(name) or name in ("..", "."):
        return None
    return spool.accepted / name


def waiting_rows(spool: Spool, state: StudyState, now: float) -> list[Row]:
    rows = []
    for entry in state.waiting:
        release_at = entry["release_at"]
        detail = {"idle_s": _age(now, entry["last_arrival"]), "completion": entry["completion"],
                  "mpps": entry["mpps"],
                  "release_in_s": None if release_at is None else max(0.0, round(release_at - now, 1))}
        rows.append(Row(entry["endpoint"], "waiting", entry["level"], entry["study"], entry["series"],
                        entry["instances"], _age(now, entry["first_arrival"]), detail,
                        _sample_path(spool, entry["sample"])))
    return sorted(rows, key=lambda r: (r.endpoint, -(r.age_s or 0.0), r.study))


def queued_rows(spool: Spool, endpoints: list[str], now: float) -> list[Row]:
    rows = []
    for endpoint in endpoints:
        for item in queued_studies(spool, endpoint):
            rows.append(Row(endpoint, "queued", item.level, item.study, item.series, item.instances,
                            _age(now, item.released), {"list": item.name}))
    return rows


def _outbox_by_prefix(spool: Spool, endpoint: str) -> dict[str, Path]:
    """Each standard-named file of an endpoint's outbox by its name prefix (one scan)."""
    found: dict[str, Path] = {}
    try:
        with os.scandir(spool.outbox(endpoint)) as entries:
            for entry in entries:
                parsed = SpoolName.parse(entry.name)
                if parsed is not None:
                    found.setdefault(parsed.prefix, Path(entry.path))
    except OSError:
        pass
    return found


def _first_listed(spool: Spool, endpoint: str, list_name: str, outbox: dict[str, Path]) -> Path | None:
    """A file of a queued study still in the outbox (only for ``--show-phi``): the list
    names the copies' name prefixes, in sending order."""
    data = read_json(studies_dir(spool) / "queue" / endpoint / list_name, LIST_LIMIT)
    prefixes = data.get("prefixes") if isinstance(data, dict) else None
    for prefix in prefixes if isinstance(prefixes, list) else []:
        if isinstance(prefix, str) and prefix in outbox:
            return outbox[prefix]
    return None


def read_phi(config: Config, path: Path | None) -> dict:
    """Patient name and ID, study date, accession of one file, by a bounded header read.

    Values are escaped (they come from the network). A file that is gone or unreadable
    says so instead: the study is still listed."""
    if path is None:
        return {"phi_error": "no file of the study at hand"}
    try:
        ds = read_header(path, config.router.header_limits).dataset
    except FileNotFoundError:
        return {"phi_error": "its file has moved on"}
    except (QuarantineError, OSError) as exc:
        return {"phi_error": escape(f"unreadable: {exc}", 200)}
    return {keyword: escape(str(ds.get(keyword, "") or ""), 64) for keyword in PHI_KEYWORDS}


def _add_phi(config: Config, spool: Spool, rows: list[Row]) -> None:
    quiet_pydicom()
    outboxes: dict[str, dict[str, Path]] = {}
    for row in rows:
        path = row.sample
        if row.state == "queued":
            if row.endpoint not in outboxes:
                outboxes[row.endpoint] = _outbox_by_prefix(spool, row.endpoint)
            path = _first_listed(spool, row.endpoint, row.detail["list"], outboxes[row.endpoint])
        row.detail["phi"] = read_phi(config, path)


def _known_endpoints(config: Config, spool: Spool) -> set[str]:
    return set(config.endpoints) | set(spool.endpoints()) | set(queue_endpoints(spool))


def collect_studies(config: Config, *, waiting: bool, endpoint: str | None, show_phi: bool,
                    now: float | None = None) -> tuple[StudyState, list[Row]]:
    now = time.time() if now is None else now
    spool = Spool(config.spool)
    filter_running = process_info(spool.run_dir, "filter")["running"]
    state = load_study_state(spool, now, filter_running)
    rows = waiting_rows(spool, state, now)
    if not waiting:
        rows += queued_rows(spool, queue_endpoints(spool), now)
    if endpoint is not None:
        rows = [row for row in rows if row.endpoint == endpoint]
    rows.sort(key=lambda r: (r.endpoint, r.state != "waiting", -(r.age_s or 0.0), r.study))
    if show_phi:
        _add_phi(config, spool, rows)
    return state, rows


def _state_note(state: StudyState) -> str | None:
    notes = {"missing": "no study state from the filter (run/studies/state.json is missing): "
                        "waiting studies cannot be shown",
             "corrupt": "the filter's run/studies/state.json is unreadable: waiting studies cannot be shown",
             "stale": "the filter's run/studies/state.json is over a minute old (is the filter stuck?): "
                      "waiting studies as last written"}
    return notes.get(state.status)


def _describe_row(row: Row) -> str:
    if row.state == "queued":
        return "queued for sending"
    mpps = row.detail["mpps"]
    release_in = row.detail["release_in_s"]
    if mpps:
        text = f"MPPS {mpps}"
    else:
        text = "waiting for MPPS" if row.detail["completion"] == "mpps" else "waiting to be stable"
    if release_in is not None:
        text += f", release in {format_age(release_in)}"
    return text


def render_studies(rows: list[Row], show_phi: bool) -> str:
    if not rows:
        return "no studies waiting or queued"
    lines = [f"{'endpoint':<14}{'state':<9}{'level':<8}{'files':>7}{'age':>7}  {'study UID':<66}detail"]
    for row in rows:
        uid = row.study if row.series is None else f"{row.study} series {row.series}"
        lines.append(f"{row.endpoint:<14}{row.state:<9}{row.level:<8}{row.instances:>7}"
                     f"{format_age(row.age_s):>7}  {uid:<66}{_describe_row(row)}")
        if show_phi:
            phi = row.detail.get("phi", {})
            text = phi.get("phi_error") or "  ".join(
                f"{title}: {phi.get(keyword) or '-'}" for keyword, title in PHI_KEYWORDS.items())
            lines.append(f"{'':<14}{text}")
    return "\n".join(lines)


def studies_main(config: Config, *, waiting: bool, endpoint: str | None, show_phi: bool,
                 as_json: bool) -> int:
    """List waiting and queued studies; exit 1 for an endpoint this spool does not know."""
    if endpoint is not None and (not is_valid_endpoint_name(endpoint)
                                 or endpoint not in _known_endpoints(config, Spool(config.spool))):
        print(f"dicomflow: no endpoint {escape(endpoint, 80)!r} (conf/endpoints/NAME.ini)", file=sys.stderr)
        return 1
    state, rows = collect_studies(config, waiting=waiting, endpoint=endpoint, show_phi=show_phi)
    note = _state_note(state)
    if as_json:
        report = {"studies_state": "ok" if state.available else "unavailable",
                  "studies": [row.as_dict() for row in rows]}
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_studies(rows, show_phi))
    if note:
        print(f"dicomflow: {note}", file=sys.stderr)
    return 0


# -- release -------------------------------------------------------------------------------

def requests_dir(spool: Spool) -> Path:
    """``run/studies/requests/`` (mode 0700), made on demand."""
    path = studies_dir(spool) / "requests"
    for directory in (studies_dir(spool), path):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(directory, DIR_MODE)  # umask may have loosened it
    return path


def _not_waiting_reason(spool: Spool, state: StudyState, uid: str) -> str:
    """Why ``uid`` cannot be released: already released (queued or decided), or unknown."""
    for endpoint in queue_endpoints(spool):
        if any(item.study == uid for item in queued_studies(spool, endpoint)):
            return f"study {uid} is not waiting: it was released and is queued for {endpoint}"
    decided = [row for row in state.released if row["study"] == uid]
    if decided:
        row = decided[0]
        return (f"study {uid} is not waiting: it was already released "
                f"({'sent to' if row['send'] else 'not for'} {row['endpoint']}: {row['why']})")
    return f"study {uid} is unknown: no endpoint is waiting for it"


def _wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def _released_report(state: StudyState, uid: str, since: float) -> list[str]:
    """The filter's decisions on ``uid`` since the request (the same host's clock)."""
    rows = [row for row in state.released if row["study"] == uid and (row["at"] or 0.0) >= since - 1.0]
    if not rows:  # a forced request for a study that was not waiting
        return [f"the filter took the request; study {uid} is not waiting (dicomflow studies)"]
    return [f"study {uid}: {'released to' if row['send'] else 'not sent to'} {row['endpoint']} "
            f"({row['instances']} files; {row['why']})" for row in rows]


def release_main(config: Config, study_uid: str, *, force: bool, wait: bool,
                 timeout: float = RELEASE_WAIT_S) -> int:
    """Ask the filter to release a waiting study now; exit 0 once it has, else 1."""
    if not is_valid_uid(study_uid):
        print(f"dicomflow: {escape(study_uid, 80)!r} is not a Study Instance UID "
              f"(digits and dots, at most 64 characters)", file=sys.stderr)
        return 1
    spool = Spool(config.spool)
    filter_running = process_info(spool.run_dir, "filter")["running"]
    state = load_study_state(spool, time.time(), filter_running)
    waiting = [row for row in state.waiting if row["study"] == study_uid]
    if not waiting and not force:
        reason = (_not_waiting_reason(spool, state, study_uid) if state.status in ("ok", "stale")
                  else _state_note(state) or "no study state")
        print(f"dicomflow: {reason} (--force writes the request anyway)", file=sys.stderr)
        return 1
    directory = requests_dir(spool)
    request = directory / f"{study_uid}{REQUEST_SUFFIX}"
    requested_at = time.time()
    try:
        spool.write_bytes(directory, request.name, b"")
    except FileExistsError:
        print(f"a release of study {study_uid} was already requested")
    else:
        endpoints = ", ".join(sorted({row["endpoint"] for row in waiting})) or "?"
        print(f"release of study {study_uid} requested (waiting for {endpoints})")
    if not wait:
        return 0
    return _await_release(spool, request, study_uid, timeout, requested_at)


def _await_release(spool: Spool, request: Path, uid: str, timeout: float, since: float) -> int:
    def released() -> bool:
        if request.exists():
            return False
        now = time.time()
        state = load_study_state(spool, now, False)
        return state.available and not any(row["study"] == uid for row in state.waiting)

    if _wait_until(released, timeout):
        state = load_study_state(spool, time.time(), False)
        print("\n".join(_released_report(state, uid, since)))
        return 0
    if not process_info(spool.run_dir, "filter")["running"]:
        print(f"dicomflow: the filter is not running: nothing released; the request stays in {request} "
              f"and is acted on when the filter starts (dicomflow up)", file=sys.stderr)
    elif request.exists():
        print(f"dicomflow: the filter has not taken the request within {timeout:.0f} s "
              f"(it stays in {request})", file=sys.stderr)
    else:
        print(f"dicomflow: the filter took the request but study {uid} is still waiting after "
              f"{timeout:.0f} s; see dicomflow studies --waiting and the filter's log", file=sys.stderr)
    return 1
