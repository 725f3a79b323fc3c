"""``dicomflow trace UID|FILE [--json] [--patient-id X | --accession Y]``: an image's story.

The timeline of one instance (a SOP Instance UID, or a file: the UID in its spool
name, else the one in its header) or of a whole study (a Study Instance UID): where it
came from, which endpoints took it and which rule refused the others, every attempt to
deliver it with its status, and where each copy is *now* — checked against the spool,
not taken from the journal, so that the answer holds after a crash cost the journal
its last events (:mod:`pipeline.journal.accounts`).

No patient data is printed: the journal keeps Patient ID and Accession Number only
with ``journal_phi = true``, and then only to find a patient's or an order's images
(``--patient-id`` / ``--accession``); they are shown nowhere.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import QuarantineError
from pipeline.journal import events as kinds
from pipeline.journal import reader, store
from pipeline.journal.accounts import Ledger, Outcome, apply, outcomes
from pipeline.journal.reader import Entry, Instance
from pipeline.journal.whereabouts import Whereabouts, scan, split_name
from pipeline.names import escape, is_valid_uid
from pipeline.spool import Spool


class TraceError(Exception):
    """The request cannot be answered as asked (exit ``code``)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Query:
    """What was asked: ``by`` is "instance", "study", "patient_id" or "accession"."""

    by: str
    value: str
    seeds: frozenset[str]


# -- what was asked -----------------------------------------------------------------------

def uid_of(target: str) -> str:
    """The SOP Instance UID a UID-or-FILE argument names."""
    path = Path(target)
    if is_valid_uid(target) and not path.exists():
        return target
    parts = split_name(path.name)
    if parts is not None and parts[1]:
        return parts[1]
    if not path.is_file():
        raise TraceError(f"{escape(target)} is neither a UID nor a file", 2)
    from pipeline.header import quiet_pydicom, read_header

    quiet_pydicom()
    try:  # bounded: the validated header only, never the pixel data
        return read_header(path).sop_instance_uid
    except (QuarantineError, OSError, ValueError) as exc:
        raise TraceError(f"cannot read a SOP Instance UID from {escape(target)}: "
                         f"{escape(exc)}", 1) from None


def resolve(conn: sqlite3.Connection | None, where: Whereabouts, target: str | None,
            patient_id: str | None, accession: str | None) -> Query:
    """Which instances to trace; an instance's UID first, else a study's."""
    for by, value in (("patient_id", patient_id), ("accession", accession)):
        if value is not None:
            seeds = reader.uids_where(conn, by, value) if conn is not None else set()
            return Query(by, value, frozenset(seeds))
    assert target is not None
    uid = uid_of(target)
    if conn is not None and reader.events_for(conn, [uid]):
        return Query("instance", uid, frozenset({uid}))
    study = reader.uids_where(conn, "study", uid) if conn is not None else set()
    if study:
        return Query("study", uid, frozenset(study))
    return Query("instance", uid, frozenset({uid}) if uid in where.by_uid else frozenset())


# -- the answer ---------------------------------------------------------------------------

def now_of(instance: Instance) -> list[Outcome]:
    """Where each of its copies stands, by the same rules as ``reconcile``."""
    ledger = Ledger(instance.uid)
    for entry in instance.events:
        apply(ledger, entry.kind, entry.at, entry.endpoint, entry.detail)
    ledger.places = instance.places
    return outcomes(ledger)


def as_json(query: Query, instances: list[Instance]) -> dict[str, Any]:
    return {
        "query": {"by": query.by, "value": query.value if query.by in ("instance", "study")
                  else "(as given)"},
        "instances": [{
            "uid": inst.uid, "study": inst.study, "series": inst.series,
            "uids": sorted(inst.uids), "prefixes": sorted(inst.prefixes),
            "events": [entry.as_json() for entry in inst.events],
            "now": [{"endpoint": o.endpoint or None, "state": o.state, "where": o.where or None,
                     "reason": o.reason or None} for o in now_of(inst)],
            "files": [p.relative for p in inst.places],
        } for inst in instances],
    }


def render(query: Query, instances: list[Instance]) -> str:
    title = {"instance": f"instance {query.value}", "study": f"study {query.value}",
             "patient_id": "the patient's images", "accession": "the order's images"}[query.by]
    lines = [f"trace of {title}: {len(instances)} arrival(s)"]
    if len(instances) > 1:
        lines += _summary(instances)
    for inst in instances:
        lines.append("")
        lines += _instance(inst)
    return "\n".join(lines)


def _summary(instances: list[Instance]) -> list[str]:
    counts: dict[tuple[str, str], int] = {}
    for inst in instances:
        for o in now_of(inst):
            key = (o.endpoint or "-", o.state)
            counts[key] = counts.get(key, 0) + 1
    return [f"  {escape(ep):<16} {state:<12} {n:>6}" for (ep, state), n in sorted(counts.items())]


def _instance(inst: Instance) -> list[str]:
    head = f"instance {inst.uid or '(no uid)'}"
    if inst.study:
        head += f"  study {inst.study}"
    if inst.series:
        head += f"  series {inst.series}"
    lines = [head]
    copies = sorted(inst.uids - {inst.uid} if inst.uid else inst.uids)
    if copies:
        lines.append(f"  copies under other UIDs: {', '.join(copies)}")
    lines += [f"  {_when(e.at)}  {e.kind:<12} {_describe(e)}" for e in inst.events]
    if not inst.events:
        lines.append("  (no journal events)")
    lines.append("  now:")
    for o in now_of(inst):
        text = f"    {escape(o.endpoint or '-'):<16} {o.state:<12} {escape(o.where)}"
        if o.reason:
            text += f"  ({escape(o.reason)})"
        if o.last:
            text += f"  last known: {o.last[0]} at {_when(o.last[1])}"
        lines.append(text.rstrip())
    return lines


def _describe(e: Entry) -> str:
    """One event's line, from its columns and detail (every value escaped: it came in
    over the network or from the disk)."""
    d = e.detail
    ep = escape(e.endpoint or "")
    if e.kind == kinds.RECEIVED:
        return (f"from {escape(d.get('calling', '?'))} ({escape(d.get('peer', '?'))}) to "
                f"{escape(d.get('called', '?'))}, {escape(d.get('sop_class', '?'))}, "
                f"{escape(d.get('syntax', '?'))}, {_size(d.get('size'))}, association "
                f"{escape(d.get('association', '?'))}; {escape(e.file or '')}")
    if e.kind == kinds.ROUTED:
        return _routed(d)
    if e.kind == kinds.SHAPED:
        shaping = ", ".join(escape(s) for s in d.get("shaping", []) if isinstance(s, str))
        return f"{ep}: {shaping or 'copy'} -> {escape(d.get('copy_uid', '?'))}"
    if e.kind in (kinds.SENT, kinds.ATTEMPT):
        text = f"{ep}: status {_status(e.status)}"
        for key, label in (("reason", ""), ("comment", "comment "), ("association", "")):
            if d.get(key):
                text += f", {label}{escape(d[key])}"
        if "duration" in d:
            text += f", {_number(d['duration'])} s"
        if "attempt" in d:
            text += f", try {escape(d['attempt'])}"
        if "retry_in" in d:
            text += f", retry in {_number(d['retry_in'])} s"
        return text
    if e.kind in (kinds.FAILED, kinds.DELETED, kinds.QUARANTINED, kinds.REJECTED):
        why = d.get("reason") or d.get("why") or ""
        return f"{ep + ': ' if ep else ''}{escape(why)}; {escape(e.file or '')}"
    return f"{ep}; {escape(e.file or '')}"  # retried, and kinds of later versions


def _routed(d: dict[str, Any]) -> str:
    parts = []
    if d.get("release"):
        parts.append(f"{escape(d['release'])} released:")
    names = [escape(ep) for ep in d.get("endpoints", []) if isinstance(ep, str)]
    parts.append(f"to {', '.join(names)}" if names else "to no endpoint now")
    waiting = [escape(ep) for ep in d.get("waiting", []) if isinstance(ep, str)]
    if waiting:
        parts.append(f"; waiting for its series/study: {', '.join(waiting)}")
    for key, label in (("refused", "refused"), ("declined", "declined")):
        value = d.get(key)
        if isinstance(value, dict) and value:
            parts.append(f"; {label}: " + "; ".join(f"{escape(ep)} ({escape(why)})"
                                                     for ep, why in sorted(value.items())))
    return " ".join(parts).replace(" ;", ";")


def _status(status: int | None) -> str:
    return "none" if status is None else f"0x{status:04X}"


def _size(size: object) -> str:
    return f"{size:,} bytes" if isinstance(size, int) else "size ?"


def _number(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else escape(value)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


# -- the command --------------------------------------------------------------------------

def trace(spool: Spool, target: str | None, patient_id: str | None = None,
          accession: str | None = None) -> tuple[Query, list[Instance], str]:
    """The instances asked for, and a warning ("" when the journal could be read)."""
    warning = ""
    conn: sqlite3.Connection | None
    try:
        conn = reader.open_read(store.journal_path(spool.run_dir))
    except reader.JournalMissing as exc:
        conn, warning = None, f"{exc}; showing the spool alone"
    where = scan(spool)
    try:
        query, instances = _look_up(conn, where, target, patient_id, accession)
    except sqlite3.DatabaseError as exc:  # damaged, or locked beyond the busy timeout
        warning = f"the journal cannot be read ({escape(exc)}); showing the spool alone"
        query, instances = _look_up(None, where, target, patient_id, accession)
    finally:
        if conn is not None:
            conn.close()
    return query, instances, warning


def _look_up(conn: sqlite3.Connection | None, where: Whereabouts, target: str | None,
             patient_id: str | None, accession: str | None) -> tuple[Query, list[Instance]]:
    query = resolve(conn, where, target, patient_id, accession)
    return query, reader.link(conn, set(query.seeds), where) if query.seeds else []


def main(config: Config, target: str | None, *, as_json_output: bool = False,
         patient_id: str | None = None, accession: str | None = None) -> int:
    if (patient_id is not None or accession is not None) and not config.router.journal_phi:
        print("dicomflow trace: --patient-id and --accession need [router] journal_phi = true "
              "(the journal stores no patient data otherwise)", file=sys.stderr)
        return 2
    try:
        query, instances, warning = trace(Spool(config.spool), target, patient_id, accession)
    except TraceError as exc:
        print(f"dicomflow trace: {exc}", file=sys.stderr)
        return exc.code
    if warning:
        print(f"dicomflow trace: warning: {warning}", file=sys.stderr)
    if not instances:
        what = query.value if query.by in ("instance", "study") else f"that {query.by}"
        print(f"dicomflow trace: nothing known about {what} (neither the journal nor the "
              "spool)", file=sys.stderr)
        return 1
    print(json.dumps(as_json(query, instances), indent=2) if as_json_output
          else render(query, instances))
    return 0
